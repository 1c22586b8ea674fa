"""`kvmesh bench serve …`: whole clusters on 127.0.0.1 (`kvmesh up` in subprocesses),
driven over HTTP/SSE by this process, each against a baseline measured in the same run.

routing   Replays a Mooncake trace (kvmesh.bench.trace) open loop on a fresh cluster per
          policy, `kv` then the `round_robin` baseline, same seed and workload: TTFT
          (send -> first SSE chunk, client side) mean and p99, cached-token fraction
          (sum usage cached_tokens / sum prompt tokens), output tokens/s.
disagg    Inter-token latency of `--streams` long greedy decodes (gaps between SSE
          chunks, logprobs on so each chunk names its tokens) while seeded long prompts
          (short outputs) arrive every `--interval` s until the decodes end.
          Disaggregated (router.disagg_min_tokens=0: every prompt to the prefill
          worker) against aggregated (no prefill worker: decode workers prefill).
overhead  Output tokens/s of `--requests` greedy requests sent at once through HTTP ->
          frontend -> router -> workers, against the in-process Engine on the same
          requests, per decode-worker count; the cluster's texts and token counts must
          equal the Engine's.

Every request is a completion of token ids at temperature 0 with ignore_eos, so it
generates exactly max_tokens. Each cluster is warmed up first, then measured; the CPU
seconds every actor process (and this client) spent in the measured span are reported
(`cpu_s`, Linux /proc), since on a small machine the roles compete for the same cores.
Clusters get the `--set` overrides after the bench's own; `--threads N` sets
OMP_NUM_THREADS and NUMBA_NUM_THREADS for the cluster's processes (no config key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from unittest import mock

import click

from kvmesh.bench.cluster import DISAGGREGATED
from kvmesh.bench.trace import (
    StreamRecord,
    decode_under_prefill,
    random_prompt,
    random_workload,
    send_all,
    summarize_decodes,
    summarize_replay,
    warm_up,
)
from kvmesh.models import resolve
from kvmesh.progress import Progress

ROUTING_POLICIES = ("kv", "round_robin")  # measured, then the baseline
DISAGG_MODES = {  # measured, then the baseline; actors: frontend, router, prefill, decode
    "disaggregated": [*DISAGGREGATED, "router.disagg_min_tokens=0"],
    "aggregated": ["nodes.0.actors.2.count=0", "nodes.0.actors.3.count=2"],
}
PREFILL_COUNT, DECODE_COUNT = "nodes.0.actors.2.count", "nodes.0.actors.3.count"
START_ATTEMPTS, START_TIMEOUT = 3, 120.0  # a busy 2-core machine starts one in ~10 s
METRICS_LAG = 1.5  # s: worker totals reach /metrics via load reports and status polls
FULL_POOL = "kv.device_blocks=4096"  # a CPU worker's auto default; start_cluster's 512: tests


# --- clusters ---


@contextlib.contextmanager
def running_cluster(model_dir: Path, overrides: list[str], threads: int | None):
    """A fresh cluster, warmed up; yields (cluster, model name)."""
    import httpx

    from kvmesh.bench.cluster import start_cluster

    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp, thread_env(threads):
        for attempt in range(START_ATTEMPTS):
            try:
                with Progress("starting a cluster"):
                    cluster = start_cluster(Path(tmp), model_dir, *overrides, timeout=START_TIMEOUT)
                break
            except RuntimeError as exc:  # e.g. a port of the range taken before its bind
                if attempt + 1 == START_ATTEMPTS:
                    raise
                click.echo(f"warning: cluster did not start, retrying: {str(exc)[-300:]}", err=True)
        try:
            model = httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]
            with Progress("warming the cluster up"):
                warm = asyncio.run(warm_up(cluster.url, model, model_shape(model_dir)[0]))
            check_errors(warm, "warm-up")
            yield cluster, model
        finally:
            if cluster.stop() != 0:
                click.echo(
                    f"warning: cluster exited non-zero:\n{cluster.log.read_text()[-2000:]}",
                    err=True,
                )


def thread_env(threads: int | None):
    """Thread counts for the processes started inside (they inherit the environment)."""
    names = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
    return mock.patch.dict(os.environ, {name: str(threads) for name in names} if threads else {})


@contextlib.contextmanager
def measured(cluster):
    """Fills the yielded dict, on exit, with the span's wall seconds, CPU seconds per actor
    process and this client, and the cluster's remote prefills and KV bytes moved."""
    pids = actor_pids(cluster.process.pid)
    time.sleep(METRICS_LAG)
    before, metrics, t0 = cpu_seconds(pids), scrape(cluster.url), time.perf_counter()
    span: dict = {}
    yield span
    wall, after = time.perf_counter() - t0, cpu_seconds(pids)
    time.sleep(METRICS_LAG)
    now = scrape(cluster.url)
    span["wall_s"] = wall
    span["cpu_s"] = {name: round(after[name] - before[name], 3) for name in after if name in before}
    for name in ("remote_prefill_total", "kv_transfer_bytes_total"):
        span[name] = now.get(f"kvmesh_{name}", 0) - metrics.get(f"kvmesh_{name}", 0)


def actor_pids(launcher_pid: int) -> dict[str, int]:
    """Actor id -> pid of the children of `kvmesh up` (their last argument is the id)."""
    pids = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat_fields(entry)[1]) == launcher_pid:
                pids[(entry / "cmdline").read_bytes().split(b"\0")[-2].decode()] = int(entry.name)
    return pids


def stat_fields(proc: Path) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ... utime is [11], stime [12]."""
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each process so far, and of this one as "client"."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, IndexError):
            fields = stat_fields(Path(f"/proc/{pid}"))
            seconds[name] = (int(fields[11]) + int(fields[12])) / ticks
    me = os.times()
    seconds["client"] = me.user + me.system
    return seconds


def scrape(url: str) -> dict[str, float]:
    """The unlabeled samples of /metrics, by name."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def model_shape(model_dir: Path) -> tuple[int, int]:
    """(vocab size, context length)."""
    from kvmesh.gpu.model_config import ModelConfig

    config = ModelConfig.from_pretrained(model_dir)
    return config.vocab_size, config.max_model_len


def check_errors(records: list[StreamRecord], what: str) -> None:
    failed = [r.error for r in records if r.error]
    if failed:
        raise click.ClickException(
            f"{len(failed)}/{len(records)} {what} requests failed; first: {failed[0]}"
        )


# --- routing ---


def bench_routing(
    model_dir: Path,
    trace: Path,
    start: int,
    num_requests: int,
    speedup: float,
    tokens_per_hash: int,
    output_scale: int,
    seed: int,
    overrides: tuple[str, ...] = (),
    threads: int | None = None,
) -> dict:
    from kvmesh.bench.trace import cached_fraction_bound, load_trace, replay, synthesize

    vocab_size, max_model_len = model_shape(model_dir)
    workload = synthesize(
        load_trace(trace, start, num_requests),
        vocab_size=vocab_size,
        max_model_len=max_model_len,
        tokens_per_hash=tokens_per_hash,
        output_scale=output_scale,
        speedup=speedup,
        seed=seed,
    )
    requests = workload.requests
    result = {
        "trace": str(trace),
        "start": start,
        "requests": len(requests),
        "speedup": speedup,
        "tokens_per_hash": tokens_per_hash,
        "output_scale": output_scale,
        "seed": seed,
        "threads": threads,
        "overrides": list(overrides),
        "truncated_prompts": workload.truncated,
        "arrival_span_s": requests[-1].arrival_s,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "output_tokens": sum(r.max_tokens for r in requests),
        "cached_fraction_bound": cached_fraction_bound(requests, 16),
    }
    for policy in ROUTING_POLICIES:
        cluster_overrides = [
            FULL_POOL,
            *DISAGGREGATED,
            f"router.policy={policy}",
            f"router.seed={seed}",
            *overrides,
        ]
        with running_cluster(model_dir, cluster_overrides, threads) as (cluster, model):
            with measured(cluster) as span:
                streams, lag = asyncio.run(replay(cluster.url, model, requests))
        check_errors(streams, policy)
        result[policy] = {**summarize_replay(streams, requests), "send_lag_max_s": lag, **span}
    kv, rr = result["kv"], result["round_robin"]
    result["ratio_kv_vs_round_robin"] = {
        "ttft_mean": kv["ttft_mean_s"] / rr["ttft_mean_s"],
        "ttft_p99": kv["ttft_p99_s"] / rr["ttft_p99_s"],
        "output_tokens_per_s": kv["output_tokens_per_s"] / rr["output_tokens_per_s"],
    }
    return result


# --- disagg ---


def bench_disagg(
    model_dir: Path,
    num_streams: int,
    stream_tokens: int,
    stream_prompt: int,
    long_lens: tuple[int, int],
    long_output: int,
    interval: float,
    seed: int,
    overrides: tuple[str, ...] = (),
    threads: int | None = None,
) -> dict:
    vocab_size, _ = model_shape(model_dir)
    rng = random.Random(seed)
    stream_prompts = [random_prompt(rng, stream_prompt, vocab_size) for _ in range(num_streams)]
    long_prompts = [random_prompt(rng, rng.randint(*long_lens), vocab_size) for _ in range(1000)]
    result = {
        "streams": num_streams,
        "stream_tokens": stream_tokens,
        "stream_prompt_tokens": stream_prompt,
        "long_prompt_lens": list(long_lens),
        "long_output_tokens": long_output,
        "interval_s": interval,
        "seed": seed,
        "threads": threads,
        "overrides": list(overrides),
    }
    for mode, mode_overrides in DISAGG_MODES.items():
        with running_cluster(model_dir, [FULL_POOL, *mode_overrides, *overrides], threads) as (
            cluster,
            model,
        ):
            with measured(cluster) as span:
                streams, longs = asyncio.run(
                    decode_under_prefill(
                        cluster.url,
                        model,
                        stream_prompts,
                        stream_tokens,
                        long_prompts,
                        long_output,
                        interval,
                    )
                )
        check_errors(streams, f"{mode} decode")
        check_errors(longs, f"{mode} long-prompt")
        result[mode] = {**summarize_decodes(streams, longs), **span}
    dis, agg = result["disaggregated"], result["aggregated"]
    result["ratio_disagg_vs_agg"] = {
        "itl_p99": dis["itl_p99_s"] / agg["itl_p99_s"],
        "itl_mean": dis["itl_mean_s"] / agg["itl_mean_s"],
    }
    return result


# --- overhead ---


def load_engine(model_dir: Path, threads: int | None):
    """The in-process Engine with the workers' pool and batch settings, warmed up."""
    import numba
    import torch

    from kvmesh.bench.engine import run_engine
    from kvmesh.engine.engine import Engine

    if threads:
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
    engine = Engine.from_pretrained(str(model_dir), num_blocks=4096)
    run_engine(engine, random_workload(engine.config.vocab_size, -1, 4, (32, 512), (8, 8)))
    return engine, torch.get_num_threads()


def engine_pass(engine, workload) -> dict:
    """Every request added at once (kvmesh.bench.engine.run_engine), from a cold cache."""
    from kvmesh.bench.engine import run_engine

    engine.pool.reset_prefix_cache()
    cpu = time.process_time()
    run = run_engine(engine, workload)
    return {
        "seconds": run["seconds"],
        "cpu_s": time.process_time() - cpu,
        "ttft_mean_s": run["ttft_mean_s"],
        "outputs": run["outputs"],
    }


def compare(engine, ours: list[list[int]], streams: list[StreamRecord]) -> list[dict]:
    """Requests whose cluster text or token count differs from the Engine's."""
    return [
        {
            "request": i,
            "engine_tokens": len(ids),
            "tokens": s.usage["completion_tokens"],
            "text_equal": s.text == engine.tokenizer.decode(ids),
        }
        for i, (ids, s) in enumerate(zip(ours, streams, strict=True))
        if s.text != engine.tokenizer.decode(ids) or s.usage["completion_tokens"] != len(ids)
    ]


def bench_overhead(
    model_dir: Path,
    num_requests: int,
    prompt_lens: tuple[int, int],
    output_lens: tuple[int, int],
    decode_workers: tuple[int, ...],
    seed: int,
    repeat: int,
    overrides: tuple[str, ...] = (),
    threads: int | None = None,
) -> dict:
    """Per cluster: `repeat` rounds, each the Engine then the cluster on one fresh workload
    (seed + round), so both meet the same background load; the best round of each counts."""
    vocab_size, _ = model_shape(model_dir)
    workloads = [
        random_workload(vocab_size, seed + r, num_requests, prompt_lens, output_lens)
        for r in range(repeat)
    ]
    engine, engine_threads = load_engine(model_dir, threads)
    result = {
        "requests": num_requests,
        "repeat": repeat,
        "seed": seed,
        "threads": threads,
        "engine_threads": engine_threads,
        "overrides": list(overrides),
        "clusters": {},
    }
    for count in decode_workers:
        rounds = []
        with running_cluster(
            model_dir,
            [FULL_POOL, f"{PREFILL_COUNT}=1", f"{DECODE_COUNT}={count}", *overrides],
            threads,
        ) as (cluster, model):
            for workload in workloads:
                ours = engine_pass(engine, workload)
                with measured(cluster) as span:
                    streams = asyncio.run(send_all(cluster.url, model, workload))
                check_errors(streams, f"{count}_decode")
                output = sum(n for _, n in workload)
                seconds = max(s.end for s in streams) - min(s.sent for s in streams)
                rounds.append(
                    {
                        "output_tokens": output,
                        "engine_tokens_per_s": output / ours["seconds"],
                        "engine_cpu_s": ours["cpu_s"],
                        "engine_ttft_mean_s": ours["ttft_mean_s"],
                        "tokens_per_s": output / seconds,
                        "ttft_mean_s": sum(s.ttft for s in streams) / len(streams),
                        "mismatches": compare(engine, ours["outputs"], streams),
                        **span,
                    }
                )
        best = max(rounds, key=lambda r: r["tokens_per_s"])
        best_engine = max(r["engine_tokens_per_s"] for r in rounds)
        result["clusters"][f"{count}_decode"] = {
            "tokens_per_s": best["tokens_per_s"],
            "engine_tokens_per_s": best_engine,
            "ratio_vs_engine": best["tokens_per_s"] / best_engine,
            "outputs_equal_engine": repeat * num_requests
            - sum(len(r["mismatches"]) for r in rounds),
            "outputs": repeat * num_requests,
            "rounds": rounds,
        }
    return result


# --- plots ---


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise click.ClickException("--plot needs matplotlib: pip install 'kvmesh[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(ax, values: list[float], label: str) -> None:
    x = sorted(values)
    ax.plot(x, [(i + 1) / len(x) for i in range(len(x))], label=label)


def plot_routing(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (cdf, over_time) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in ROUTING_POLICIES:
        run = result[policy]
        label = (
            f"{policy}: mean {run['ttft_mean_s'] * 1000:.0f} ms, "
            f"{run['cached_fraction']:.0%} cached"
        )
        plot_cdf(cdf, run["samples"]["ttft_s"], label)
        over_time.scatter(run["samples"]["sent_s"], run["samples"]["ttft_s"], s=4, label=policy)
    cdf.set(
        xscale="log",
        xlabel="TTFT (s)",
        ylabel="fraction of requests",
        title=f"Mooncake trace, {result['requests']} requests, x{result['speedup']:g}",
    )
    over_time.set(yscale="log", xlabel="sent at (s)", ylabel="TTFT (s)", title="TTFT over the run")
    cdf.legend()
    over_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_disagg(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in DISAGG_MODES:
        run = result[mode]
        plot_cdf(ax, run["samples"]["itl_s"], f"{mode}: p99 {run['itl_p99_s'] * 1000:.0f} ms")
    ax.set(
        xscale="log",
        xlabel="inter-token latency (s)",
        ylabel="fraction of tokens",
        title=f"{result['streams']} decodes under long prompts every {result['interval_s']} s",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_overhead(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, c in enumerate(result["clusters"].values()):
        for x, key in ((2 * k, "engine_tokens_per_s"), (2 * k + 1, "tokens_per_s")):
            rates = [r[key] for r in c["rounds"]]
            ax.bar(x, max(rates), color="C0" if key.startswith("engine") else "C1")
            ax.scatter([x] * len(rates), rates, color="k", s=8, zorder=3)
    ax.set_xticks(
        range(2 * len(result["clusters"])),
        [
            label
            for name in result["clusters"]
            for label in ("Engine", f"cluster\n{name.replace('_', ' ')}")
        ],
    )
    ax.set(
        ylabel="output tokens/s (bar: best round)",
        title=f"{result['requests']} requests at once, greedy",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- commands ---


def write(result: dict, json_file: str | None, plot_file: str | None, plot) -> None:
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
    if plot_file:
        plot(result, plot_file)


def model_dir(model_path: str | None) -> Path:
    """The directory --model names, resolved once (kvmesh.models.resolve) for the run's
    clusters and in-process engines."""
    try:
        return resolve.resolve_model(model_path).path
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from exc


def common_options(func):
    for option in reversed(
        [
            click.option(
                "--model",
                "model_path",
                default=None,
                help=f"{resolve.HELP} [default: the tiny model].",
            ),
            click.option("--seed", default=0, show_default=True, help="Workload seed."),
            click.option(
                "--set",
                "overrides",
                multiple=True,
                metavar="KEY=VALUE",
                help="Extra cluster override for every cluster of the run (repeatable).",
            ),
            click.option(
                "--threads",
                type=click.IntRange(1),
                default=None,
                help="Threads per worker process (OMP_NUM_THREADS, NUMBA_NUM_THREADS) "
                "and for an in-process Engine [default: torch's choice].",
            ),
            click.option(
                "--json",
                "json_file",
                type=click.Path(dir_okay=False),
                default=None,
                help="Also write the results to this JSON file.",
            ),
            click.option(
                "--plot",
                "plot_file",
                type=click.Path(dir_okay=False),
                default=None,
                help="Also draw the results into this PNG file.",
            ),
        ]
    ):
        func = option(func)
    return func


def int_pair(ctx, param, value: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected LOW,HIGH (two integers), got {value!r}") from None
    if not 1 <= low <= high:
        raise click.BadParameter(f"expected 1 <= LOW <= HIGH, got {value!r}")
    return low, high


@click.group("serve")
def serve_group() -> None:
    """Whole clusters on 127.0.0.1, each against a baseline measured in the same run."""


@serve_group.command("routing")
@common_options
@click.option(
    "--trace",
    type=click.Path(dir_okay=False),
    default=None,
    help="Mooncake JSONL trace [default: the packaged kvmesh/bench/traces/mooncake_like.jsonl].",
)
@click.option("--start", default=0, show_default=True, help="Trace requests to skip first.")
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1),
    default=300,
    show_default=True,
    help="Trace requests to replay.",
)
@click.option(
    "--speedup",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    help="Arrival times are divided by this.",
)
@click.option(
    "--tokens-per-hash",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Prompt tokens per trace hash id (one 512-token block of the trace).",
)
@click.option(
    "--output-scale",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Output lengths are divided by this (at least 4 tokens).",
)
def routing_command(
    model_path,
    seed,
    overrides,
    threads,
    json_file,
    plot_file,
    trace,
    start,
    num_requests,
    speedup,
    tokens_per_hash,
    output_scale,
) -> None:
    """KV-aware routing vs round robin on a replayed Mooncake trace: TTFT, cache hits."""
    from kvmesh.bench.trace import default_trace_path

    trace = Path(trace) if trace else default_trace_path()
    if not trace.is_file():
        raise click.BadParameter(
            f"{trace} does not exist; pass a Mooncake JSONL trace", param_hint="--trace"
        )
    result = bench_routing(
        model_dir(model_path),
        trace,
        start,
        num_requests,
        speedup,
        tokens_per_hash,
        output_scale,
        seed,
        overrides,
        threads,
    )
    click.echo(
        f"{result['requests']} requests from {trace.name}[{start}:], x{speedup:g}: "
        f"{result['prompt_tokens']} prompt tokens, {result['output_tokens']} output, "
        f"over {result['arrival_span_s']:.1f} s; at most "
        f"{result['cached_fraction_bound']:.0%} of prompt tokens cacheable"
    )
    for policy in ROUTING_POLICIES:
        r = result[policy]
        click.echo(
            f"{policy:12s} TTFT mean {r['ttft_mean_s'] * 1000:7.1f} ms, p99 "
            f"{r['ttft_p99_s'] * 1000:7.1f} ms; cached {r['cached_fraction']:5.1%}; "
            f"{r['output_tokens_per_s']:6.1f} output tok/s; "
            f"{r['remote_prefill_total']:.0f} remote prefills"
        )
    ratio = result["ratio_kv_vs_round_robin"]
    click.echo(
        f"ratio kv / round_robin: TTFT mean {ratio['ttft_mean']:.2f}x, "
        f"p99 {ratio['ttft_p99']:.2f}x, output tok/s {ratio['output_tokens_per_s']:.2f}x"
    )
    write(result, json_file, plot_file, plot_routing)
    check_lengths(result)


def check_lengths(result: dict) -> None:
    """Every replayed request ignores EOS and fits the context, so a reply of other than
    max_tokens tokens is a lost or invented token: the run fails, whatever its speed."""
    short = {
        policy: result[policy]["short_outputs"]
        for policy in ROUTING_POLICIES
        if result[policy]["short_outputs"]
    }
    if short:
        rows = "; ".join(
            f"{policy}: {len(rows)} requests, first {rows[:3]}" for policy, rows in short.items()
        )
        raise click.ClickException(
            f"replies of other than max_tokens tokens (a correctness bug): {rows}"
        )


@serve_group.command("disagg")
@common_options
@click.option(
    "--streams",
    "num_streams",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Long-running decodes measured.",
)
@click.option(
    "--stream-tokens",
    type=click.IntRange(2),
    default=1000,
    show_default=True,
    help="Tokens each decode generates.",
)
@click.option(
    "--stream-prompt",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Prompt tokens of each decode.",
)
@click.option(
    "--long-prompts",
    "long_lens",
    default="1000,3000",
    show_default=True,
    callback=int_pair,
    help="LOW,HIGH: long prompt lengths, uniform.",
)
@click.option(
    "--long-output",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Tokens each long prompt generates.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=0.5,
    show_default=True,
    help="Seconds between long prompts.",
)
def disagg_command(
    model_path,
    seed,
    overrides,
    threads,
    json_file,
    plot_file,
    num_streams,
    stream_tokens,
    stream_prompt,
    long_lens,
    long_output,
    interval,
) -> None:
    """Decode inter-token latency under arriving long prompts: disaggregated vs not."""
    result = bench_disagg(
        model_dir(model_path),
        num_streams,
        stream_tokens,
        stream_prompt,
        long_lens,
        long_output,
        interval,
        seed,
        overrides,
        threads,
    )
    for mode in DISAGG_MODES:
        r = result[mode]
        click.echo(
            f"{mode:14s} ITL p50 {r['itl_p50_s'] * 1000:6.1f} ms, p99 "
            f"{r['itl_p99_s'] * 1000:6.1f} ms, max {r['itl_max_s'] * 1000:6.1f} ms; "
            f"{r['decode_tokens_per_s']:6.1f} decode tok/s; {r['long_prompts_sent']} "
            f"long prompts, their TTFT mean {r['long_ttft_mean_s'] * 1000:.0f} ms; "
            f"{r['remote_prefill_total']:.0f} remote prefills"
        )
    ratio = result["ratio_disagg_vs_agg"]
    click.echo(
        f"ratio disaggregated / aggregated: ITL p99 {ratio['itl_p99']:.2f}x, "
        f"mean {ratio['itl_mean']:.2f}x"
    )
    write(result, json_file, plot_file, plot_disagg)


@serve_group.command("overhead")
@common_options
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Requests, all sent at once.",
)
@click.option(
    "--prompt-lens",
    default="32,512",
    show_default=True,
    callback=int_pair,
    help="LOW,HIGH: prompt lengths, uniform.",
)
@click.option(
    "--output-lens",
    default="32,128",
    show_default=True,
    callback=int_pair,
    help="LOW,HIGH: output lengths, uniform.",
)
@click.option(
    "--decode-workers",
    default="2,1",
    show_default=True,
    help="Comma-separated decode-worker counts: one cluster each.",
)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Rounds of Engine then cluster; the best of each counts.",
)
def overhead_command(
    model_path,
    seed,
    overrides,
    threads,
    json_file,
    plot_file,
    num_requests,
    prompt_lens,
    output_lens,
    decode_workers,
    repeat,
) -> None:
    """Output tokens/s through the whole cluster vs the in-process Engine, same requests."""
    try:
        counts = tuple(int(c) for c in decode_workers.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected integers like 2,1, got {decode_workers!r}", param_hint="--decode-workers"
        ) from None
    result = bench_overhead(
        model_dir(model_path),
        num_requests,
        prompt_lens,
        output_lens,
        counts,
        seed,
        repeat,
        overrides,
        threads,
    )
    click.echo(f"{num_requests} requests at once, best of {repeat} rounds")
    for name, c in result["clusters"].items():
        click.echo(
            f"{name.replace('_', ' ')}: cluster {c['tokens_per_s']:7.1f} tok/s, Engine "
            f"{c['engine_tokens_per_s']:7.1f} tok/s, ratio {c['ratio_vs_engine']:.2f}x; "
            f"outputs equal to the Engine's: {c['outputs_equal_engine']}/{c['outputs']}"
        )
    write(result, json_file, plot_file, plot_overhead)
