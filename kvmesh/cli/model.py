"""`kvmesh model …`: make and inspect model checkpoints."""

import click


@click.group()
def model() -> None:
    """Make and inspect model checkpoints (Hugging Face format directories)."""
