"""`kvmesh bench scale …`: the router and routing with many mock workers
(kvmesh.engine.mock; one process hosts them all, kvmesh.bench.mock_host), the real
router in this process and the real frontend, driven over HTTP.

router    Router decision latency (p50, p99: the RouteRequest handler's wall time,
          measured around it in the live router, kvmesh.bench.mock_cluster; and its
          thread CPU time, which preemption on a shared machine does not inflate), the
          KV events and LoadReports per second the router took in (reports also over
          IDLE_WINDOW_S with nothing in flight), at each `--workers` count (10, 100,
          1000), on one fresh cluster per count: `--requests` streamed completions,
          `--concurrency` at a time, prompts sharing `--prefixes` system prompts. The
          kv policy is measured, then the round_robin baseline on the same cluster
          (same workers, same index): ratio kv / round robin, and the target p99 < 1 ms.
routing   kvmesh.bench.sessions: reuse-heavy multi-turn sessions against each
          `--workers` count, kv then round_robin, on a fresh cluster each: mean TTFT
          ratio (target <= 0.5), achieved prefix hits / achievable (target >= 0.9),
          load max / mean (target <= 1.3).

Every reply is checked against the mock's tokens (kvmesh.engine.mock.mock_reply): a
wrong or short reply fails the bench (non-zero exit), as does any failed request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import click

from kvmesh.bench.mock_cluster import MockCluster
from kvmesh.bench.trace import StreamRecord, http_client, stream_completion
from kvmesh.progress import Progress
from kvmesh.router.policy import Router, RouterSettings

P99_TARGET_S = 1e-3
IDLE_WINDOW_S = 5.0  # LoadReports counted with no request in flight, after the warm-up


class Replies:
    """What every mock reply must be: the tokenizer's text of mock_reply."""

    def __init__(self, model_dir: Path) -> None:
        from kvmesh.engine.mock import plain_token_ids
        from kvmesh.gpu.model_config import ModelConfig
        from kvmesh.tokenizer import Tokenizer

        config = ModelConfig.from_pretrained(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        eos = frozenset(self.tokenizer.eos_token_ids) | frozenset(config.eos_token_ids)
        # the mock's plain ids: prompts of them too, so a reply's text is its ids' decode
        self.plain = plain_token_ids(self.tokenizer, config.vocab_size, config.bos_token_id, eos)

    def tokens(self, prompt: list[int], max_tokens: int) -> list[int]:
        from kvmesh.engine.mock import mock_reply

        return mock_reply(prompt, max_tokens, self.plain)

    def check(self, record: StreamRecord, prompt: list[int], max_tokens: int) -> None:
        """Raise ClickException for a failed, short or wrong reply."""
        if record.error:
            raise click.ClickException(f"a request failed: {record.error}")
        usage = record.usage or {}
        if usage.get("completion_tokens") != max_tokens:
            raise click.ClickException(
                f"a reply has {usage.get('completion_tokens')} tokens, expected {max_tokens}"
            )
        expected = self.tokenizer.decode(self.tokens(prompt, max_tokens))
        if record.text != expected:
            raise click.ClickException(
                f"a reply differs from the mock's tokens: {record.text!r} != {expected!r}"
            )


def random_tokens(rng: random.Random, n: int, plain: list[int]) -> list[int]:
    return [rng.choice(plain) for _ in range(n)]


def decision_prompts(
    num_requests: int, num_prefixes: int, plain: list[int], seed: int
) -> list[list[int]]:
    """Prompts of a shared 128-token system prompt (one of num_prefixes) and a
    16-256-token question of their own."""
    rng = random.Random(seed)
    prefixes = [random_tokens(rng, 128, plain) for _ in range(num_prefixes)]
    return [
        rng.choice(prefixes) + random_tokens(rng, rng.randint(16, 256), plain)
        for _ in range(num_requests)
    ]


async def send_all(
    cluster: MockCluster,
    replies: Replies,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int,
) -> list[StreamRecord]:
    """Stream every prompt, `concurrency` at a time; each reply checked."""
    slots = asyncio.Semaphore(concurrency)
    async with http_client(cluster.url) as http:

        async def one(prompt: list[int]) -> StreamRecord:
            async with slots:
                record = await stream_completion(http, cluster.model, prompt, max_tokens)
            replies.check(record, prompt, max_tokens)
            return record

        return await asyncio.gather(*(one(p) for p in prompts))


def percentiles(values_ns: list[int]) -> dict[str, float]:
    ordered = sorted(values_ns)
    if not ordered:
        raise click.ClickException("the router made no decision")

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e9

    return {
        "decisions": len(ordered),
        "p50_s": at(0.50),
        "p99_s": at(0.99),
        "max_s": ordered[-1] / 1e9,
        "mean_s": statistics.fmean(ordered) / 1e9,
    }


async def measure_decisions(
    model_dir: Path,
    num_workers: int,
    num_requests: int,
    concurrency: int,
    num_prefixes: int,
    max_tokens: int,
    seed: int,
    load_report_interval: float,
) -> dict:
    """One cluster of num_workers mock workers: kv, then round_robin on the same one."""
    replies = Replies(model_dir)
    prompts = decision_prompts(num_requests, num_prefixes, replies.plain, seed)
    result: dict = {"workers": num_workers, "load_report_interval_s": load_report_interval}
    with Progress(f"starting {num_workers} mock workers"):
        started = time.perf_counter()
        cluster = MockCluster(model_dir, num_workers, load_report_interval=load_report_interval)
        await cluster.__aenter__()
    result["start_s"] = time.perf_counter() - started
    try:
        # warm-up: connections from the frontend to the first workers, untimed
        await send_all(cluster, replies, prompts[:concurrency], max_tokens, concurrency)
        cluster.probe.reset()
        idle_started = time.perf_counter()
        await asyncio.sleep(IDLE_WINDOW_S)
        idle_s = time.perf_counter() - idle_started
        result["idle_s"] = idle_s
        result["idle_load_reports"] = cluster.probe.num_load_reports
        result["idle_load_reports_per_s"] = cluster.probe.num_load_reports / idle_s
        for policy in ("kv", "round_robin"):
            cluster.router.policy = Router(RouterSettings(policy=policy, seed=seed))
            cluster.probe.reset()
            t0 = time.perf_counter()
            with Progress(f"{num_workers} workers, {policy}: {num_requests} requests"):
                await send_all(cluster, replies, prompts, max_tokens, concurrency)
            wall = time.perf_counter() - t0
            cpu = percentiles(cluster.probe.decisions_cpu_ns)
            result[policy] = {
                **percentiles(cluster.probe.decisions_ns),
                "cpu_p50_s": cpu["p50_s"],
                "cpu_p99_s": cpu["p99_s"],
                "wall_s": wall,
                "kv_events": cluster.probe.num_events,
                "kv_events_per_s": cluster.probe.num_events / wall,
                "kv_event_blocks_per_s": cluster.probe.num_event_blocks / wall,
                "load_reports_per_s": cluster.probe.num_load_reports / wall,
                "workers_registered": len(cluster.router.workers),
            }
    finally:
        await cluster.__aexit__(None, None, None)
    kv, rr = result["kv"], result["round_robin"]
    result["ratio_kv_vs_round_robin"] = {
        "p50": kv["p50_s"] / rr["p50_s"],
        "p99": kv["p99_s"] / rr["p99_s"],
    }
    result["p99_target_met"] = kv["p99_s"] < P99_TARGET_S
    return result


def print_decisions(result: dict) -> None:
    kv, rr = result["kv"], result["round_robin"]
    ratio = result["ratio_kv_vs_round_robin"]
    met = "met" if result["p99_target_met"] else "NOT met"
    click.echo(
        f"{result['workers']:>5} workers: kv decision p50 {kv['p50_s'] * 1e6:.0f} us, "
        f"p99 {kv['p99_s'] * 1e6:.0f} us (target < 1000 us: {met}); round robin p50 "
        f"{rr['p50_s'] * 1e6:.0f} us, p99 {rr['p99_s'] * 1e6:.0f} us; ratio p99 "
        f"{ratio['p99']:.2f}x; kv CPU time p50 {kv['cpu_p50_s'] * 1e6:.0f} us, p99 "
        f"{kv['cpu_p99_s'] * 1e6:.0f} us; KV events {kv['kv_events_per_s']:.0f}/s "
        f"({kv['kv_event_blocks_per_s']:.0f} blocks/s); load reports "
        f"{kv['load_reports_per_s']:.0f}/s ({result['idle_load_reports_per_s']:.0f}/s idle)"
    )


def model_dir_of(model: str | None) -> Path:
    from kvmesh.bench.serve import model_dir

    return model_dir(model)


@click.group("scale")
def scale_group() -> None:
    """Many mock workers against the real router and frontend."""


@scale_group.command("router")
@click.option("--workers", "worker_counts", type=int, multiple=True, default=(10, 100, 1000))
@click.option("--requests", "num_requests", type=int, default=400, show_default=True)
@click.option("--concurrency", type=int, default=16, show_default=True)
@click.option("--prefixes", "num_prefixes", type=int, default=64, show_default=True)
@click.option("--max-tokens", type=int, default=4, show_default=True)
@click.option(
    "--load-report-interval",
    type=float,
    default=0.5,
    show_default=True,
    help="Seconds between a worker's load-report ticks: a changed load is sent at the "
    "next tick, an unchanged one every 2 s (kvmesh.actors.load_reports).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model", default=None, help="Model directory (default: the tiny model).")
@click.option("--json", "json_file", default=None, help="Write the results here too.")
def router_command(
    worker_counts,
    num_requests,
    concurrency,
    num_prefixes,
    max_tokens,
    load_report_interval,
    seed,
    model,
    json_file,
):
    """Router decision latency p50/p99 and KV events/s at 10, 100 and 1,000 workers."""
    for name, value in (("--requests", num_requests), ("--concurrency", concurrency)):
        if value < 1:
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    if not worker_counts or min(worker_counts) < 1:
        raise click.BadParameter("each must be >= 1", param_hint="--workers")
    model_dir = model_dir_of(model)
    results = []
    for count in worker_counts:
        result = asyncio.run(
            measure_decisions(
                model_dir,
                count,
                num_requests,
                concurrency,
                num_prefixes,
                max_tokens,
                seed,
                load_report_interval,
            )
        )
        print_decisions(result)
        results.append(result)
    text = json.dumps({"bench": "scale router", "results": results}, indent=1)
    click.echo(text)
    if json_file:
        Path(json_file).write_text(text)


# --- routing ---

ROUTING_POLICIES = ("kv", "round_robin")  # measured, then the baseline
TTFT_TARGET, HITS_TARGET, BALANCE_TARGET = 0.5, 0.9, 1.3


async def replay_sessions(
    model_dir: Path,
    num_workers: int,
    policy: str,
    spec,
    device_blocks: int,
    scale: float | None,
    load_weight: float,
) -> dict:
    """One fresh cluster of `policy`: the sessions replayed, TTFT, hits and balance."""
    from kvmesh.bench.sessions import replay, synthesize

    replies = Replies(model_dir)
    sessions = synthesize(spec, replies.plain, replies.tokens)
    total = sum(len(s.turns) for s in sessions)
    with Progress(f"starting {num_workers} mock workers ({policy})"):
        cluster = MockCluster(
            model_dir,
            num_workers,
            device_blocks=device_blocks,
            policy=policy,
            scale=scale,
            load_weight=load_weight,
        )
        await cluster.__aenter__()
    try:
        cluster.probe.reset()
        quality_before = dataclasses.replace(cluster.router.quality)
        t0 = time.perf_counter()
        with Progress(f"{num_workers} workers, {policy}: turns done", total=total) as progress:
            turns = await replay(
                cluster.url, cluster.model, sessions, replies.check, progress.advance
            )
        wall = time.perf_counter() - t0
        quality = cluster.router.quality
        placed = [cluster.probe.placed.get(w, 0) for w in cluster.router.workers]
        work = [cluster.probe.placed_tokens.get(w, 0) for w in cluster.router.workers]
    finally:
        await cluster.__aexit__(None, None, None)
    ttfts = [t.ttft_s for t in turns]
    achieved = quality.cached_tokens - quality_before.cached_tokens
    achievable = quality.best_cached_tokens - quality_before.best_cached_tokens
    prompt_tokens = sum(t.num_prompt_tokens for t in turns)
    cached = sum(
        (t.record.usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
        for t in turns
    )
    return {
        "turns": len(turns),
        "wall_s": wall,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": sorted(ttfts)[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "cached_fraction": cached / prompt_tokens,
        "router_expected_cached_tokens": achieved,
        "router_best_cached_tokens": achievable,
        "hits_vs_achievable": achieved / achievable if achievable else 1.0,
        "requests_per_worker_max": max(placed),
        "requests_per_worker_mean": statistics.fmean(placed),
        "load_max_vs_mean": max(placed) / statistics.fmean(placed),
        "uncached_tokens_per_worker_max": max(work),
        "uncached_tokens_max_vs_mean": max(work) / statistics.fmean(work) if any(work) else 1.0,
    }


def bench_routing(
    model_dir: Path,
    worker_counts,
    spec_of,
    device_blocks: int,
    scale: float | None,
    load_weight: float,
) -> list[dict]:
    results = []
    for count in worker_counts:
        spec = spec_of(count)
        result = {
            "workers": count,
            "sessions": spec.num_sessions,
            "turns_per_session": spec.num_turns,
            "device_blocks": device_blocks,
            "spec": dataclasses.asdict(spec),
            "scale": scale,
            "load_weight": load_weight,
        }
        for policy in ROUTING_POLICIES:
            result[policy] = asyncio.run(
                replay_sessions(model_dir, count, policy, spec, device_blocks, scale, load_weight)
            )
        kv, rr = result["kv"], result["round_robin"]
        result["ratio_ttft_mean_kv_vs_round_robin"] = kv["ttft_mean_s"] / rr["ttft_mean_s"]
        result["targets_met"] = {
            "ttft_mean_ratio <= 0.5": result["ratio_ttft_mean_kv_vs_round_robin"] <= TTFT_TARGET,
            "kv hits >= 0.9 x achievable": kv["hits_vs_achievable"] >= HITS_TARGET,
            "kv load max/mean <= 1.3": kv["load_max_vs_mean"] <= BALANCE_TARGET,
        }
        click.echo(
            f"{count:>4} workers, {spec.num_sessions} sessions x {spec.num_turns} turns: "
            f"mean TTFT kv {kv['ttft_mean_s'] * 1e3:.0f} ms, round robin "
            f"{rr['ttft_mean_s'] * 1e3:.0f} ms, ratio "
            f"{result['ratio_ttft_mean_kv_vs_round_robin']:.2f}x (target <= 0.5); kv hits "
            f"{kv['hits_vs_achievable']:.3f} of achievable (>= 0.9); kv load max/mean "
            f"{kv['load_max_vs_mean']:.2f} (<= 1.3); cached fraction kv "
            f"{kv['cached_fraction']:.2f}, round robin {rr['cached_fraction']:.2f}"
        )
        results.append(result)
    return results


@scale_group.command("routing")
@click.option("--workers", "worker_counts", type=int, multiple=True, default=(8, 64))
@click.option("--sessions-per-worker", type=int, default=4, show_default=True)
@click.option("--turns", type=int, default=4, show_default=True)
@click.option("--system-prompts", type=int, default=4, show_default=True)
@click.option("--think", "think_mean_s", type=float, default=2.0, show_default=True)
@click.option(
    "--device-blocks",
    type=int,
    default=160,
    show_default=True,
    help="Each worker's pool (block_size 16): fewer sessions than --sessions-per-worker.",
)
@click.option("--scale", type=float, default=None, help="MockTiming.scale (default 1).")
@click.option(
    "--load-weight", type=float, default=1.0, show_default=True, help="router.load_weight"
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model", default=None, help="Model directory (default: the tiny model).")
@click.option("--json", "json_file", default=None, help="Write the results here too.")
def routing_command(
    worker_counts,
    sessions_per_worker,
    turns,
    system_prompts,
    think_mean_s,
    device_blocks,
    scale,
    load_weight,
    seed,
    model,
    json_file,
):
    """KV-aware routing vs round robin on reuse-heavy multi-turn sessions, 8 and 64 workers."""
    from kvmesh.bench.sessions import SessionSpec

    if not worker_counts or min(worker_counts) < 1:
        raise click.BadParameter("each must be >= 1", param_hint="--workers")

    def spec_of(count: int) -> SessionSpec:
        try:
            return SessionSpec(
                num_sessions=sessions_per_worker * count,
                num_turns=turns,
                num_system_prompts=system_prompts,
                think_mean_s=think_mean_s,
                seed=seed,
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc

    results = bench_routing(
        model_dir_of(model), worker_counts, spec_of, device_blocks, scale, load_weight
    )
    text = json.dumps({"bench": "scale routing", "results": results}, indent=1)
    click.echo(text)
    if json_file:
        Path(json_file).write_text(text)
