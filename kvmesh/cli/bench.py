"""`kvmesh bench …`: benchmarks that print a ratio against a baseline measured in the
same run, plus JSON results. The commands live in kvmesh.bench.*."""

import click

from kvmesh.bench.engine import engine_command
from kvmesh.bench.lora import lora_command
from kvmesh.bench.planner import planner_command
from kvmesh.bench.router_index import index_command
from kvmesh.bench.scale import scale_group
from kvmesh.bench.serve import serve_group
from kvmesh.bench.servers import peer_command
from kvmesh.bench.stress import stress_command
from kvmesh.bench.tiers import tiers_command
from kvmesh.bench.transfer import transfer_command


@click.group()
def bench() -> None:
    """Benchmarks: each measures kvmesh and a baseline in the same run."""


bench.add_command(engine_command)
bench.add_command(lora_command)
bench.add_command(transfer_command)
bench.add_command(index_command)
serve_group.add_command(peer_command)
bench.add_command(serve_group)
bench.add_command(tiers_command)
bench.add_command(stress_command)
bench.add_command(planner_command)
bench.add_command(scale_group)
