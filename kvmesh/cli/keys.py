"""`kvmesh keys …`: the CurveZMQ keys that secure actor sockets."""

from pathlib import Path

import click


@click.group()
def keys() -> None:
    """CurveZMQ keys: one cluster keypair that every actor of a cluster reads."""


@keys.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing keypair in DIRECTORY.")
def generate(directory: Path, force: bool) -> None:
    """Write the cluster keypair into DIRECTORY: cluster.key (public) and
    cluster.key_secret (owner-only). Give every actor the same directory (key_dir)."""
    from kvmesh.transport.messaging import generate_keys

    try:
        public, secret = generate_keys(directory, force=force)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc}; pass --force to replace it") from None
    click.echo(f"wrote {public} (public) and {secret} (secret, mode 600)")
