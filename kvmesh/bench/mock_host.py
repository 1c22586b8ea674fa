"""Many mock workers in one process: every prefill and decode actor of one node of a
cluster whose model.engine is "mock", each with its own identity, sockets, heartbeats,
engine thread, KV events and load reports, served on one event loop.

    python -m kvmesh.bench.mock_host --config cluster.toml --node mocks [--set K=V ...]
        [--scale S]

A worker actor is the same class `kvmesh actor` runs (kvmesh.actors.roles.build_actor);
only the process is shared, so a thousand of them fit on a few cores. It prints
"ready N" once all N have registered with the router, and serves until SIGTERM/SIGINT,
then closes every worker (each says Goodbye). Give the node an ipc_dir (cluster.ipc_dir):
two sockets per worker would otherwise take two TCP ports each.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys

import structlog

from kvmesh.actors.base import Actor
from kvmesh.config import ClusterConfig, load_config
from kvmesh.engine.mock import MockTiming

log = structlog.get_logger(__name__)
WORKER_ROLES = ("prefill", "decode")
START_BATCH = 50  # workers started at once: a thousand connecting together floods the router


def node_workers(
    cfg: ClusterConfig, node: str, timing: MockTiming | None, load_report_interval: float = 0.5
) -> list[Actor]:
    """The worker actors of `node`, built as `kvmesh actor` builds them; ValueError when
    the node has none or the cluster's engine is not the mock."""
    from kvmesh.actors.roles import build_actor

    if cfg.model.engine != "mock":
        raise ValueError(
            f'model.engine is {cfg.model.engine!r}: a mock host runs model.engine = "mock" only'
        )
    specs = [a for a in cfg.actors if a.node == node and a.role in WORKER_ROLES]
    if not specs:
        names = ", ".join(n.name for n in cfg.nodes)
        raise ValueError(f"node {node!r} has no prefill or decode actor (nodes: {names})")
    # build_actor costs ~30 ms (it reads the model's files): once per role, then copies
    templates = {}
    actors = []
    for spec in specs:
        template = templates.get(spec.role)
        if template is None:
            template = templates[spec.role] = build_actor(cfg, spec.actor_id)
        settings = dataclasses.replace(
            template.settings,
            endpoint=spec.bind,
            events_endpoint=spec.events_bind,
            max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            mock_timing=timing,
            load_report_interval=load_report_interval,
        )
        config = dataclasses.replace(template.config, actor_id=spec.actor_id)
        actors.append(type(template)(config, settings))
    return actors


async def host(actors: list[Actor], ready=None) -> None:
    """Start the actors, START_BATCH at a time; call ready() once all run; serve until
    SIGTERM/SIGINT; close them all."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[Actor] = []
    try:
        for at in range(0, len(actors), START_BATCH):
            batch = actors[at : at + START_BATCH]
            await asyncio.gather(*(a.start() for a in batch))
            started += batch
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        await asyncio.gather(*(a.close() for a in started), return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmesh.bench.mock_host")
    parser.add_argument("--config", required=True, help="cluster.toml")
    parser.add_argument("--node", required=True, help="the node whose workers to host")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--scale", type=float, default=None, help="MockTiming.scale")
    parser.add_argument(
        "--load-report-interval",
        type=float,
        default=0.5,
        help="seconds between a worker's periodic load reports (it also reports each change)",
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    from kvmesh.log import configure

    configure(args.log_level)
    cfg = load_config(args.config, args.overrides)
    timing = MockTiming(scale=args.scale) if args.scale is not None else None
    actors = node_workers(cfg, args.node, timing, args.load_report_interval)

    def ready() -> None:
        print(f"ready {len(actors)}", flush=True)

    asyncio.run(host(actors, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
