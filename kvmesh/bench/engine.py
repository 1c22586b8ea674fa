"""`kvmesh bench engine`: Engine throughput against transformers `generate` and vLLM,
same run.

Workload (seeded), EOS ignored so every side produces exactly the requested tokens:
the tiny model (the default) gets 64 requests, prompts uniform in 32..1024 tokens of
random ids, outputs in 16..256; a real model (--model) gets 48 requests, prompts in
32..768, outputs in 16..160. Baseline: transformers generate in padded batches of 8 in
arrival order, each batch running to its longest output (static batching); only the
requested tokens count as useful. Then the Engine runs the same requests twice: a
cold pass, and a second pass whose prompts are all in the prefix cache. When vLLM is
importable here, or --peer-python names an interpreter that has it, `vllm.LLM` runs
the same workload on the same checkpoint, dtype and threads (kvmesh/bench/vllm_peer.py,
exchanging JSON files), all requests at once like the Engine's cold pass.

In float32 the Engine's greedy tokens must equal transformers' (else the command
fails); in bfloat16, and against vLLM, agreement is reported as counts.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from kvmesh.models import resolve
from kvmesh.progress import Progress

HF_BATCH = 8
DTYPES = ("float32", "bfloat16")
PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")


@dataclass(frozen=True)
class Workload:
    """Request count and the closed ranges prompt and output lengths are drawn from."""

    num_requests: int
    prompt_lens: tuple[int, int]
    output_lens: tuple[int, int]


TINY_WORKLOAD = Workload(64, (32, 1024), (16, 256))  # the tiny model (no --model)
REAL_WORKLOAD = Workload(48, (32, 768), (16, 160))  # a real model (--model)
NUM_REQUESTS = TINY_WORKLOAD.num_requests


def make_workload(
    vocab_size: int, seed: int, num_requests: int = NUM_REQUESTS, shape: Workload = TINY_WORKLOAD
):
    """(prompt token ids, output length) pairs; ids avoid the low (special) range."""
    from kvmesh.bench.trace import random_workload

    return random_workload(vocab_size, seed, num_requests, shape.prompt_lens, shape.output_lens)


def find_peer_python(option: str | None) -> str | None:
    """The interpreter that runs vLLM: --peer-python, else this one if it can import vllm,
    else None (no vLLM side)."""
    if option:
        return option
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


peer_python_option = click.option(
    "--peer-python",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Interpreter with vLLM installed to run the vLLM side [default: this one if it "
    "can import vllm, else no vLLM side].",
)


def run_vllm_peer(python: str, request: dict, timeout: float = 3600) -> dict:
    """Run kvmesh/bench/vllm_peer.py under `python`; its checked result."""
    with tempfile.TemporaryDirectory(prefix="kvmesh-vllm-peer-") as tmp:
        request_file, result_file = Path(tmp, "request.json"), Path(tmp, "result.json")
        request_file.write_text(json.dumps(request))
        proc = subprocess.run(
            [python, str(PEER_SCRIPT), str(request_file), str(result_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise click.ClickException(
                f"the vLLM peer ({python}) exited with status {proc.returncode}:\n{tail}"
            )
        return check_peer_result(json.loads(result_file.read_text()), request["workload"])


def check_peer_result(result, workload: list) -> dict:
    """The peer's result if it answered every request with exactly its output tokens;
    ClickException naming what is wrong otherwise (a short reply is a failure)."""
    if not isinstance(result, dict):
        raise click.ClickException("vLLM peer result: must be a JSON object")
    for name in ("vllm_version", "load_seconds", "seconds", "outputs"):
        if name not in result:
            raise click.ClickException(f"vLLM peer result: {name} is missing")
    outputs = result["outputs"]
    if not isinstance(outputs, list) or len(outputs) != len(workload):
        got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise click.ClickException(
            f"vLLM peer result: outputs has {got} entries for {len(workload)} requests"
        )
    for i, (out, (_, n)) in enumerate(zip(outputs, workload, strict=True)):
        if not isinstance(out, list) or len(out) != n:
            got = len(out) if isinstance(out, list) else type(out).__name__
            raise click.ClickException(
                f"vLLM peer result: outputs[{i}] has {got} tokens, {n} were asked for"
            )
    if not (isinstance(result["seconds"], int | float) and result["seconds"] > 0):
        raise click.ClickException(
            f"vLLM peer result: seconds must be > 0, got {result['seconds']!r}"
        )
    return result


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
    model_path: str | None,
    seed: int,
    threads: int | None,
    num_requests: int | None = None,
    dtype: str = "float32",
    peer_python: str | None = None,
) -> dict:
    """Run the workload through transformers, the Engine (cold, then prefix cached) and,
    with a peer interpreter, vLLM; the results (see engine_command)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvmesh.engine.engine import Engine

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    shape = TINY_WORKLOAD if model_path is None else REAL_WORKLOAD
    num_requests = num_requests or shape.num_requests
    path = str(resolve.resolve_model(model_path).path)
    start = time.perf_counter()
    engine = Engine.from_pretrained(path, dtype=dtype, max_num_seqs=num_requests)
    engine_load_s = time.perf_counter() - start
    workload = make_workload(engine.config.vocab_size, seed, num_requests, shape)
    useful = sum(n for _, n in workload)

    with Progress("baseline: transformers generate, warm-up then measured"):
        start = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        hf_load_s = time.perf_counter() - start
        hf.generation_config.eos_token_id = None
        run_hf(hf, workload[:2], pad_id=0)  # warm-up
        hf_s, hf_out = run_hf(hf, workload, pad_id=0)
        del hf

    with Progress("kvmesh Engine: warm-up, cold, prefix cached"):
        run_engine(engine, make_workload(engine.config.vocab_size, seed + 1, 4, shape))  # warm-up
        engine.pool.reset_prefix_cache()
        cold = run_engine(engine, workload)
        warm = run_engine(engine, workload)
    prompt_tokens = sum(len(p) for p, _ in workload)
    result = {
        "model": path,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "requests": len(workload),
        "prompt_lens": list(shape.prompt_lens),
        "output_lens": list(shape.output_lens),
        "prompt_tokens": prompt_tokens,
        "useful_output_tokens": useful,
        "hf_generate": {
            "seconds": hf_s,
            "tokens_per_s": useful / hf_s,
            "batch": HF_BATCH,
            "load_seconds": hf_load_s,
        },
        "engine": {
            "seconds": cold["seconds"],
            "tokens_per_s": useful / cold["seconds"],
            "ttft_mean_s": cold["ttft_mean_s"],
            "load_seconds": engine_load_s,
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
        "greedy_outputs_equal_hf": _agree(cold["outputs"], hf_out),
        "greedy_outputs_equal_cold_vs_cached": _agree(cold["outputs"], warm["outputs"]),
        "vllm": None,
    }
    del engine
    if peer_python is not None:
        request = {
            "model": path,
            "dtype": dtype,
            "threads": result["threads"],
            "max_model_len": max(len(p) + n for p, n in workload),
            "workload": workload,
        }
        with Progress(f"vLLM peer ({peer_python}): load, warm-up, measured"):
            peer = run_vllm_peer(peer_python, request)
        result["vllm"] = {
            "version": peer["vllm_version"],
            "python": peer_python,
            "seconds": peer["seconds"],
            "tokens_per_s": useful / peer["seconds"],
            "load_seconds": peer["load_seconds"],
        }
        result["ratio_engine_vs_vllm"] = peer["seconds"] / cold["seconds"]
        result["greedy_outputs_equal_vllm"] = _agree(cold["outputs"], peer["outputs"])
        result["greedy_outputs_equal_vllm_vs_hf"] = _agree(peer["outputs"], hf_out)
    return result


def _agree(a: list[list[int]], b: list[list[int]]) -> int:
    """How many requests got the very same tokens on both sides."""
    return sum(x == y for x, y in zip(a, b, strict=True))


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
    default=None,
    help=f"Number of requests [default: {TINY_WORKLOAD.num_requests} for the tiny model, "
    f"{REAL_WORKLOAD.num_requests} with --model].",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="float32",
    show_default=True,
    help="Weights and KV dtype of every side.",
)
@peer_python_option
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results to this JSON file.",
)
def engine_command(model_path, seed, threads, num_requests, dtype, peer_python, json_file) -> None:
    """Engine vs transformers generate (padded batches of 8) and vLLM: useful output tok/s."""
    if threads is not None and threads < 1:
        raise click.BadParameter(f"must be at least 1, got {threads}", param_hint="--threads")
    peer_python = find_peer_python(peer_python)
    result = bench_engine(model_path, seed, threads, num_requests, dtype, peer_python)
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
    hf, eng, warm = result["hf_generate"], result["engine"], result["engine_prefix_cached"]
    n = result["requests"]
    click.echo(
        f"requests {n}, prompt tokens {result['prompt_tokens']}, useful output tokens "
        f"{result['useful_output_tokens']}, threads {result['threads']}, dtype {dtype}"
    )
    click.echo(
        f"transformers generate (batches of {HF_BATCH}): {hf['tokens_per_s']:8.1f} tok/s  "
        f"({hf['seconds']:.2f} s; load {hf['load_seconds']:.1f} s)"
    )
    click.echo(
        f"kvmesh Engine, cold:                      {eng['tokens_per_s']:8.1f} tok/s  "
        f"({eng['seconds']:.2f} s, mean TTFT {eng['ttft_mean_s']:.2f} s; "
        f"load {eng['load_seconds']:.1f} s)"
    )
    click.echo(
        f"kvmesh Engine, prefix cached:             {warm['tokens_per_s']:8.1f} tok/s  "
        f"({warm['seconds']:.2f} s, mean TTFT {warm['ttft_mean_s']:.2f} s), "
        f"{warm['cached_prompt_fraction']:.0%} of prompt tokens cached"
    )
    vllm = result["vllm"]
    if vllm is not None:
        click.echo(
            f"vLLM {vllm['version']} LLM.generate:          {vllm['tokens_per_s']:8.1f} tok/s  "
            f"({vllm['seconds']:.2f} s; load {vllm['load_seconds']:.1f} s)"
        )
    gain = result["gain_prefix_cached_vs_cold"]
    click.echo(
        f"ratio Engine / transformers: {result['ratio_engine_vs_hf']:.2f}x; "
        f"prefix-cache gain: {gain['throughput']:.2f}x throughput, "
        f"{gain['ttft_mean']:.2f}x TTFT; greedy outputs equal to transformers: "
        f"{result['greedy_outputs_equal_hf']}/{n} (prefix cached vs cold: "
        f"{result['greedy_outputs_equal_cold_vs_cached']}/{n})"
    )
    if vllm is not None:
        click.echo(
            f"ratio Engine / vLLM: {result['ratio_engine_vs_vllm']:.2f}x; greedy outputs "
            f"equal to vLLM: {result['greedy_outputs_equal_vllm']}/{n} "
            f"(vLLM vs transformers: {result['greedy_outputs_equal_vllm_vs_hf']}/{n})"
        )
    else:
        click.echo("vLLM: not run (not importable here; --peer-python PATH names one that is)")
    if dtype == "float32" and result["greedy_outputs_equal_hf"] != n:
        raise click.ClickException(
            f"greedy outputs differ from transformers in float32 on "
            f"{n - result['greedy_outputs_equal_hf']}/{n} requests"
        )
