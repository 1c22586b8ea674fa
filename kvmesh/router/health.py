"""Whether the router's members are reachable by the peers that need them, for `kvmesh
status`: a member registered and heartbeating may still be of no use, when its events
(KV events, load reports) do not reach the router, so routing is blind to it, or when it
cannot reach a peer it needs itself (a worker its node's cache actor; it says so in its
LoadReport). Plain data: the router actor feeds it, times from time.monotonic()."""

from __future__ import annotations

from dataclasses import dataclass, field

# seconds without a report (a worker's LoadReport, a cache's CacheReport; each comes
# every second or faster) after which a member's events count as not reaching us
EVENTS_STALE_S = 5.0


@dataclass
class Hearing:
    """One member's events, as the router hears them."""

    events_endpoint: str
    registered_at: float
    reported_at: float | None = None  # its last report; None: none since it registered
    unreachable: list[str] = field(default_factory=list)  # as its last report said


class MemberHealth:
    """The router's members (workers, cache actors) by id: where their events come from,
    when they last reported, what they said they cannot reach."""

    def __init__(self, router_id: str) -> None:
        self.router_id = router_id
        self._members: dict[str, Hearing] = {}

    def registered(self, actor_id: str, events_endpoint: str, now: float) -> None:
        """A member (re)registered, its events subscribed to at events_endpoint."""
        self._members[actor_id] = Hearing(events_endpoint, now)

    def reported(self, actor_id: str, now: float, unreachable: list[str] | None = None) -> None:
        """A report of a registered member arrived (with what it cannot reach, if told)."""
        hearing = self._members.get(actor_id)
        if hearing is None:
            return
        hearing.reported_at = now
        if unreachable is not None:
            hearing.unreachable = list(unreachable)

    def forget(self, actor_id: str) -> None:
        self._members.pop(actor_id, None)

    def problems(self, actor_id: str, now: float) -> list[str]:
        """Why the peers that need this member cannot use it; empty: healthy."""
        hearing = self._members.get(actor_id)
        if hearing is None:
            return []
        problems = []
        last = hearing.reported_at
        silent = now - (last if last is not None else hearing.registered_at)
        if silent > EVENTS_STALE_S:
            since = "ever since it registered" if last is None else f"for {silent:.0f} s"
            problems.append(
                f"its events ({hearing.events_endpoint}) have not reached "
                f"{self.router_id} {since}: does this host reach that address?"
            )
        return problems + [f"cannot reach {peer}" for peer in hearing.unreachable]
