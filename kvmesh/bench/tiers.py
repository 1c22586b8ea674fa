"""`kvmesh bench tiers`: the tiered KV cache on a multi-turn workload larger than the
device pool; device only (the baseline) against + host and + host + disk, and small host
and disk tiers with and without the object tier behind them, same run.

Workload (seeded): `conversations` chats of `turns` turns. Each user message is random
token ids (FIRST_TOKEN_ID.., as trace.random_prompt draws them): `first_tokens` for the
first turn, `user_tokens` after. A turn's prompt is the whole history, so its prefix is
what the previous turn computed; each turn generates `output_tokens` greedily (EOS
ignored), and the next prompt carries them:

    turn 1   [u1]
    turn 2   [u1][o1][u2]            [u1][o1] computed by turn 1
    turn 3   [u1][o1][u2][o2][u3]    [u1][o1][u2][o2] computed by turn 2

Turns are served round-robin across conversations (every chat's turn 1, then every
chat's turn 2, ...), one request at a time, so TTFT (add_request until the step that
returns the first token) is the request's onboarding plus its prefill alone, and by the
time a chat comes back the others have pushed its blocks out of the device pool. The
working set, the final contexts of all chats in blocks, is ~4x the pool by default.

Configurations, each a fresh Engine (same model, same pool size) with:
  device     no connector: a prefix evicted from the pool is recomputed (the baseline)
  host       + a host tier holding the whole working set (plus one pool of slack)
  host_disk  + a host tier of `host_blocks` (default 1x the pool) over a disk tier holding
             the whole working set, in a fresh temp dir (under `disk_dir`), deleted after
  small      host `host_blocks` over a disk of `small_disk_blocks`: DRAM + SSD smaller
             than the working set (with --object, the default)
  object     small + the object tier, a bucket with a latency injected per request
             (kvmesh.bench.tiers_object; its crossover sweep is there too)
Rounds: every configuration runs once per round, in turn, so a burst of load from
elsewhere hits all of them; each figure is its configuration's round of lowest TTFT
mean. Hit rate: cached prompt tokens (device prefix cache and onboarded blocks) / prompt
tokens. Greedy outputs must be equal in all of them: the tiers move KV, never change it;
a mismatch fails the command (after the table and JSON are written).
The disk tier's files were written moments before they are read, so its reads mostly
come from the OS page cache: this measures the store's path, not the drive.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import msgspec

from kvmesh.bench.trace import random_prompt, stats
from kvmesh.models import resolve
from kvmesh.progress import Progress
from kvmesh.protocol import TierCounters

CONFIGS = ("device", "host", "host_disk")
OBJECT_CONFIGS = ("small", "object")
TARGET_OBJECT_TTFT = 0.5  # TTFT with the object tier, x recomputing, on long prompts
TARGET_HOST_DISK_TTFT = 0.5  # TTFT mean with host + disk, x device only
BLOCK_SIZE = 16


@dataclass(frozen=True)
class MultiTurn:
    """The workload's shape; see the module doc."""

    conversations: int = 8
    turns: int = 4
    first_tokens: int = 256
    user_tokens: int = 224
    output_tokens: int = 32

    @property
    def context_tokens(self) -> int:
        """Tokens of one chat's history after its last turn."""
        return (
            self.first_tokens
            + (self.turns - 1) * self.user_tokens
            + self.turns * self.output_tokens
        )

    @property
    def working_set_blocks(self) -> int:
        return self.conversations * -(-self.context_tokens // BLOCK_SIZE)

    def user_messages(self, vocab_size: int, seed: int) -> list[list[list[int]]]:
        """[conversation][turn] -> token ids; the same for every configuration."""
        rng = random.Random(seed)
        return [
            [
                random_prompt(rng, self.first_tokens if turn == 0 else self.user_tokens, vocab_size)
                for turn in range(self.turns)
            ]
            for _ in range(self.conversations)
        ]


def serve_one(engine, prompt: list[int], max_tokens: int):
    """Run one request alone: (seconds to its first token, its final RequestOutput)."""
    from kvmesh.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    request_id = engine.add_request(prompt, params)
    ttft = None
    while True:
        for out in engine.step():
            assert out.request_id == request_id, f"{out.request_id} while serving {request_id}"
            if ttft is None:
                ttft = time.perf_counter() - start
            if out.finished:
                return ttft, out


def run_conversations(engine, workload: MultiTurn, messages: list[list[list[int]]]) -> dict:
    """Serve every turn round-robin; TTFTs, cached and prompt tokens, outputs in order."""
    import numpy as np

    history: list[list[int]] = [[] for _ in messages]
    ttfts, outputs, texts, cached, prompt_tokens = [], [], [], 0, 0
    start = time.perf_counter()
    for turn in range(workload.turns):
        for chat, chat_messages in enumerate(messages):
            prompt = history[chat] + chat_messages[turn]
            ttft, out = serve_one(engine, prompt, workload.output_tokens)
            history[chat] = prompt + out.token_ids
            ttfts.append(ttft)
            outputs.append(out.token_ids)
            texts.append(out.text)
            cached += out.num_cached_tokens
            prompt_tokens += len(prompt)
    return {
        "seconds": time.perf_counter() - start,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "hit_rate": cached / prompt_tokens,
        **stats(ttfts, "ttft"),
        "ttft_p90_s": float(np.percentile(ttfts, 90)),
        "ttft_s": ttfts,
        "outputs": outputs,
        "texts": texts,
    }


def tier_counters(connector) -> dict[str, dict[str, int]]:
    """Per tier, what the store counted (offloaded, lookups, hits, evicted) and the
    connector (onboarded, failed), as one JSON object."""
    stored = connector.store.counters()
    return {
        tier: msgspec.structs.asdict(stored.get(tier, TierCounters()))
        | msgspec.structs.asdict(onboard)
        for tier, onboard in connector.metrics().items()
    }


def make_connector(
    record_bytes: int,
    host_blocks: int,
    disk_dir: str | None = None,
    disk_blocks: int = 0,
    objects=None,
):
    """A LocalTieredConnector of exactly host_blocks host slots (and disk_blocks files, and
    an ObjectTier behind them)."""
    from kvmesh.cache.disk_tier import HEADER
    from kvmesh.cache.host_tier import pool_bytes
    from kvmesh.engine.kv_connector import LocalTieredConnector

    return LocalTieredConnector(
        record_bytes,
        pool_bytes(host_blocks, record_bytes),
        disk_dir,
        disk_blocks * (HEADER.size + record_bytes),
        objects=objects,
    )


def bench_tiers(
    model_path: str | None,
    seed: int,
    threads: int | None,
    workload: MultiTurn,
    pool_blocks: int,
    host_blocks: int | None = None,
    repeats: int = 1,
    disk_dir: str | None = None,
    cluster: bool = False,
    objects: dict | None = None,
) -> dict:
    """Every configuration on the same workload; see the module doc. `objects`: the
    object tier's settings (latency_ms, url, endpoint, small_disk_blocks, crossover)."""
    import torch

    from kvmesh.gpu.loader import load_model, torch_dtype
    from kvmesh.gpu.model_config import ModelConfig
    from kvmesh.tokenizer import Tokenizer

    if threads:
        torch.set_num_threads(threads)
    path = str(resolve.resolve_model(model_path).path)
    config = ModelConfig.from_pretrained(path)
    if workload.context_tokens >= config.max_model_len:
        raise click.BadParameter(
            f"a chat's final context is {workload.context_tokens} tokens; the model's "
            f"context is {config.max_model_len}",
            param_hint="--first-tokens/--user-tokens",
        )
    if workload.context_tokens + 1 > pool_blocks * BLOCK_SIZE:
        raise click.BadParameter(
            f"a chat's final context ({workload.context_tokens} tokens) does not fit a pool "
            f"of {pool_blocks} blocks of {BLOCK_SIZE}",
            param_hint="--pool-blocks",
        )
    bench = TiersBench(
        load_model(path),
        Tokenizer.from_pretrained(path),
        config,
        pool_blocks,
        config.kv_record_bytes(BLOCK_SIZE, torch_dtype("float32").itemsize),
    )
    whole = workload.working_set_blocks + pool_blocks  # "holds the whole working set"
    tiers = {
        "device": (0, 0),
        "host": (whole, 0),
        "host_disk": (pool_blocks if host_blocks is None else host_blocks, whole),
    }
    all_tiers = dict(tiers)
    bucket = crossover = None
    if objects is not None:
        from kvmesh.bench.tiers_object import Bucket

        bucket = Bucket(
            bench.record_bytes, objects["latency_ms"] / 1e3, objects["url"], objects["endpoint"]
        )
        small = (tiers["host_disk"][0], objects["small_disk_blocks"])
        all_tiers |= {"small": small, "object": (*small, bucket.tier)}
    if disk_dir is not None:
        Path(disk_dir).mkdir(parents=True, exist_ok=True)
    bench.disk_root = Path(tempfile.mkdtemp(prefix="kvmesh-bench-tiers-", dir=disk_dir))
    try:
        with Progress("warming up (kernels compile)"):
            bench.warm_up()
        messages = workload.user_messages(config.vocab_size, seed)
        best, equal = bench.rounds(workload, messages, all_tiers, repeats)
        if bucket is not None and objects["crossover"]:
            from kvmesh.bench.tiers_object import crossover as sweep

            with Progress("object tier vs recompute, per prompt length"):
                crossover = sweep(bench, bucket, objects["crossover"], seed, repeats)
    finally:
        shutil.rmtree(bench.disk_root, ignore_errors=True)
        if bucket is not None:
            bucket.close()
    through_clusters = None
    if cluster:
        from kvmesh.bench.tiers_cluster import bench_tiers_cluster

        through_clusters = bench_tiers_cluster(
            Path(path),
            messages,
            bench.reference,
            workload.turns,
            workload.output_tokens,
            pool_blocks,
            tiers,
            bench.record_bytes,
            disk_dir,
        )
    device = best["device"]
    names = [name for name in (*CONFIGS, *OBJECT_CONFIGS) if name in best]
    return {
        "model": path,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "repeats": repeats,
        "workload": asdict(workload),
        "requests": workload.conversations * workload.turns,
        "block_size": BLOCK_SIZE,
        "pool_blocks": pool_blocks,
        "working_set_blocks": workload.working_set_blocks,
        "working_set_vs_pool": workload.working_set_blocks / pool_blocks,
        "configs": best,
        "ttft_mean_vs_device": {
            name: best[name]["ttft_mean_s"] / device["ttft_mean_s"] for name in names[1:]
        },
        "target_ttft_mean_host_disk_vs_device": TARGET_HOST_DISK_TTFT,
        "greedy_outputs_equal_device": equal,
        "greedy_outputs_all_equal": all(
            n == workload.conversations * workload.turns for n in equal.values()
        )
        and all(row["outputs_equal"] for row in crossover or ()),
        "cluster": through_clusters,
        "object": None
        if objects is None
        else {
            "latency_ms": objects["latency_ms"],
            "url": bucket.url,
            "server": "moto (local process)" if bucket.server else bucket.endpoint or "AWS",
            "working_set_vs_host_disk": workload.working_set_blocks / sum(all_tiers["small"]),
            "crossover": crossover,
            "target_ttft_vs_recompute": TARGET_OBJECT_TTFT,
        },
    }


class TiersBench:
    """One model, engines over pools of `pool_blocks`, connectors under `disk_root`."""

    def __init__(self, model, tokenizer, config, pool_blocks: int, record_bytes: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.pool_blocks = pool_blocks
        self.record_bytes = record_bytes
        self.disk_root = Path(tempfile.gettempdir())
        self.reference: tuple[list[list[int]], list[str]] | None = None

    def run(
        self,
        workload: MultiTurn,
        messages,
        host_blocks: int,
        disk_blocks: int,
        name: str,
        pool_blocks: int | None = None,
        objects: list | None = None,
    ) -> dict:
        """One configuration on a fresh engine (no connector when host_blocks is 0), with
        the connector's counters; the disk tier starts empty in a fresh directory, and
        the object tier (`objects`: [a factory of empty ones]) in a fresh prefix."""
        from kvmesh.engine.engine import Engine

        connector = None
        if host_blocks:
            disk_dir = (
                tempfile.mkdtemp(prefix=f"{name}-", dir=self.disk_root) if disk_blocks else None
            )
            tier = objects[0]() if objects else None
            connector = make_connector(
                self.record_bytes, host_blocks, disk_dir, disk_blocks, objects=tier
            )
        try:
            engine = Engine(
                self.model,
                self.tokenizer,
                self.config,
                block_size=BLOCK_SIZE,
                num_blocks=pool_blocks or self.pool_blocks,
                max_num_seqs=1,
                kv_connector=connector,
            )
            result = run_conversations(engine, workload, messages)
            result["preemptions"] = engine.num_preemptions
            result["onboarded"] = {}
            if connector is not None:
                result["tiers"] = tier_counters(connector)
                result["onboarded"] = {
                    tier: counters.onboarded for tier, counters in connector.metrics().items()
                }
                result["host_blocks"] = connector.store.host.num_slots
                if connector.store.disk is not None:
                    result["disk_blocks"] = connector.store.disk.num_files
                if connector.store.objects is not None:
                    result["object_blocks"] = len(connector.store.objects)
            return result
        finally:
            if connector is not None:
                connector.close()

    def warm_up(self) -> None:
        """Compile the kernels (attention, pack/unpack: Numba) on a throwaway engine whose
        small pool and tiers make it offload and onboard from both tiers."""
        small = MultiTurn(
            conversations=3, turns=2, first_tokens=96, user_tokens=32, output_tokens=4
        )
        self.run(
            small,
            small.user_messages(self.config.vocab_size, seed=-1),
            4,
            64,
            "warm-up",
            pool_blocks=16,
        )

    def rounds(
        self, workload: MultiTurn, messages, tiers: dict[str, tuple[int, int]], repeats: int
    ) -> tuple[dict, dict]:
        """Every configuration once per round, in turn, so a burst of load from elsewhere
        hits all of them; each keeps its round of lowest TTFT mean. Returns those and, per
        tier configuration, its fewest greedy outputs equal to device only's first round."""
        best, equal, reference = {}, {}, None
        runs = [name for _ in range(repeats) for name in tiers]
        with Progress("measuring (configurations run)", total=len(runs)) as progress:
            for name in progress.track(runs):
                host_blocks, disk_blocks, *objects = tiers[name]
                result = self.run(
                    workload, messages, host_blocks, disk_blocks, name, objects=objects
                )
                outputs = result.pop("outputs")
                texts = result.pop("texts")
                if reference is None:
                    reference = outputs
                    self.reference = (outputs, texts)  # device only's: what --cluster replays
                elif name != "device":
                    same = sum(a == b for a, b in zip(reference, outputs, strict=True))
                    equal[name] = min(equal.get(name, same), same)
                if name not in best or result["ttft_mean_s"] < best[name]["ttft_mean_s"]:
                    best[name] = result
        return best, equal


def report(result: dict) -> str:
    """The table and the ratio lines the command prints."""
    workload = result["workload"]
    lines = [
        f"{workload['conversations']} chats x {workload['turns']} turns = "
        f"{result['requests']} requests, "
        f"working set {result['working_set_blocks']} blocks = "
        f"{result['working_set_vs_pool']:.1f}x the device pool ({result['pool_blocks']} "
        f"blocks of {result['block_size']}), threads {result['threads']}",
        f"{'config':<10} {'tiers (blocks)':<22} {'hit rate':>8} {'TTFT mean':>10} "
        f"{'p50':>8} {'p90':>8} {'onboard host/disk/obj':>22} {'vs device':>10}",
    ]
    for name in (*CONFIGS, *OBJECT_CONFIGS):
        r = result["configs"].get(name)
        if r is None:
            continue
        tiers = "-" if "host_blocks" not in r else f"host {r['host_blocks']}"
        if "disk_blocks" in r:
            tiers += f", disk {r['disk_blocks']}"
        if "object_blocks" in r:
            tiers += ", bucket"
        onboarded = r["onboarded"]
        onboard = (
            "/".join(str(onboarded.get(t, 0)) for t in ("host", "disk", "object"))
            if onboarded
            else "-"
        )
        ratio = result["ttft_mean_vs_device"].get(name, 1.0)
        lines.append(
            f"{name:<10} {tiers:<22} {r['hit_rate']:>8.1%} {r['ttft_mean_s'] * 1e3:>8.1f}ms "
            f"{r['ttft_p50_s'] * 1e3:>6.1f}ms {r['ttft_p90_s'] * 1e3:>6.1f}ms "
            f"{onboard:>22} {ratio:>9.2f}x"
        )
    equal = result["greedy_outputs_equal_device"]
    ratio = result["ttft_mean_vs_device"]["host_disk"]
    lines.append(
        f"ratio TTFT mean host+disk / device only: {ratio:.2f}x (target <= "
        f"{result['target_ttft_mean_host_disk_vs_device']}x); greedy outputs equal to "
        f"device only: host {equal['host']}/{result['requests']}, "
        f"host_disk {equal['host_disk']}/{result['requests']}"
        + "".join(
            f", {name} {equal[name]}/{result['requests']}"
            for name in OBJECT_CONFIGS
            if name in equal
        )
    )
    if result.get("object"):
        from kvmesh.bench.tiers_object import report_crossover

        obj = result["object"]
        lines.append(
            f"object tier: {obj['latency_ms']:g} ms injected per request, {obj['server']}; "
            f"working set {obj['working_set_vs_host_disk']:.1f}x the small host + disk"
        )
        if obj["crossover"]:
            lines.append(report_crossover(obj["crossover"], obj["latency_ms"]))
    if result.get("cluster"):
        from kvmesh.bench.tiers_cluster import report_cluster

        lines.append(report_cluster(result["cluster"]))
    return "\n".join(lines)


@click.command("tiers")
@click.option(
    "--model", "model_path", default=None, help=f"{resolve.HELP} [default: the tiny model]"
)
@click.option("--seed", default=0, show_default=True, help="Workload seed.")
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="torch threads [default: torch's choice].",
)
@click.option(
    "--conversations",
    type=click.IntRange(1),
    default=MultiTurn.conversations,
    show_default=True,
    help="Chats, served round-robin.",
)
@click.option(
    "--turns",
    type=click.IntRange(1),
    default=MultiTurn.turns,
    show_default=True,
    help="Turns per chat.",
)
@click.option(
    "--first-tokens",
    type=click.IntRange(1),
    default=MultiTurn.first_tokens,
    show_default=True,
    help="Tokens of a chat's first user message.",
)
@click.option(
    "--user-tokens",
    type=click.IntRange(1),
    default=MultiTurn.user_tokens,
    show_default=True,
    help="Tokens of each later user message.",
)
@click.option(
    "--output-tokens",
    type=click.IntRange(1),
    default=MultiTurn.output_tokens,
    show_default=True,
    help="Tokens generated per turn.",
)
@click.option(
    "--pool-blocks",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="Device pool size, in blocks of 16 tokens.",
)
@click.option(
    "--host-blocks",
    type=click.IntRange(1),
    default=None,
    help="Host tier of the host+disk config, in blocks [default: --pool-blocks].",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Rounds of every configuration; each keeps its best round.",
)
@click.option(
    "--disk-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Parent of the disk tier's temp dir, deleted after [default: the system's].",
)
@click.option(
    "--cluster",
    is_flag=True,
    help="Also replay the chats through real clusters (`kvmesh up`: one decode "
    "worker, the cache actor holding the tiers), one per configuration.",
)
@click.option(
    "--object/--no-object",
    "with_object",
    default=True,
    show_default=True,
    help="Also run the small / object configurations and the crossover sweep.",
)
@click.option(
    "--object-latency-ms",
    type=click.FloatRange(0),
    default=50.0,
    show_default=True,
    help="Latency injected before each object request (parallel requests overlap).",
)
@click.option(
    "--object-url",
    default="",
    help="s3://bucket[/prefix] of a real store [default: a moto server process].",
)
@click.option("--object-endpoint", default="", help="Its endpoint (MinIO, ...).")
@click.option(
    "--small-disk-blocks",
    type=click.IntRange(1),
    default=None,
    help="Disk tier of the small / object configs, in blocks [default: --pool-blocks].",
)
@click.option(
    "--crossover-tokens",
    default="256,1024,2048,4000",
    show_default=True,
    help='Prompt lengths of the fetch-vs-recompute sweep, comma-separated ("": none).',
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results to this JSON file.",
)
def tiers_command(
    model_path,
    seed,
    threads,
    conversations,
    turns,
    first_tokens,
    user_tokens,
    output_tokens,
    pool_blocks,
    host_blocks,
    repeats,
    disk_dir,
    cluster,
    with_object,
    object_latency_ms,
    object_url,
    object_endpoint,
    small_disk_blocks,
    crossover_tokens,
    json_file,
) -> None:
    """Tiered KV cache on multi-turn chats: device only vs + host vs + host + disk, and
    small host + disk with and without the object tier (a bucket) behind them."""
    workload = MultiTurn(conversations, turns, first_tokens, user_tokens, output_tokens)
    objects = None
    if with_object:
        try:
            lengths = [int(n) for n in crossover_tokens.split(",") if n.strip()]
        except ValueError:
            raise click.BadParameter(
                f"expected comma-separated token counts, got {crossover_tokens!r}",
                param_hint="--crossover-tokens",
            ) from None
        objects = {
            "latency_ms": object_latency_ms,
            "url": object_url,
            "endpoint": object_endpoint,
            "small_disk_blocks": small_disk_blocks or pool_blocks,
            "crossover": lengths,
        }
    result = bench_tiers(
        model_path,
        seed,
        threads,
        workload,
        pool_blocks,
        host_blocks,
        repeats,
        disk_dir,
        cluster,
        objects,
    )
    click.echo(report(result))
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
    if not result["greedy_outputs_all_equal"]:
        raise click.ClickException(
            "a tier configuration changed greedy outputs (see the table): the tiers must move "
            "KV, never change it"
        )
