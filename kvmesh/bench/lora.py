"""`kvmesh bench lora`: Engine throughput with 0 (the base model), 1 and 4 active LoRA
adapters, same run, same workload.

Workload (seeded), EOS ignored so every request produces exactly its tokens: 48
requests, prompts uniform in 32..512 random token ids, outputs in 16..128, all
submitted at once. Adapters: random PEFT-format LoRAs of rank 16 (alpha 32) on every
projection (q, k, v, o, gate, up, down) of every layer, written for the model
(kvmesh.gpu.lora.write_random_lora). With k adapters, request i runs through adapter
i mod k, so every batch mixes k adapters; with 0, every request is the base model on
an Engine with no adapter registered (the path LoRA support must not slow down).
Each setting gets an Engine of its own (prefix caching off, so nothing is shared and
every run computes everything), adapters loaded by a warm-up before the clock starts;
the settings then take turns for 3 timed runs each (--repeats), so a change in the
machine's load falls on all of them, and each setting's fastest run counts.

Correctness, checked every run: a sample of each setting's requests (the first 8) is
run again alone, one request at a time, on an Engine of its own (no prefix cache),
and must give the same greedy tokens; and every adapted request of the sample must
differ from the base model's output for its prompt (an adapter that changes nothing
would make the throughput rows meaningless). Either failure exits non-zero.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from kvmesh.models import resolve
from kvmesh.progress import Progress

ADAPTER_COUNTS = (0, 1, 4)
NUM_REQUESTS = 48
PROMPT_LENS = (32, 512)
OUTPUT_LENS = (16, 128)
RANK, ALPHA = 16, 32.0
NUM_CHECKED = 8  # requests per setting re-run alone
REPEATS = 3  # timed runs per setting, taking turns; the best counts


def adapter_names(count: int) -> list[str]:
    return [f"lora{i}" for i in range(count)]


class Setting:
    """One setting: its own Engine with `count` adapters loaded (warm), run on demand."""

    def __init__(self, engine_factory, count: int) -> None:
        from kvmesh.params import SamplingParams

        self.count = count
        self.names = adapter_names(count)
        self.engine = engine_factory(self.names)
        # warm-up, prefill and decode (the first decode compiles the CPU kernel), which
        # also loads every adapter before the clock starts
        warm = [list(range(17, 57))] * max(count, 2)
        names = (self.names * 2)[: len(warm)] or None
        self.engine.generate(warm, SamplingParams(max_tokens=4), names)
        self.seconds: list[float] = []
        self.outputs: list[list[int]] | None = None

    def row_adapters(self, num_requests: int) -> list[str | None]:
        return [self.names[i % self.count] if self.count else None for i in range(num_requests)]

    def run(self, workload) -> None:
        """All requests at once (prefix caching is off: every repeat computes all)."""
        from kvmesh.params import SamplingParams

        start = time.perf_counter()
        ids = [
            self.engine.add_request(
                prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), adapter=a
            )
            for (prompt, n), a in zip(workload, self.row_adapters(len(workload)), strict=True)
        ]
        finals = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finals[out.request_id] = out
        self.seconds.append(time.perf_counter() - start)
        outputs = [finals[i].token_ids for i in ids]
        if self.outputs is not None and outputs != self.outputs:
            raise click.ClickException(f"{self.count} adapters: a repeat gave other tokens")
        self.outputs = outputs

    def result(self, workload) -> dict:
        useful = sum(n for _, n in workload)
        return {
            "adapters": self.count,
            "seconds": self.seconds,
            "tokens_per_s": useful / min(self.seconds),
            "adapter_loads": self.engine.adapters.num_loads,
            "row_adapters": self.row_adapters(len(workload)),
            "outputs": self.outputs,
        }


def check_setting(setting: dict, alone: list[list[int]], base: list[list[int]]) -> None:
    """ClickException naming the first checked request whose batched output differs
    from its run alone, or whose adapter left the base model's output unchanged."""
    count = setting["adapters"]
    for i, expected in enumerate(alone):
        if setting["outputs"][i] != expected:
            raise click.ClickException(
                f"{count} adapters: request {i} (adapter {setting['row_adapters'][i]}) gave "
                f"other tokens in the mixed batch than alone: {setting['outputs'][i][:8]}... "
                f"vs {expected[:8]}..."
            )
        if count and expected == base[i]:
            raise click.ClickException(
                f"{count} adapters: request {i} (adapter {setting['row_adapters'][i]}) gave the "
                "base model's tokens: the adapter changed nothing"
            )


def bench_lora(
    model_path: str | None,
    seed: int,
    threads: int | None,
    num_requests: int = NUM_REQUESTS,
    repeats: int = REPEATS,
) -> dict:
    """The three settings and their checks (see the module docstring); the results."""
    import torch

    from kvmesh.bench.trace import random_workload
    from kvmesh.engine.engine import Engine
    from kvmesh.gpu.lora import write_random_lora
    from kvmesh.gpu.model_config import ModelConfig
    from kvmesh.params import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    path = str(resolve.resolve_model(model_path).path)
    results = {}
    with tempfile.TemporaryDirectory(prefix="kvmesh-lora-") as tmp:
        config = ModelConfig.from_pretrained(path)
        paths = {
            name: write_random_lora(Path(tmp, name), config, rank=RANK, alpha=ALPHA, seed=i)
            for i, name in enumerate(adapter_names(max(ADAPTER_COUNTS)))
        }

        workload = random_workload(config.vocab_size, seed, num_requests, PROMPT_LENS, OUTPUT_LENS)
        num_blocks = sum(-(-(len(p) + n) // 16) for p, n in workload) + 64

        def engine_factory(names, **kwargs):
            adapters = {name: paths[name] for name in names}
            return Engine.from_pretrained(
                path,
                num_blocks=num_blocks,
                max_num_seqs=num_requests,
                adapters=adapters,
                max_loras=max(len(adapters), 1),
                enable_prefix_caching=False,
                **kwargs,
            )

        with Progress("kvmesh Engine: one per setting, warm-up"):
            runs = [Setting(engine_factory, count) for count in ADAPTER_COUNTS]
        # settings take turns, so a change in the machine's load falls on all of them
        for repeat in range(repeats):
            with Progress(f"repeat {repeat + 1}/{repeats}: 0, 1 and 4 adapters"):
                for run in runs:
                    if threads:  # the engine's first decode resets torch's thread count
                        torch.set_num_threads(threads)
                    run.run(workload)
        num_threads = torch.get_num_threads()
        settings = [run.result(workload) for run in runs]
        del runs
        with Progress("checking outputs: requests alone"):
            checker = engine_factory(list(paths))
            checked = min(NUM_CHECKED, num_requests)
            base = [
                checker.generate(
                    [prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                )[0].token_ids
                for prompt, n in workload[:checked]
            ]
            for setting in settings:
                alone = [
                    checker.generate(
                        [prompt],
                        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                        setting["row_adapters"][i],
                    )[0].token_ids
                    for i, (prompt, n) in enumerate(workload[:checked])
                ]
                check_setting(setting, alone, base)
    base_rate = settings[0]["tokens_per_s"]
    for setting in settings:
        setting["ratio_vs_base"] = setting["tokens_per_s"] / base_rate
        del setting["outputs"], setting["row_adapters"]
    results.update(
        model=path,
        requests=num_requests,
        prompt_tokens=sum(len(p) for p, _ in workload),
        useful_output_tokens=sum(n for _, n in workload),
        threads=num_threads,
        rank=RANK,
        alpha=ALPHA,
        repeats=repeats,
        checked_requests_per_setting=checked,
        settings=settings,
    )
    return results


@click.command("lora")
@click.option(
    "--model", "model_path", default=None, help=f"{resolve.HELP} [default: the tiny model]"
)
@click.option("--seed", default=0, show_default=True, help="Workload seed.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads.")
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1),
    default=NUM_REQUESTS,
    show_default=True,
    help="Number of requests per setting.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=REPEATS,
    show_default=True,
    help="Timed runs per setting (settings take turns); the fastest counts.",
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results to this JSON file.",
)
def lora_command(model_path, seed, threads, num_requests, repeats, json_file) -> None:
    """Engine output tok/s with 0, 1 and 4 LoRA adapters in mixed batches."""
    result = bench_lora(model_path, seed, threads, num_requests, repeats)
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
    click.echo(
        f"requests {result['requests']}, prompt tokens {result['prompt_tokens']}, useful "
        f"output tokens {result['useful_output_tokens']}, threads {result['threads']}, "
        f"LoRA rank {RANK} on q/k/v/o/gate/up/down"
    )
    for setting in result["settings"]:
        count, seconds = setting["adapters"], setting["seconds"]
        label = f"{count} adapter(s), mixed" if count else "base model, no adapter"
        click.echo(
            f"{label:<24} {setting['tokens_per_s']:8.1f} tok/s  (best of {len(seconds)}: "
            f"{min(seconds):.2f} s)  ratio vs base {setting['ratio_vs_base']:.2f}x"
        )
    click.echo(
        f"outputs checked: {result['checked_requests_per_setting']} requests per setting equal "
        "their run alone, and every adapted one differs from the base model"
    )
