"""The planner's decision rule: measurements + settings -> one decision (pure).

Algorithm, every `interval` seconds:

  1. pressure of each phase = its latency quantile over the last interval / its target:
       ttft_pressure = TTFT q-quantile / ttft_target   (prefill is short of workers)
       itl_pressure  = ITL  q-quantile / itl_target    (decode is short of workers)
     A phase with no samples in the interval has no pressure (None): nothing to act on.
  2. A phase is *short* when its pressure > `high`, *spare* when it is < `low`
     (hysteresis: between low and high nothing changes, so a switch that brings a
     phase just under its target does not swing back).
  3. One phase short and the other spare, for `patience` intervals in a row, and no
     switch in the last `cooldown` seconds -> move one worker from the spare role to
     the short one, if that keeps each role within [min_<role>, max_<role>].
     Both short, neither short, or a bound in the way -> hold, with the reason.
  4. The worker moved is the one with the least work of the giving role (fewest
     running + waiting requests; ties: the lowest id), so the fewest requests drain.

Settings (cluster.toml [planner]): ttft_target, itl_target (seconds), quantile (q),
high, low, patience, cooldown, interval, min_prefill, max_prefill, min_decode,
max_decode (see PlannerSettings).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlannerSettings:
    """The rule's knobs; cluster.toml's [planner] fills them (config/schema.py)."""

    ttft_target: float = 1.0
    itl_target: float = 0.1
    quantile: float = 0.9
    high: float = 1.0
    low: float = 0.7
    patience: int = 2
    cooldown: float = 10.0
    min_prefill: int = 0
    max_prefill: int = 64
    min_decode: int = 1
    max_decode: int = 64


@dataclass(frozen=True)
class WorkerView:
    """One registered worker as the planner sees it."""

    worker_id: str
    role: str  # "prefill" or "decode"
    num_requests: int = 0  # running + waiting + parked


@dataclass(frozen=True)
class Measurements:
    """One interval's view of the cluster."""

    now: float  # monotonic seconds
    ttft: float | None  # the TTFT quantile over the interval; None: no first tokens
    itl: float | None  # the ITL quantile over the interval; None: no later tokens
    workers: tuple[WorkerView, ...]


@dataclass(frozen=True)
class PlannerState:
    """What the rule remembers between intervals."""

    last_switch: float | None = None  # monotonic time of the last switch
    streak_action: str = "hold"  # the action wanted in the last intervals
    streak: int = 0  # how many intervals in a row it was wanted


@dataclass(frozen=True)
class Decision:
    """hold, or to_prefill / to_decode naming the worker; reason says why."""

    action: str  # "hold", "to_prefill", "to_decode"
    reason: str
    worker_id: str | None = None
    ttft_pressure: float | None = None
    itl_pressure: float | None = None


def pressure(value: float | None, target: float) -> float | None:
    return None if value is None else value / target


def wanted(s: PlannerSettings, ttft_p: float | None, itl_p: float | None) -> tuple[str, str]:
    """(action, reason) from the pressures alone (steps 1-2)."""
    if ttft_p is None and itl_p is None:
        return "hold", "no samples"
    ttft_short = ttft_p is not None and ttft_p > s.high
    itl_short = itl_p is not None and itl_p > s.high
    ttft_spare = ttft_p is None or ttft_p < s.low
    itl_spare = itl_p is None or itl_p < s.low
    if ttft_short and itl_short:
        return "hold", "both phases over target"
    if ttft_short and itl_spare:
        return "to_prefill", "ttft over target, itl spare"
    if itl_short and ttft_spare:
        return "to_decode", "itl over target, ttft spare"
    if ttft_short or itl_short:
        return "hold", "other phase not spare (hysteresis band)"
    return "hold", "within targets"


def decide(
    s: PlannerSettings, m: Measurements, state: PlannerState
) -> tuple[Decision, PlannerState]:
    """The decision for this interval and the state for the next (steps 1-4)."""
    ttft_p, itl_p = pressure(m.ttft, s.ttft_target), pressure(m.itl, s.itl_target)
    action, reason = wanted(s, ttft_p, itl_p)
    streak = state.streak + 1 if action == state.streak_action else 1
    state = PlannerState(state.last_switch, action, streak)

    def hold(why: str) -> tuple[Decision, PlannerState]:
        return Decision("hold", why, None, ttft_p, itl_p), state

    if action == "hold":
        return hold(reason)
    if streak < s.patience:
        return hold(f"{reason}; {streak} of {s.patience} intervals")
    if state.last_switch is not None and m.now - state.last_switch < s.cooldown:
        return hold(f"{reason}; cooling down")
    giver, taker = ("decode", "prefill") if action == "to_prefill" else ("prefill", "decode")
    counts = {role: sum(w.role == role for w in m.workers) for role in ("prefill", "decode")}
    low_bound = s.min_prefill if giver == "prefill" else s.min_decode
    high_bound = s.max_prefill if taker == "prefill" else s.max_decode
    if counts[giver] <= low_bound:
        return hold(f"{reason}; {giver} at its minimum {low_bound}")
    if counts[taker] >= high_bound:
        return hold(f"{reason}; {taker} at its maximum {high_bound}")
    chosen = min(
        (w for w in m.workers if w.role == giver), key=lambda w: (w.num_requests, w.worker_id)
    )
    return (
        Decision(action, reason, chosen.worker_id, ttft_p, itl_p),
        PlannerState(m.now, "hold", 0),
    )
