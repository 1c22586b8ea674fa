"""A worker whose role a planner may switch (kvmesh.actors.planner sends SwitchRole).

`kvmesh actor` builds one for every prefill and decode entry of a cluster that runs a
planner; clusters without one keep the single-role PrefillWorker and DecodeWorker.
"""

from __future__ import annotations

from kvmesh.actors.base import ActorConfig, PeerDeadError, RemoteError
from kvmesh.actors.worker import DecodeWorker, PrefillWorker, WorkerSettings
from kvmesh.engine.engine import RequestOutput
from kvmesh.protocol import Error, ErrorCode, RoleSwitched, SwitchRole
from kvmesh.transport.keys import SWITCHING


class SwitchingWorker(DecodeWorker, PrefillWorker):
    """A worker that a planner moves between the prefill and decode roles (SwitchRole).

    It handles both roles' messages, so a switch loses nothing: it re-registers with the
    router in the new role (from then on placed only in it) while the requests of the
    old role that it holds run to their end. Its engine, and so its prefix cache and the
    router's index of it, stay. `kvmesh actor` builds it when the cluster has a planner.
    """

    def __init__(self, config: ActorConfig, settings: WorkerSettings, role: str) -> None:
        self.role = role  # before Actor.__init__, which binds it into the log
        super().__init__(config, settings)
        if self._keys is not None and self._keys.own.role != SWITCHING:
            # a one-role key would be refused by every peer after the first switch
            raise ValueError(
                f"key {self._keys.own.name!r} is for the role {self._keys.own.role}; a "
                "worker the planner switches needs a key for the role "
                f'"{SWITCHING}": `kvmesh keys generate DIR --config cluster.toml --force` '
                "writes them for a cluster with a planner"
            )

    def handle_outputs(self, outputs: list[RequestOutput]) -> None:
        DecodeWorker.handle_outputs(self, outputs)  # streams: requests it decodes
        PrefillWorker.handle_outputs(self, outputs)  # first tokens: prompts it prefills

    async def on_switch_role(self, msg: SwitchRole, inbound) -> RoleSwitched | Error:
        """Serve `msg.role` from now on: re-register in it; the old role's requests end here."""
        if msg.role not in ("prefill", "decode"):
            return Error(
                code="refused",
                message=f"SwitchRole.role {msg.role!r}: expected prefill or decode",
            )
        old = self.role
        draining = len(self.frontend_of) if old == "decode" else len(self.first_token)
        if msg.role != old:
            self.role = msg.role
            self.log = self.log.bind(role=msg.role)
            try:
                await self._register(role_switch=True)
            except (PeerDeadError, RemoteError, TimeoutError) as exc:
                self.role = old
                self.log = self.log.bind(role=old)
                return Error(code=ErrorCode.HANDLER_FAILED, message=f"re-registration: {exc}")
            self.log.info("role_switched", old=old, draining=draining, by=inbound.peer)
        return RoleSwitched(role=self.role, num_draining=draining if msg.role != old else 0)
