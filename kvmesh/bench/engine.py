"""`kvmesh bench engine`: Engine throughput against transformers `generate`, same run.

Workload (seeded): 64 requests, prompt lengths uniform in 32..1024 tokens of random
ids, output lengths uniform in 16..256, EOS ignored so both sides produce exactly
the requested tokens. Baseline: transformers generate in padded batches of 8 in
arrival order, each batch running to its longest output (static batching); only the
requested tokens count as useful. Then the Engine runs the same requests twice:
a cold pass, and a second pass whose prompts are all in the prefix cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from kvmesh.models import resolve
from kvmesh.progress import Progress

NUM_REQUESTS = 64
PROMPT_LENS = (32, 1024)
OUTPUT_LENS = (16, 256)
HF_BATCH = 8


def make_workload(vocab_size: int, seed: int, num_requests: int = NUM_REQUESTS):
    """(prompt token ids, output length) pairs; ids avoid the low (special) range."""
    from kvmesh.bench.trace import random_workload

    return random_workload(vocab_size, seed, num_requests, PROMPT_LENS, OUTPUT_LENS)


def run_engine(engine, workload) -> dict:
    """All requests submitted at once; wall time, mean time to first token, outputs."""
    from kvmesh.params import SamplingParams

    start = time.perf_counter()
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        for p, n in workload
    ]
    first_token_at, finals = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            first_token_at.setdefault(out.request_id, time.perf_counter() - start)
            if out.finished:
                finals[out.request_id] = out
    return {
        "seconds": time.perf_counter() - start,
        "ttft_mean_s": sum(first_token_at.values()) / len(ids),
        "outputs": [finals[i].token_ids for i in ids],
        "cached_tokens": sum(finals[i].num_cached_tokens for i in ids),
    }


def run_hf(model, workload, pad_id: int) -> tuple[float, list]:
    import torch

    outputs = []
    start = time.perf_counter()
    for i in range(0, len(workload), HF_BATCH):
        batch = workload[i : i + HF_BATCH]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=pad_id,
            )
        outputs += [out[row, width : width + n].tolist() for row, (_, n) in enumerate(batch)]
    return time.perf_counter() - start, outputs


def bench_engine(
    model_path: str | None, seed: int, threads: int | None, num_requests: int = NUM_REQUESTS
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kvmesh.engine.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    path = str(resolve.resolve_model(model_path).path)
    engine = Engine.from_pretrained(path, max_num_seqs=num_requests)
    workload = make_workload(engine.config.vocab_size, seed, num_requests)
    useful = sum(n for _, n in workload)

    with Progress("baseline: transformers generate, warm-up then measured"):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        run_hf(hf, workload[:2], pad_id=0)  # warm-up
        hf_s, hf_out = run_hf(hf, workload, pad_id=0)

    with Progress("kvmesh Engine: warm-up, cold, prefix cached"):
        run_engine(engine, make_workload(engine.config.vocab_size, seed + 1, 4))  # warm-up
        engine.pool.reset_prefix_cache()
        cold = run_engine(engine, workload)
        warm = run_engine(engine, workload)
    prompt_tokens = sum(len(p) for p, _ in workload)
    result = {
        "model": path,
        "threads": torch.get_num_threads(),
        "requests": len(workload),
        "prompt_tokens": prompt_tokens,
        "useful_output_tokens": useful,
        "hf_generate": {"seconds": hf_s, "tokens_per_s": useful / hf_s, "batch": HF_BATCH},
        "engine": {
            "seconds": cold["seconds"],
            "tokens_per_s": useful / cold["seconds"],
            "ttft_mean_s": cold["ttft_mean_s"],
        },
        "engine_prefix_cached": {
            "seconds": warm["seconds"],
            "tokens_per_s": useful / warm["seconds"],
            "ttft_mean_s": warm["ttft_mean_s"],
            "cached_prompt_fraction": warm["cached_tokens"] / prompt_tokens,
        },
        "ratio_engine_vs_hf": hf_s / cold["seconds"],
        "gain_prefix_cached_vs_cold": {
            "throughput": cold["seconds"] / warm["seconds"],
            "ttft_mean": cold["ttft_mean_s"] / warm["ttft_mean_s"],
        },
        "greedy_outputs_equal_hf": sum(
            a == b for a, b in zip(cold["outputs"], hf_out, strict=True)
        ),
        "greedy_outputs_equal_cold_vs_cached": sum(
            a == b for a, b in zip(cold["outputs"], warm["outputs"], strict=True)
        ),
    }
    return result


@click.command("engine")
@click.option(
    "--model", "model_path", default=None, help=f"{resolve.HELP} [default: the tiny model]"
)
@click.option("--seed", default=0, show_default=True, help="Workload seed.")
@click.option("--threads", type=int, default=None, help="torch threads [default: torch's choice].")
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1),
    default=NUM_REQUESTS,
    show_default=True,
    help="Number of requests in the workload.",
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results to this JSON file.",
)
def engine_command(model_path, seed, threads, num_requests, json_file) -> None:
    """Engine vs transformers generate (padded batches of 8): useful output tokens/s."""
    result = bench_engine(model_path, seed, threads, num_requests)
    hf, eng, warm = result["hf_generate"], result["engine"], result["engine_prefix_cached"]
    click.echo(
        f"requests {result['requests']}, prompt tokens {result['prompt_tokens']}, "
        f"useful output tokens {result['useful_output_tokens']}, threads {result['threads']}"
    )
    click.echo(
        f"transformers generate (batches of {HF_BATCH}): {hf['tokens_per_s']:8.1f} tok/s  "
        f"({hf['seconds']:.2f} s)"
    )
    click.echo(
        f"kvmesh Engine, cold:                      {eng['tokens_per_s']:8.1f} tok/s  "
        f"({eng['seconds']:.2f} s, mean TTFT {eng['ttft_mean_s']:.2f} s)"
    )
    click.echo(
        f"kvmesh Engine, prefix cached:             {warm['tokens_per_s']:8.1f} tok/s  "
        f"({warm['seconds']:.2f} s, mean TTFT {warm['ttft_mean_s']:.2f} s), "
        f"{warm['cached_prompt_fraction']:.0%} of prompt tokens cached"
    )
    gain = result["gain_prefix_cached_vs_cold"]
    click.echo(
        f"ratio Engine / transformers: {result['ratio_engine_vs_hf']:.2f}x; "
        f"prefix-cache gain: {gain['throughput']:.2f}x throughput, "
        f"{gain['ttft_mean']:.2f}x TTFT; greedy outputs equal to transformers: "
        f"{result['greedy_outputs_equal_hf']}/{result['requests']}"
    )
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
