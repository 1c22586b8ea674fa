"""`kvmesh bench planner`: a trace whose mix shifts, on fixed prefill/decode splits and
on the planner.

The trace (seeded, open loop, Poisson arrivals) has three phases: long prompts with
short outputs (prefill-heavy), short chats with long outputs (decode-heavy: their
prompts are under router.disagg_min_tokens, so decode workers prefill them), long
prompts again. It is replayed on a fresh cluster per configuration, all with three
workers and no cache actor:

    fixed_1p2d   1 prefill + 2 decode (the default split)
    fixed_2p1d   2 prefill + 1 decode
    planner      starts as 1p2d; a planner actor moves workers between the roles

Per configuration: TTFT attainment (share of requests whose first token came within
--ttft-target), ITL attainment (share whose mean gap between tokens is within
--itl-target), both, and the planner's switches. The planner's attainment is reported
against the best fixed split's. Every reply must have exactly max_tokens tokens and
the same text in every configuration (greedy): anything else fails the run.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket

import click
import httpx

from kvmesh.bench.serve import (
    FULL_POOL,
    check_errors,
    common_options,
    model_dir,
    model_shape,
    running_cluster,
)
from kvmesh.bench.trace import ReplayRequest, random_prompt, replay, stats

# The default node's entries: frontend, router, prefill, decode, cache. Counts are
# explicit: without a cluster.toml, a small machine gets one aggregated worker.
ONE_TWO = ["nodes.0.actors.2.count=1", "nodes.0.actors.3.count=2"]
CONFIGS = {
    "fixed_1p2d": [*ONE_TWO, "nodes.0.actors.4.count=0"],
    "fixed_2p1d": [
        "nodes.0.actors.2.count=2",
        "nodes.0.actors.3.count=1",
        "nodes.0.actors.4.count=0",
    ],
    "planner": [*ONE_TWO, "nodes.0.actors.4.role=planner"],
}
FIXED = ("fixed_1p2d", "fixed_2p1d")


def shifting_trace(
    vocab_size: int,
    phase_s: float,
    long_rate: float,
    chat_rate: float,
    long_lens: tuple[int, int],
    long_output: int,
    chat_lens: tuple[int, int],
    chat_output: int,
    seed: int,
) -> list[ReplayRequest]:
    """long -> chat -> long, each `phase_s` seconds of Poisson arrivals."""
    rng = random.Random(seed)
    requests = []
    phases = [
        (long_rate, long_lens, long_output),
        (chat_rate, chat_lens, chat_output),
        (long_rate, long_lens, long_output),
    ]
    for k, (rate, lens, output) in enumerate(phases):
        t = k * phase_s
        while True:
            t += rng.expovariate(rate)
            if t >= (k + 1) * phase_s:
                break
            prompt = random_prompt(rng, rng.randint(*lens), vocab_size)
            requests.append(ReplayRequest(t, prompt, output))
    return requests


def attainment(records, ttft_target: float, itl_target: float) -> dict:
    ttft_ok = [r.ttft <= ttft_target for r in records]
    itl = [sum(g) / len(g) if (g := r.token_gaps()) else 0.0 for r in records]
    itl_ok = [v <= itl_target for v in itl]
    n = len(records)
    return {
        "ttft_attainment": sum(ttft_ok) / n,
        "itl_attainment": sum(itl_ok) / n,
        "both_attainment": sum(a and b for a, b in zip(ttft_ok, itl_ok, strict=True)) / n,
        **stats([r.ttft for r in records], "ttft"),
        **stats(itl, "itl"),
    }


def planner_decisions(metrics_text: str) -> dict[str, float]:
    """kvmesh_planner_decisions_total by "action/outcome", from the planner's /metrics."""
    found = re.findall(
        r'kvmesh_planner_decisions_total\{action="(\w+)",outcome="(\w+)"\} (\S+)', metrics_text
    )
    return {f"{action}/{outcome}": float(value) for action, outcome, value in found}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_planner(
    model: str | None,
    trace: list[ReplayRequest],
    ttft_target: float,
    itl_target: float,
    planner_sets: list[str],
    overrides: tuple[str, ...],
    threads: int | None,
) -> dict:
    path = model_dir(model)
    result: dict = {
        "requests": len(trace),
        "ttft_target_s": ttft_target,
        "itl_target_s": itl_target,
        "planner_settings": planner_sets,
        "overrides": list(overrides),
    }
    texts: dict[str, list[str]] = {}
    port = free_port()
    for name, config in CONFIGS.items():
        sets = [FULL_POOL, *config]
        if name == "planner":
            sets += [f"planner.metrics_port={port}", *planner_sets]
        with running_cluster(path, [*sets, *overrides], threads) as (cluster, served):
            records, lag = asyncio.run(replay(cluster.url, served, trace))
            decisions = {}
            if name == "planner":
                decisions = planner_decisions(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        check_errors(records, name)
        short = [
            i
            for i, (r, q) in enumerate(zip(records, trace, strict=True))
            if r.usage.get("completion_tokens") != q.max_tokens
        ]
        if short:
            raise click.ClickException(
                f"{name}: {len(short)} replies of other than max_tokens tokens "
                f"(a lost or invented token), first requests {short[:5]}"
            )
        texts[name] = [r.text for r in records]
        result[name] = {
            **attainment(records, ttft_target, itl_target),
            "send_lag_max_s": lag,
            "planner_decisions": decisions,
        }
    first = next(iter(texts))
    for name, got in texts.items():
        differ = [i for i, (a, b) in enumerate(zip(texts[first], got, strict=True)) if a != b]
        if differ:
            raise click.ClickException(
                f"{name}'s replies differ from {first}'s at requests {differ[:5]} (greedy "
                "decoding must not depend on the split): a correctness bug"
            )
    best = max(FIXED, key=lambda n: result[n]["both_attainment"])
    result["best_fixed"] = best
    result["planner_vs_best_fixed"] = {
        key: result["planner"][key] - result[best][key]
        for key in ("ttft_attainment", "itl_attainment", "both_attainment")
    }
    both = result[best]["both_attainment"]
    result["ratio_planner_vs_best_fixed"] = (
        result["planner"]["both_attainment"] / both if both else None
    )
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['requests']} requests; targets TTFT {result['ttft_target_s']} s, "
        f"ITL {result['itl_target_s']} s"
    ]
    for name in CONFIGS:
        r = result[name]
        lines.append(
            f"  {name:11s} TTFT {r['ttft_attainment']:6.1%}  ITL {r['itl_attainment']:6.1%}  "
            f"both {r['both_attainment']:6.1%}  (TTFT p50 {r['ttft_p50_s']:.3f} s, "
            f"ITL mean p50 {r['itl_p50_s']:.4f} s)"
        )
    lines.append(f"planner decisions: {result['planner']['planner_decisions']}")
    diff, ratio = result["planner_vs_best_fixed"], result["ratio_planner_vs_best_fixed"]
    lines.append(
        f"planner - best fixed ({result['best_fixed']}): TTFT {diff['ttft_attainment']:+.1%}, "
        f"ITL {diff['itl_attainment']:+.1%}, both {diff['both_attainment']:+.1%}; "
        f"ratio of both: {ratio if ratio is None else round(ratio, 3)}"
    )
    return "\n".join(lines)


@click.command("planner")
@common_options
@click.option("--phase", "phase_s", default=20.0, show_default=True, help="Seconds per phase.")
@click.option("--long-rate", default=1.5, show_default=True, help="Long prompts per second.")
@click.option("--chat-rate", default=4.0, show_default=True, help="Chats per second.")
@click.option("--ttft-target", default=1.0, show_default=True, help="Seconds.")
@click.option("--itl-target", default=0.05, show_default=True, help="Seconds.")
@click.option(
    "--planner-set",
    "planner_sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra override for the planner cluster only (e.g. planner.cooldown=5).",
)
def planner_command(
    model_path,
    seed,
    overrides,
    threads,
    json_file,
    plot_file,
    phase_s,
    long_rate,
    chat_rate,
    ttft_target,
    itl_target,
    planner_sets,
) -> None:
    """The shifting trace on fixed splits and on the planner: TTFT/ITL attainment."""
    if plot_file is not None:
        raise click.UsageError(
            "bench planner draws no plot (--plot is for bench serve); --json FILE writes results"
        )
    vocab_size, _ = model_shape(model_dir(model_path))
    trace = shifting_trace(
        vocab_size, phase_s, long_rate, chat_rate, (400, 800), 4, (16, 64), 48, seed
    )
    sets = [
        f"planner.ttft_target={ttft_target}",
        f"planner.itl_target={itl_target}",
        "planner.interval=1.0",
        "planner.patience=2",
        "planner.cooldown=5",
        *planner_sets,
    ]
    result = bench_planner(model_path, trace, ttft_target, itl_target, sets, overrides, threads)
    click.echo(report(result))
    click.echo(json.dumps(result))
    if json_file:
        with open(json_file, "w") as f:
            json.dump(result, f, indent=2)
