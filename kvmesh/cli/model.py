"""`kvmesh model …`: make and inspect model checkpoints."""

import click


@click.group()
def model() -> None:
    """Make and inspect model checkpoints (Hugging Face format directories)."""


@model.command("init-tiny")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, writable=True))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def init_tiny(directory: str, seed: int) -> None:
    """Write the ~4M-parameter tiny Llama (random weights, local tokenizer) into DIR."""
    from kvmesh.gpu import tiny

    path = tiny.init_tiny(directory, seed)
    click.echo(f"{path}  ({tiny.num_parameters():,} parameters, seed {seed})")
