"""The planner's rule (kvmesh.planner.policy) and its latency window, table-driven."""

from __future__ import annotations

import pytest

from kvmesh.actors.base import ActorConfig
from kvmesh.actors.switching import SwitchingWorker
from kvmesh.actors.worker import WorkerSettings
from kvmesh.config import load_config
from kvmesh.planner.policy import (
    Measurements,
    PlannerSettings,
    PlannerState,
    WorkerView,
    decide,
)
from kvmesh.planner.window import ITL, TTFT, LatencyWindow, quantile
from kvmesh.transport.keys import generate

SETTINGS = PlannerSettings(
    ttft_target=1.0, itl_target=0.1, high=1.0, low=0.7, patience=1, cooldown=10.0
)


def make_workers(prefill: int = 1, decode: int = 2, busy: dict | None = None):
    busy = busy or {}
    return tuple(
        WorkerView(f"{role}-{k}", role, busy.get(f"{role}-{k}", 0))
        for role, n in (("prefill", prefill), ("decode", decode))
        for k in range(n)
    )


def make_measurements(ttft=None, itl=None, now=100.0, **workers) -> Measurements:
    return Measurements(now=now, ttft=ttft, itl=itl, workers=make_workers(**workers))


@pytest.mark.parametrize(
    "ttft, itl, workers, action, worker, reason",
    [
        (None, None, {}, "hold", None, "no samples"),
        (0.5, 0.05, {}, "hold", None, "within targets"),
        (2.0, 0.2, {}, "hold", None, "both phases over target"),
        (2.0, 0.05, {}, "to_prefill", "decode-0", "ttft over target, itl spare"),
        (2.0, None, {}, "to_prefill", "decode-0", "ttft over target, itl spare"),
        (0.5, 0.2, {}, "to_decode", "prefill-0", "itl over target, ttft spare"),
        # hysteresis: the other phase between low and high is not spare
        (2.0, 0.08, {}, "hold", None, "other phase not spare (hysteresis band)"),
        (0.8, 0.2, {}, "hold", None, "other phase not spare (hysteresis band)"),
        # the least busy worker of the giving role moves
        (2.0, 0.05, {"busy": {"decode-0": 3, "decode-1": 1}}, "to_prefill", "decode-1", None),
        # bounds
        (
            2.0,
            0.05,
            {"decode": 1},
            "hold",
            None,
            "ttft over target, itl spare; decode at its minimum 1",
        ),
        (
            0.5,
            0.2,
            {"prefill": 0},
            "hold",
            None,
            "itl over target, ttft spare; prefill at its minimum 0",
        ),
    ],
)
def test_decide_table(ttft, itl, workers, action, worker, reason):
    decision, _ = decide(SETTINGS, make_measurements(ttft, itl, **workers), PlannerState())
    assert (decision.action, decision.worker_id) == (action, worker)
    if reason is not None:
        assert decision.reason == reason


def test_maximum_bound_holds():
    settings = PlannerSettings(ttft_target=1.0, itl_target=0.1, patience=1, max_prefill=1)
    decision, _ = decide(settings, make_measurements(2.0, 0.05), PlannerState())
    assert decision.action == "hold"
    assert decision.reason == "ttft over target, itl spare; prefill at its maximum 1"


def test_pressures_are_reported():
    decision, _ = decide(SETTINGS, make_measurements(2.0, 0.05), PlannerState())
    assert decision.ttft_pressure == pytest.approx(2.0)
    assert decision.itl_pressure == pytest.approx(0.5)


def test_patience_needs_consecutive_intervals():
    settings = PlannerSettings(ttft_target=1.0, itl_target=0.1, patience=3, cooldown=0.0)
    state = PlannerState()
    actions = []
    for ttft, now in ((2.0, 1.0), (2.0, 2.0), (0.5, 3.0), (2.0, 4.0), (2.0, 5.0), (2.0, 6.0)):
        decision, state = decide(settings, make_measurements(ttft, 0.05, now=now), state)
        actions.append(decision.action)
    assert actions == ["hold", "hold", "hold", "hold", "hold", "to_prefill"]
    assert state == PlannerState(last_switch=6.0, streak_action="hold", streak=0)


def test_cooldown_after_a_switch():
    state = PlannerState()
    decision, state = decide(SETTINGS, make_measurements(2.0, 0.05, now=100.0), state)
    assert decision.action == "to_prefill"
    decision, state = decide(SETTINGS, make_measurements(2.0, 0.05, now=105.0), state)
    assert (decision.action, decision.reason) == (
        "hold",
        "ttft over target, itl spare; cooling down",
    )
    decision, state = decide(SETTINGS, make_measurements(2.0, 0.05, now=110.0), state)
    assert decision.action == "to_prefill"


@pytest.mark.parametrize(
    "q, buckets, expected",
    [
        (0.5, {0.1: 0.0, 0.2: 10.0, float("inf"): 10.0}, 0.15),
        (0.9, {0.1: 5.0, float("inf"): 10.0}, 0.1),  # past the last finite bound
        (0.5, {0.1: 4.0, 0.2: 4.0, 0.4: 8.0, float("inf"): 8.0}, 0.1),
        (0.9, {0.1: 0.0, float("inf"): 0.0}, None),
        (0.9, {}, None),
    ],
)
def test_quantile(q, buckets, expected):
    result = quantile(q, buckets)
    assert result == (pytest.approx(expected) if expected is not None else None)


def exposition(ttft: dict[float, int], itl: dict[float, int]) -> str:
    lines = []
    for name, buckets in ((TTFT, ttft), (ITL, itl)):
        lines.append(f"# TYPE {name} histogram")
        for le, count in buckets.items():
            bound = "+Inf" if le == float("inf") else repr(le)
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        lines.append(f"{name}_count {max(buckets.values())}")
        lines.append(f"{name}_sum 1.0")
    return "\n".join(lines) + "\n"


def test_window_takes_the_interval_difference():
    inf = float("inf")
    window = LatencyWindow(q=0.5)
    first = window.observe(exposition({0.1: 10, 1.0: 10, inf: 10}, {0.01: 4, 0.1: 4, inf: 4}))
    assert first == {TTFT: pytest.approx(0.05), ITL: pytest.approx(0.005)}
    # ten more first tokens, all between 0.1 and 1.0 s; no new inter-token samples
    second = window.observe(exposition({0.1: 10, 1.0: 20, inf: 20}, {0.01: 4, 0.1: 4, inf: 4}))
    assert second == {TTFT: pytest.approx(0.55), ITL: None}
    # a restarted frontend: its counts are taken as they are
    third = window.observe(exposition({0.1: 2, 1.0: 2, inf: 2}, {0.01: 0, 0.1: 0, inf: 0}))
    assert third == {TTFT: pytest.approx(0.05), ITL: None}


def test_a_planner_with_keys_loads():
    cfg = load_config(None, ["nodes.0.actors.4.role=planner", "security.key_dir=/tmp/keys"])
    assert sorted(spec.role for spec in cfg.actors).count("planner") == 1


def test_a_switching_worker_with_a_one_role_key_is_refused(tmp_path):
    """Its own role's key passes the actor's check, but peers would refuse it once the
    planner switched it: refused at start instead."""
    generate(tmp_path / "keys", [("decode-0", "decode")])
    config = ActorConfig(actor_id="decode-0", key_dir=tmp_path / "keys")
    settings = WorkerSettings("m", "m", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://x:3")

    with pytest.raises(ValueError) as refused:
        SwitchingWorker(config, settings, "decode")

    assert str(refused.value) == (
        "key 'decode-0' is for the role decode; a worker the planner switches needs a "
        'key for the role "worker": `kvmesh keys generate DIR --config cluster.toml --force` '
        "writes them for a cluster with a planner"
    )
