"""`kvmesh keys …`: the CurveZMQ keys that say which process is which actor."""

from pathlib import Path

import click

from kvmesh.cli.cluster import CONFIG_OPTIONS


@click.group()
def keys() -> None:
    """CurveZMQ keys: one keypair per actor of a cluster, and one per operator.

    A cluster with `security.key_dir` set admits on its actor sockets only the holders
    of these keys, each as the one actor (and role) its key names."""


@keys.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@CONFIG_OPTIONS[0]
@CONFIG_OPTIONS[1]
@click.option(
    "--operator",
    "operators",
    multiple=True,
    metavar="NAME",
    help="Another operator key besides `operator` (the one `kvmesh status` "
    "uses), e.g. one per person; repeatable.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace keys that exist (cuts off every process holding the old ones).",
)
@click.option(
    "--slurm",
    is_flag=True,
    help="For the actors of this Slurm job's cluster (as `kvmesh up --slurm` makes it): "
    "run in the batch script, before srun.",
)
def generate(directory: Path, config_path, overrides, operators, force: bool, slurm) -> None:
    """Write a keypair for every actor of the cluster into DIRECTORY.

    Each actor gets NAME.key (public) and NAME.key_secret (mode 600), NAME being its id
    (decode-0, ...). In a cluster with a planner, workers' keys name the role "worker",
    which the planner may switch between prefill and decode. Without --config: every
    actor of the full default node (1 prefill, 2 decode), also where `kvmesh up` runs
    one worker on a small machine. Keys already there are kept, so after adding nodes to
    cluster.toml, running this again writes only the new actors' keys.

    To distribute: every node needs every .key file, and the .key_secret files of the
    actors it runs (plus operator.key_secret where `kvmesh status` runs). Running actors
    pick up public keys added later without a restart.
    """
    from kvmesh.cli.cluster import load
    from kvmesh.transport.keys import OPERATOR, check_name, generate

    # without a cluster.toml: keys for the full default node (1 prefill + 2 decode), not
    # the one worker `kvmesh up` runs on a small machine, so --set can ask for more later
    cfg, _ = load(config_path, overrides, None, None, fit_machine=False)
    if slurm:
        from kvmesh.config import ConfigError
        from kvmesh.config.slurm import cluster_for, discover

        try:
            cfg = cluster_for(cfg, discover())
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc
    try:
        identities = [(spec.actor_id, key_role(cfg, spec.role)) for spec in cfg.actors]
        identities += [(check_name(name), OPERATOR) for name in (OPERATOR, *operators)]
        written = generate(directory, identities, force=force)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    kept = [name for name, _ in identities if name not in written]
    click.echo(f"wrote {len(written)} keypair(s) into {directory}: {', '.join(written) or '-'}")
    if kept:
        click.echo(f"kept {len(kept)} existing: {', '.join(kept)} (--force replaces them)")


def key_role(cfg, role: str) -> str:
    """The role a key names: a worker of a cluster with a planner gets a "worker" key,
    which admits it in both worker roles (the planner switches between them)."""
    from kvmesh.transport.keys import SWITCHING, SWITCHING_ROLES

    planner = any(spec.role == "planner" for spec in cfg.actors)
    return SWITCHING if planner and role in SWITCHING_ROLES else role
