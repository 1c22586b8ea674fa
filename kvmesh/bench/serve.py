"""`kvmesh bench serve …`: whole clusters on 127.0.0.1 (`kvmesh up` in subprocesses),
driven over HTTP/SSE by this process, each against a baseline measured in the same run.

routing   Replays a Mooncake trace (kvmesh.bench.trace) open-loop on a fresh cluster per
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

Every request is a completion of token ids with temperature 0 and ignore_eos, so it
generates exactly max_tokens. Clusters get `--set` overrides after the bench's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # httpx and numpy load inside the commands: `kvmesh --help` stays instant
    import httpx

ROUTING_POLICIES = ("kv", "round_robin")  # measured, then the baseline
PREFILL_COUNT, DECODE_COUNT = "nodes.0.actors.2.count", "nodes.0.actors.3.count"
FULL_POOL = "kv.device_blocks=4096"  # cluster.toml's default; start_cluster's 512 is for tests


# --- one streamed request, as the client sees it ---

@dataclass
class StreamRecord:
    """One streamed completion: when it was sent, when each chunk came and how many
    tokens it carried (perf_counter seconds), its text and usage, or its error."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    text: str = ""
    usage: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.sent

    @property
    def end(self) -> float:
        return self.chunks[-1][0]

    def token_gaps(self) -> list[float]:
        """Seconds between successive tokens; a chunk of n tokens splits its gap n ways."""
        gaps = []
        for (before, _), (at, n) in zip(self.chunks, self.chunks[1:]):
            gaps += [(at - before) / n] * n
        return gaps


async def stream_completion(http: httpx.AsyncClient, model: str, prompt: list[int],
                            max_tokens: int, logprobs: bool = False,
                            record: StreamRecord | None = None) -> StreamRecord:
    """Stream one completion into `record` (a new one by default, else the caller's, which
    it can watch while the request runs); failures land in record.error."""
    import httpx

    from kvmesh.client import COMPLETIONS, DONE, APIError, chunk_deltas, error_of, event_data

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if logprobs:  # then every token is sent, and each chunk says how many it holds
        body["logprobs"] = 0
    record = record or StreamRecord(sent=0.0)
    record.sent = time.perf_counter()
    try:
        async with http.stream("POST", COMPLETIONS, json=body) as response:
            if response.is_error:
                await response.aread()
                raise error_of(response)
            async for line in response.aiter_lines():
                data = event_data(line)
                if data is DONE:
                    break
                if data is None:
                    continue
                now = time.perf_counter()
                for choice in chunk_deltas(COMPLETIONS, data):
                    n = len(choice.logprobs["tokens"]) if choice.logprobs else int(bool(choice.text))
                    if n:
                        record.chunks.append((now, n))
                    record.text += choice.text
                record.usage = data.get("usage") or record.usage
    except (APIError, httpx.HTTPError) as exc:
        record.error = str(exc) or repr(exc)
    if record.error is None and not record.chunks:
        record.error = "no tokens streamed"
    return record


def http_client(url: str) -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=600.0,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


def random_prompt(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(16, vocab_size) for _ in range(n)]


async def warm_up(url: str, model: str, vocab_size: int) -> None:
    """Short and long prompts, local and remote prefill, on every worker (tokens unrelated
    to any workload): first steps load kernels and grow buffers.

    The first requests are staggered, each sent once the one before has its first token
    and still running (so load steers the next elsewhere): a fresh frontend or decode
    worker connects to a peer on first use, and two requests racing to do that fail with
    "socket ... is already open" (a cluster bug this bench steps around)."""
    rng = random.Random("warm-up")
    lengths = (300, 1200, 300, 2500)
    async with http_client(url) as http:
        tasks, records = [], [StreamRecord(sent=0.0) for _ in lengths]
        for n, record in zip(lengths, records):
            tasks.append(asyncio.ensure_future(stream_completion(
                http, model, random_prompt(rng, n, vocab_size), 32, record=record)))
            while not (record.chunks or tasks[-1].done()):
                await asyncio.sleep(0.005)
        records += await asyncio.gather(*tasks, *(
            stream_completion(http, model, random_prompt(rng, n, vocab_size), 8)
            for n in (40, 300, 1200, 2500)))
    check_errors(records, "warm-up")


# --- clusters ---

@contextlib.contextmanager
def running_cluster(model_dir: Path, overrides: list[str]):
    """A fresh cluster (frontend, router, workers as subprocesses); yields (cluster, model)."""
    import httpx

    from kvmesh.bench.cluster import start_cluster

    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp:
        cluster = start_cluster(Path(tmp), model_dir, *overrides)
        try:
            model = httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]
            yield cluster, model
        finally:
            if cluster.stop() != 0:
                click.echo(f"warning: cluster exited non-zero:\n{cluster.log.read_text()[-2000:]}",
                           err=True)


def scrape(url: str) -> dict[str, float]:
    """The unlabeled samples of /metrics, by name."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metric_deltas(before: dict, after: dict) -> dict[str, float]:
    names = ("kvmesh_remote_prefill_total", "kvmesh_kv_transfer_bytes_total")
    return {name.removeprefix("kvmesh_"): after.get(name, 0) - before.get(name, 0)
            for name in names}


def model_shape(model_dir: Path) -> tuple[int, int]:
    from kvmesh.gpu.model_config import ModelConfig

    config = ModelConfig.from_pretrained(model_dir)
    return config.vocab_size, config.max_model_len


def stats(values: list[float], prefix: str) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values)
    return {f"{prefix}_mean_s": float(a.mean()), f"{prefix}_p50_s": float(np.percentile(a, 50)),
            f"{prefix}_p99_s": float(np.percentile(a, 99)), f"{prefix}_max_s": float(a.max())}


def check_errors(records: list[StreamRecord], what: str) -> None:
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)}/{len(records)} {what} requests failed; "
                           f"first: {failed[0]}")


# --- routing ---

async def replay(url: str, model: str, requests) -> tuple[list[StreamRecord], float]:
    """Send each request at its arrival time (open loop); also the worst send delay."""
    async with http_client(url) as http:
        t0 = time.perf_counter() + 0.2
        lags = []

        async def one(request):
            await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
            lags.append(time.perf_counter() - t0 - request.arrival_s)
            return await stream_completion(http, model, request.prompt_token_ids,
                                           request.max_tokens)

        records = await asyncio.gather(*(one(r) for r in requests))
    return records, max(lags)


def summarize_replay(records: list[StreamRecord], t0: float) -> dict:
    usage = [r.usage for r in records]
    prompt = sum(u["prompt_tokens"] for u in usage)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    output = sum(u["completion_tokens"] for u in usage)
    seconds = max(r.end for r in records) - min(r.sent for r in records)
    ttft = [r.ttft for r in records]
    return {"requests": len(records), **stats(ttft, "ttft"),
            "e2e_mean_s": sum(r.end - r.sent for r in records) / len(records),
            "prompt_tokens": prompt, "cached_tokens": cached, "cached_fraction": cached / prompt,
            "output_tokens": output, "seconds": seconds, "output_tokens_per_s": output / seconds,
            "samples": {"sent_s": [round(r.sent - t0, 4) for r in records],
                        "ttft_s": [round(t, 5) for t in ttft],
                        "cached_tokens": [u["prompt_tokens_details"]["cached_tokens"]
                                          for u in usage]}}


def bench_routing(model_dir: Path, trace: Path, start: int, num_requests: int, speedup: float,
                  tokens_per_hash: int, output_scale: int, seed: int,
                  overrides: tuple[str, ...] = ()) -> dict:
    from kvmesh.bench.trace import cached_fraction_bound, load_trace, synthesize

    vocab_size, max_model_len = model_shape(model_dir)
    records = load_trace(trace, start, num_requests)
    workload = synthesize(records, vocab_size=vocab_size, max_model_len=max_model_len,
                          tokens_per_hash=tokens_per_hash, output_scale=output_scale,
                          speedup=speedup, seed=seed)
    requests = workload.requests
    result = {
        "trace": str(trace), "start": start, "requests": len(requests), "speedup": speedup,
        "tokens_per_hash": tokens_per_hash, "output_scale": output_scale, "seed": seed,
        "truncated_prompts": workload.truncated,
        "arrival_span_s": requests[-1].arrival_s,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "output_tokens": sum(r.max_tokens for r in requests),
        "cached_fraction_bound": cached_fraction_bound(requests, 16),
        "overrides": list(overrides),
    }
    for policy in ROUTING_POLICIES:
        with running_cluster(model_dir, [FULL_POOL, f"router.policy={policy}",
                                         f"router.seed={seed}", *overrides]) as (cluster, model):
            asyncio.run(warm_up(cluster.url, model, vocab_size))
            before = scrape(cluster.url)
            t0 = time.perf_counter()
            streams, lag = asyncio.run(replay(cluster.url, model, requests))
            check_errors(streams, policy)
            result[policy] = {**summarize_replay(streams, t0), "send_lag_max_s": lag,
                              **metric_deltas(before, scrape(cluster.url))}
    kv, rr = result["kv"], result["round_robin"]
    result["ratio_kv_vs_round_robin"] = {
        "ttft_mean": kv["ttft_mean_s"] / rr["ttft_mean_s"],
        "ttft_p99": kv["ttft_p99_s"] / rr["ttft_p99_s"],
        "output_tokens_per_s": kv["output_tokens_per_s"] / rr["output_tokens_per_s"],
    }
    return result


# --- disagg ---

async def decode_under_prefill(url: str, model: str, stream_prompts: list[list[int]],
                               stream_tokens: int, long_prompts: list[list[int]],
                               long_output: int, interval: float) -> dict:
    """The decodes start together; once each has its first token, a long prompt is
    sent every `interval` s until the last decode ends (or the prompts run out)."""
    async with http_client(url) as http:
        streams = [StreamRecord(sent=0.0) for _ in stream_prompts]
        decodes = [asyncio.ensure_future(stream_completion(http, model, p, stream_tokens,
                                                           logprobs=True, record=s))
                   for p, s in zip(stream_prompts, streams)]
        while not all(s.chunks or d.done() for s, d in zip(streams, decodes)):
            await asyncio.sleep(0.005)
        arrivals = []
        start = time.perf_counter()
        for i, prompt in enumerate(long_prompts):
            await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
            if all(d.done() for d in decodes):
                break
            arrivals.append(asyncio.ensure_future(stream_completion(http, model, prompt,
                                                                    long_output)))
        await asyncio.gather(*decodes)
        longs = await asyncio.gather(*arrivals)
    check_errors(streams, "decode")
    check_errors(longs, "long-prompt")
    gaps = [g for s in streams for g in s.token_gaps()]
    seconds = max(s.end for s in streams) - min(s.sent for s in streams)
    return {**stats(gaps, "itl"), "decode_seconds": seconds,
            "decode_tokens_per_s": sum(s.usage["completion_tokens"] for s in streams) / seconds,
            "long_prompts_sent": len(longs),
            "long_prompt_tokens": sum(len(p) for p in long_prompts[:len(longs)]),
            **{f"long_{k}": v for k, v in stats([r.ttft for r in longs], "ttft").items()},
            "samples": {"itl_s": [round(g, 6) for g in gaps]}}


DISAGG_MODES = {  # measured, then the baseline
    "disaggregated": ["router.disagg_min_tokens=0"],
    "aggregated": [f"{PREFILL_COUNT}=0"],
}


def bench_disagg(model_dir: Path, num_streams: int, stream_tokens: int, stream_prompt: int,
                 long_lens: tuple[int, int], long_output: int, interval: float, seed: int,
                 overrides: tuple[str, ...] = ()) -> dict:
    vocab_size, _ = model_shape(model_dir)
    rng = random.Random(seed)
    stream_prompts = [random_prompt(rng, stream_prompt, vocab_size) for _ in range(num_streams)]
    long_prompts = [random_prompt(rng, rng.randint(*long_lens), vocab_size) for _ in range(1000)]
    result = {"streams": num_streams, "stream_tokens": stream_tokens,
              "stream_prompt_tokens": stream_prompt, "long_prompt_lens": list(long_lens),
              "long_output_tokens": long_output, "interval_s": interval, "seed": seed,
              "overrides": list(overrides)}
    for mode, mode_overrides in DISAGG_MODES.items():
        with running_cluster(model_dir, [FULL_POOL, *mode_overrides, *overrides]) as (cluster,
                                                                                     model):
            asyncio.run(warm_up(cluster.url, model, vocab_size))
            before = scrape(cluster.url)
            run = asyncio.run(decode_under_prefill(cluster.url, model, stream_prompts,
                                                   stream_tokens, long_prompts, long_output,
                                                   interval))
            result[mode] = {**run, **metric_deltas(before, scrape(cluster.url))}
    dis, agg = result["disaggregated"], result["aggregated"]
    result["ratio_disagg_vs_agg"] = {"itl_p99": dis["itl_p99_s"] / agg["itl_p99_s"],
                                     "itl_mean": dis["itl_mean_s"] / agg["itl_mean_s"]}
    return result


# --- overhead ---

def overhead_workload(vocab_size: int, seed: int, num_requests: int,
                      prompt_lens: tuple[int, int], output_lens: tuple[int, int]):
    rng = random.Random(seed)
    return [(random_prompt(rng, rng.randint(*prompt_lens), vocab_size), rng.randint(*output_lens))
            for _ in range(num_requests)]


def engine_baseline(model_dir: Path, workload, vocab_size: int) -> dict:
    """The in-process Engine, every request added at once (kvmesh.bench.engine.run_engine),
    with the workers' pool and batch settings."""
    from kvmesh.bench.engine import run_engine
    from kvmesh.engine.engine import Engine

    engine = Engine.from_pretrained(str(model_dir), num_blocks=4096)
    run_engine(engine, overhead_workload(vocab_size, -1, 4, (32, 512), (8, 8)))  # warm-up
    engine.pool.reset_prefix_cache()
    run = run_engine(engine, workload)
    return {"seconds": run["seconds"], "ttft_mean_s": run["ttft_mean_s"],
            "texts": [engine.tokenizer.decode(ids) for ids in run["outputs"]],
            "num_tokens": [len(ids) for ids in run["outputs"]]}


async def send_all(url: str, model: str, workload) -> list[StreamRecord]:
    async with http_client(url) as http:
        return await asyncio.gather(*(stream_completion(http, model, p, n) for p, n in workload))


def bench_overhead(model_dir: Path, num_requests: int, prompt_lens: tuple[int, int],
                   output_lens: tuple[int, int], decode_workers: tuple[int, ...], seed: int,
                   overrides: tuple[str, ...] = ()) -> dict:
    vocab_size, _ = model_shape(model_dir)
    workload = overhead_workload(vocab_size, seed, num_requests, prompt_lens, output_lens)
    output = sum(n for _, n in workload)
    engine = engine_baseline(model_dir, workload, vocab_size)
    result = {"requests": num_requests, "prompt_tokens": sum(len(p) for p, _ in workload),
              "output_tokens": output, "seed": seed, "overrides": list(overrides),
              "engine": {"seconds": engine["seconds"], "tokens_per_s": output / engine["seconds"],
                         "ttft_mean_s": engine["ttft_mean_s"]},
              "clusters": {}, "ratio_cluster_vs_engine": {}}
    for count in decode_workers:
        name = f"{count}_decode"
        with running_cluster(model_dir, [FULL_POOL, f"{DECODE_COUNT}={count}", *overrides]) as (
                cluster, model):
            asyncio.run(warm_up(cluster.url, model, vocab_size))
            before = scrape(cluster.url)
            streams = asyncio.run(send_all(cluster.url, model, workload))
            check_errors(streams, name)
            deltas = metric_deltas(before, scrape(cluster.url))
        seconds = max(s.end for s in streams) - min(s.sent for s in streams)
        equal = sum(s.text == text and s.usage["completion_tokens"] == n for s, text, n in
                    zip(streams, engine["texts"], engine["num_tokens"], strict=True))
        result["clusters"][name] = {
            "seconds": seconds, "tokens_per_s": output / seconds,
            "ttft_mean_s": sum(s.ttft for s in streams) / len(streams),
            "outputs_equal_engine": equal, **deltas}
        result["ratio_cluster_vs_engine"][name] = engine["seconds"] / seconds
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
        label = f"{policy}: mean {run['ttft_mean_s'] * 1000:.0f} ms, {run['cached_fraction']:.0%} cached"
        plot_cdf(cdf, run["samples"]["ttft_s"], label)
        over_time.scatter(run["samples"]["sent_s"], run["samples"]["ttft_s"], s=4, label=policy)
    cdf.set(xscale="log", xlabel="TTFT (s)", ylabel="fraction of requests",
            title=f"Mooncake trace, {result['requests']} requests, x{result['speedup']:g}")
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
    ax.set(xscale="log", xlabel="inter-token latency (s)", ylabel="fraction of tokens",
           title=f"{result['streams']} decodes under long prompts every {result['interval_s']} s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_overhead(result: dict, path: str) -> None:
    plt = pyplot()
    names = ["engine", *result["clusters"]]
    rates = [result["engine"]["tokens_per_s"],
             *(c["tokens_per_s"] for c in result["clusters"].values())]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([n.replace("_", " ") for n in names], rates)
    ax.set(ylabel="output tokens/s", title=f"{result['requests']} requests at once, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- commands ---

def write(result: dict, json_file: str | None, plot_file: str | None, plot) -> None:
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
    if plot_file:
        plot(result, plot_file)


def model_dir(model_path: str | None) -> Path:
    from kvmesh.gpu.tiny import ensure_tiny

    return Path(ensure_tiny() if model_path is None else model_path)


def common_options(func):
    for option in reversed([
        click.option("--model", "model_path", default=None,
                     help="HF model directory [default: the tiny model]."),
        click.option("--seed", default=0, show_default=True, help="Workload seed."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Extra cluster override for every cluster of the run (repeatable)."),
        click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None,
                     help="Also write the results to this JSON file."),
        click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None,
                     help="Also draw the results into this PNG file."),
    ]):
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
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="Mooncake JSONL trace [default: <repo>/../shared/traces/synthetic_trace.jsonl].")
@click.option("--start", default=0, show_default=True, help="Trace requests to skip first.")
@click.option("--requests", "num_requests", type=click.IntRange(1), default=300,
              show_default=True, help="Trace requests to replay.")
@click.option("--speedup", type=click.FloatRange(min=0, min_open=True), default=4.0,
              show_default=True, help="Arrival times are divided by this.")
@click.option("--tokens-per-hash", type=click.IntRange(1), default=16, show_default=True,
              help="Prompt tokens per trace hash id (one 512-token block of the trace).")
@click.option("--output-scale", type=click.IntRange(1), default=8, show_default=True,
              help="Output lengths are divided by this (at least 4 tokens).")
def routing_command(model_path, seed, overrides, json_file, plot_file, trace, start,
                    num_requests, speedup, tokens_per_hash, output_scale) -> None:
    """KV-aware routing vs round robin on a replayed Mooncake trace: TTFT, cache hits."""
    from kvmesh.bench.trace import default_trace_path

    trace = Path(trace) if trace else default_trace_path()
    if not trace.is_file():
        raise click.BadParameter(f"{trace} does not exist; pass a Mooncake JSONL trace",
                                 param_hint="--trace")
    result = bench_routing(model_dir(model_path), trace, start, num_requests, speedup,
                           tokens_per_hash, output_scale, seed, overrides)
    click.echo(f"{result['requests']} requests from {trace.name}[{start}:], x{speedup:g}: "
               f"{result['prompt_tokens']} prompt tokens, {result['output_tokens']} output, "
               f"over {result['arrival_span_s']:.1f} s; at most "
               f"{result['cached_fraction_bound']:.0%} of prompt tokens cacheable")
    for policy in ROUTING_POLICIES:
        r = result[policy]
        click.echo(f"{policy:12s} TTFT mean {r['ttft_mean_s'] * 1000:7.1f} ms, p99 "
                   f"{r['ttft_p99_s'] * 1000:7.1f} ms; cached {r['cached_fraction']:5.1%}; "
                   f"{r['output_tokens_per_s']:6.1f} output tok/s; "
                   f"{r['remote_prefill_total']:.0f} remote prefills")
    ratio = result["ratio_kv_vs_round_robin"]
    click.echo(f"ratio kv / round_robin: TTFT mean {ratio['ttft_mean']:.2f}x, "
               f"p99 {ratio['ttft_p99']:.2f}x, output tok/s {ratio['output_tokens_per_s']:.2f}x")
    write(result, json_file, plot_file, plot_routing)


@serve_group.command("disagg")
@common_options
@click.option("--streams", "num_streams", type=click.IntRange(1), default=8, show_default=True,
              help="Long-running decodes measured.")
@click.option("--stream-tokens", type=click.IntRange(2), default=200, show_default=True,
              help="Tokens each decode generates.")
@click.option("--stream-prompt", type=click.IntRange(1), default=64, show_default=True,
              help="Prompt tokens of each decode.")
@click.option("--long-prompts", "long_lens", default="1000,3000", show_default=True,
              callback=int_pair, help="LOW,HIGH: long prompt lengths, uniform.")
@click.option("--long-output", type=click.IntRange(1), default=4, show_default=True,
              help="Tokens each long prompt generates.")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=0.25,
              show_default=True, help="Seconds between long prompts.")
def disagg_command(model_path, seed, overrides, json_file, plot_file, num_streams,
                   stream_tokens, stream_prompt, long_lens, long_output, interval) -> None:
    """Decode inter-token latency under arriving long prompts: disaggregated vs not."""
    result = bench_disagg(model_dir(model_path), num_streams, stream_tokens, stream_prompt,
                          long_lens, long_output, interval, seed, overrides)
    for mode in DISAGG_MODES:
        r = result[mode]
        click.echo(f"{mode:14s} ITL p50 {r['itl_p50_s'] * 1000:6.1f} ms, p99 "
                   f"{r['itl_p99_s'] * 1000:6.1f} ms, max {r['itl_max_s'] * 1000:6.1f} ms; "
                   f"{r['decode_tokens_per_s']:6.1f} decode tok/s; {r['long_prompts_sent']} "
                   f"long prompts, their TTFT mean {r['long_ttft_mean_s'] * 1000:.0f} ms; "
                   f"{r['remote_prefill_total']:.0f} remote prefills")
    ratio = result["ratio_disagg_vs_agg"]
    click.echo(f"ratio disaggregated / aggregated: ITL p99 {ratio['itl_p99']:.2f}x, "
               f"mean {ratio['itl_mean']:.2f}x")
    write(result, json_file, plot_file, plot_disagg)


@serve_group.command("overhead")
@common_options
@click.option("--requests", "num_requests", type=click.IntRange(1), default=32,
              show_default=True, help="Requests, all sent at once.")
@click.option("--prompt-lens", default="32,512", show_default=True, callback=int_pair,
              help="LOW,HIGH: prompt lengths, uniform.")
@click.option("--output-lens", default="32,128", show_default=True, callback=int_pair,
              help="LOW,HIGH: output lengths, uniform.")
@click.option("--decode-workers", default="2,1", show_default=True,
              help="Comma-separated decode-worker counts: one cluster each.")
def overhead_command(model_path, seed, overrides, json_file, plot_file, num_requests,
                     prompt_lens, output_lens, decode_workers) -> None:
    """Output tokens/s through the whole cluster vs the in-process Engine, same requests."""
    try:
        counts = tuple(int(c) for c in decode_workers.split(","))
    except ValueError:
        raise click.BadParameter(f"expected integers like 2,1, got {decode_workers!r}",
                                 param_hint="--decode-workers") from None
    result = bench_overhead(model_dir(model_path), num_requests, prompt_lens, output_lens,
                            counts, seed, overrides)
    e = result["engine"]
    click.echo(f"{result['requests']} requests, {result['prompt_tokens']} prompt tokens, "
               f"{result['output_tokens']} output tokens")
    click.echo(f"Engine (in process)  {e['tokens_per_s']:7.1f} tok/s ({e['seconds']:.2f} s, "
               f"mean TTFT {e['ttft_mean_s'] * 1000:.0f} ms)")
    for name, c in result["clusters"].items():
        click.echo(f"cluster, {name.replace('_', ' '):9s} {c['tokens_per_s']:7.1f} tok/s "
                   f"({c['seconds']:.2f} s, mean TTFT {c['ttft_mean_s'] * 1000:.0f} ms), "
                   f"ratio {result['ratio_cluster_vs_engine'][name]:.2f}x; outputs equal to "
                   f"the Engine's: {c['outputs_equal_engine']}/{result['requests']}")
    write(result, json_file, plot_file, plot_overhead)
