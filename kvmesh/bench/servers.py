"""`kvmesh bench serve peer`: kvmesh's servers against vLLM's OpenAI server, one client.

Each server is started on 127.0.0.1 in turn (alone on the machine), warmed up, then
driven by the same closed-loop client: `--requests` streamed chat completions of
`--input-tokens` words in / `--output-tokens` out (ignore_eos, greedy), at most
`--concurrency` in flight, `--repeat` rounds, the best round counting. The servers:

    vllm     vLLM's OpenAI server (vllm.entrypoints.openai.api_server, --enforce-eager),
             run by `--peer-python` or this interpreter when it imports vllm
    serve    `kvmesh serve`: one process
    up       `kvmesh up`: the default cluster for this machine (kvmesh.config.topology)
    engine   the in-process Engine on the same templated prompt ids and concurrency

Reported per server: output tokens/s (all completion tokens over the round's span),
TTFT mean (sent -> first content chunk), ITL mean (per request: first to last content
chunk over completion tokens - 1, as aiperf counts it), ready-after (start -> /v1/models
answers), and every ratio to vLLM's and the cluster's to the Engine's. A reply of other
than --output-tokens tokens, a prompt counted differently by two servers, or an error
fails the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from kvmesh.bench.chat_load import (
    ChatRecord,
    Workload,
    check,
    check_prompts,
    drive,
    make_workload,
    summarize,
)
from kvmesh.bench.engine import find_peer_python, peer_python_option
from kvmesh.models import resolve
from kvmesh.progress import Progress

SERVERS = ("vllm", "serve", "up")
RAISED = re.compile(r"\b\w+(Error|Exception): ")
# vLLM's CPU backend takes this share of the machine's memory for itself and refuses to
# start when that much is not free (0.92 by default): a shared machine has less free
VLLM_MEMORY = ("--gpu-memory-utilization", "0.25")
READY_TIMEOUT = 1200.0  # s: vLLM's first start on a busy 2-core machine takes minutes
WARM_ROUNDS = 2


class HTTPTarget:
    """A server under test, driven over HTTP."""

    def __init__(self, name: str, url: str, ready_s: float, pid: int, workload: Workload):
        import httpx

        self.name, self.url, self.ready_s, self.workload = name, url, ready_s, workload
        self.pid = pid
        self.model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

    def warm_up(self) -> None:
        """Rounds of other messages: first steps load kernels and grow buffers."""
        w = self.workload
        warm = [m[::-1] for m in w.messages[: w.concurrency]]
        for _ in range(WARM_ROUNDS):
            records, _ = asyncio.run(drive(self.url, self.model, warm, w.max_tokens, len(warm)))
            check(records, w, f"{self.name} warm-up")

    def measure(self) -> tuple[dict, int]:
        """One round of the workload: its summary and the prompt tokens counted."""
        w = self.workload
        before = tree_cpu_seconds(self.pid)
        records, seconds = asyncio.run(
            drive(self.url, self.model, w.messages, w.max_tokens, w.concurrency)
        )
        summary = summarize(records, seconds)
        summary["cpu_s"] = tree_cpu_seconds(self.pid) - before
        return summary, check(records, w, self.name)


# --- the servers ---


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds so far of process `root` and its live descendants."""
    from kvmesh.bench.serve import stat_fields

    parents, cpu = {}, {}
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat_fields(entry)
            parents[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, grew = {root}, True
    while grew:
        grown = tree | {pid for pid, parent in parents.items() if parent in tree}
        grew, tree = grown != tree, grown
    return sum(cpu.get(pid, 0.0) for pid in tree)


def free_port() -> int:
    from kvmesh.bench.cluster import free_port_range

    return free_port_range(1)


@contextlib.contextmanager
def server_process(command: list[str], port: int, log: Path, env: dict | None = None):
    """A server process; yields (url, seconds until /v1/models answered, its pid)."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if process.poll() is not None:
                raise click.ClickException(
                    f"{command[:4]} exited {process.returncode} (its log: {log}):\n"
                    + first_error(log.read_text())
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"{command[:4]} not ready in {READY_TIMEOUT} s (its log: {log})"
                )
            time.sleep(0.5)
        yield url, time.perf_counter() - start, process.pid
    finally:
        stop(process)


def first_error(log: str) -> str:
    """The log from its first raised exception on (the root cause, not the last
    re-raise), at most 3000 characters; its tail when it names none."""
    lines = log.splitlines()
    first = next((i for i, line in enumerate(lines) if RAISED.search(line)), None)
    return "\n".join(lines[first:])[:3000] if first is not None else log[-3000:]


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def running(server: str, model_dir: Path, tmp: Path, options: dict):
    """Server `server` serving model_dir; yields (url, ready-after seconds, root pid)."""
    from kvmesh.bench.cluster import start_cluster
    from kvmesh.bench.serve import FULL_POOL

    port, log = free_port(), tmp / f"{server}.log"
    if server == "vllm":
        command = [
            options["peer_python"],
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            *VLLM_MEMORY,
            *options["peer_args"],
        ]
        with server_process(command, port, log) as ready:
            yield ready
    elif server == "serve":
        command = [sys.executable, "-m", "kvmesh", "--log-level", "warning", "serve"]
        command += ["--model", str(model_dir), "--port", str(port), "--num-blocks", "4096"]
        with server_process(command, port, log) as ready:
            yield ready
    else:
        start = time.perf_counter()
        overrides = [FULL_POOL, *options["overrides"]]
        cluster = start_cluster(tmp, model_dir, *overrides, timeout=READY_TIMEOUT)
        try:
            yield cluster.url, time.perf_counter() - start, cluster.process.pid
        finally:
            cluster.stop()


# --- the in-process Engine ---


class EngineTarget:
    """The in-process Engine on the templated prompt ids, at the same concurrency."""

    name = "engine"

    def __init__(self, model_dir: Path, workload: Workload) -> None:
        from kvmesh.engine.engine import Engine

        start = time.perf_counter()
        self.engine = Engine.from_pretrained(str(model_dir), num_blocks=4096)
        self.ready_s = time.perf_counter() - start
        self.workload = workload
        # on a thread of its own, as AsyncEngine steps it in the servers: a busy machine
        # makes torch's threads cost the main thread several times the CPU per step
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")

    def close(self) -> None:
        self.thread.shutdown()

    def warm_up(self) -> None:
        w = self.workload
        warm = [ids[::-1] for ids in w.prompt_ids[: w.concurrency]]
        for _ in range(WARM_ROUNDS):
            self.thread.submit(
                engine_round, self.engine, warm, w.max_tokens, w.concurrency
            ).result()

    def measure(self) -> tuple[dict, int]:
        w = self.workload
        self.engine.pool.reset_prefix_cache()
        before = time.process_time()
        summary = self.thread.submit(
            engine_round, self.engine, w.prompt_ids, w.max_tokens, w.concurrency
        ).result()
        summary["cpu_s"] = time.process_time() - before
        return summary, sum(len(ids) for ids in w.prompt_ids)


def engine_round(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    from kvmesh.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending = list(reversed(prompts))
    added, first, done, tokens = {}, {}, {}, {}
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and len(added) - len(done) < concurrency:
            request_id = engine.add_request(pending.pop(), params)
            added[request_id] = time.perf_counter()
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
                tokens[out.request_id] = len(out.token_ids)
    seconds = time.perf_counter() - start
    short = [n for n in tokens.values() if n != max_tokens]
    if short:
        raise click.ClickException(f"engine: {len(short)} outputs of other than {max_tokens}")
    records = [
        ChatRecord(sent=added[r], first=first[r], last=done[r], usage={"completion_tokens": n})
        for r, n in tokens.items()
    ]
    return summarize(records, seconds)


# --- the run ---


def bench_peer(
    model_dir: Path,
    workload: Workload,
    servers: tuple[str, ...],
    repeat: int,
    options: dict,
) -> dict:
    result = {
        "model": str(model_dir),
        "requests": len(workload.messages),
        "input_words": len(workload.messages[0].split()),
        "output_tokens": workload.max_tokens,
        "concurrency": workload.concurrency,
        "repeat": repeat,
        "cpus": len(os.sched_getaffinity(0)),
        "servers": {},
    }
    tmp = tempfile.mkdtemp(prefix="kvmesh-bench-peer-")  # the servers' logs: kept on failure
    with contextlib.ExitStack() as stack:
        targets = []
        if "engine" in servers:
            with Progress("engine: loading"):
                engine = EngineTarget(model_dir, workload)
            stack.callback(engine.close)
            targets.append(engine)
        for server in (s for s in SERVERS if s in servers):
            if server == "vllm" and not options["peer_python"]:
                click.echo(
                    "vllm: not measured (this interpreter cannot import vllm; pass "
                    "--peer-python PATH)",
                    err=True,
                )
                continue
            with Progress(f"{server}: starting"):
                url, ready, pid = stack.enter_context(
                    running(server, model_dir, Path(tmp), options)
                )
            targets.append(HTTPTarget(server, url, ready, pid, workload))
        for target in targets:
            with Progress(f"{target.name}: warming up"):
                target.warm_up()
        rounds: dict[str, list] = {target.name: [] for target in targets}
        prompts: dict[str, int] = {}
        for k in range(repeat):  # interleaved: every target meets the same background
            for target in targets:
                with Progress(f"round {k + 1}/{repeat}: {target.name}"):
                    summary, prompts[target.name] = target.measure()
                rounds[target.name].append(summary)
    for target in targets:
        best = max(rounds[target.name], key=lambda r: r["output_tokens_per_s"])
        result["servers"][target.name] = {
            **best,
            "prompt_tokens": prompts[target.name],
            "ready_after_s": target.ready_s,
            "rounds": rounds[target.name],
        }
    shutil.rmtree(tmp, ignore_errors=True)
    check_prompts(result["servers"])
    result["ratios"] = ratios(result["servers"])
    return result


def ratios(servers: dict) -> dict:
    out = {}
    for base, names in (("vllm", ("serve", "up", "engine")), ("engine", ("up", "serve"))):
        for server in names:
            if base in servers and server in servers:
                a, b = servers[server], servers[base]
                out[f"{server}_vs_{base}"] = {
                    "output_tokens_per_s": a["output_tokens_per_s"] / b["output_tokens_per_s"],
                    "ttft_mean": a["ttft_mean_s"] / b["ttft_mean_s"],
                    "itl_mean": a["itl_mean_s"] / b["itl_mean_s"],
                }
    return out


# --- the command ---


@click.command("peer")
@click.option(
    "--model",
    "model_path",
    default=None,
    help=f"{resolve.HELP} [default: the tiny model].",
)
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Chat requests per round.",
)
@click.option(
    "--input-tokens",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Words (one token each) in each user message.",
)
@click.option(
    "--output-tokens",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Tokens each reply generates (ignore_eos).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Requests in flight at once (closed loop).",
)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Measured rounds per server; the best counts.",
)
@click.option(
    "--servers",
    "server_list",
    default="engine,vllm,serve,up",
    show_default=True,
    help="Comma-separated: engine, vllm, serve, up.",
)
@peer_python_option
@click.option(
    "--peer-arg",
    "peer_args",
    multiple=True,
    metavar="ARG",
    help="Extra argument for vLLM's server (repeatable), e.g. --peer-arg=--max-num-seqs=8.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Cluster override for `kvmesh up` (repeatable).",
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results to this JSON file.",
)
def peer_command(
    model_path,
    num_requests,
    input_tokens,
    output_tokens,
    concurrency,
    repeat,
    server_list,
    peer_python,
    peer_args,
    overrides,
    json_file,
) -> None:
    """kvmesh serve, kvmesh up and the Engine against vLLM's OpenAI server: streamed chat."""
    servers = tuple(s.strip() for s in server_list.split(",") if s.strip())
    unknown = [s for s in servers if s not in ("engine", *SERVERS)]
    if unknown or not servers:
        raise click.BadParameter(
            f"unknown server(s) {unknown}; allowed: engine, vllm, serve, up",
            param_hint="--servers",
        )
    try:
        model = resolve.resolve_model(model_path)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from exc
    workload = make_workload(model.path, num_requests, input_tokens, output_tokens, concurrency)
    options = {
        "peer_python": find_peer_python(peer_python),
        "peer_args": list(peer_args),
        "overrides": list(overrides),
    }
    result = bench_peer(model.path, workload, servers, repeat, options)
    click.echo(
        f"{result['requests']} chat requests, {input_tokens} words in / {output_tokens} "
        f"tokens out, concurrency {concurrency}, best of {repeat}, {result['cpus']} CPUs"
    )
    for server, r in result["servers"].items():
        click.echo(
            f"{server:7s} {r['output_tokens_per_s']:7.1f} output tok/s, TTFT mean "
            f"{r['ttft_mean_s']:6.2f} s, ITL mean {r['itl_mean_s'] * 1000:6.1f} ms, "
            f"{r['cpu_s'] * 1000 / r['output_tokens']:5.1f} CPU ms/token, "
            f"ready after {r['ready_after_s']:6.1f} s"
        )
    for pair, r in result["ratios"].items():
        click.echo(
            f"ratio {pair.replace('_vs_', ' / ')}: output tok/s "
            f"{r['output_tokens_per_s']:.2f}x, TTFT {r['ttft_mean']:.2f}x, "
            f"ITL {r['itl_mean']:.2f}x"
        )
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
