"""`kvmesh bench …`: benchmarks that print a ratio against a baseline measured in the
same run, plus JSON results. The commands live in kvmesh.bench.*."""

import click

from kvmesh.bench.engine import engine_command


@click.group()
def bench() -> None:
    """Benchmarks: each measures kvmesh and a baseline in the same run."""


bench.add_command(engine_command)
