"""A cluster of vLLM workers (model.engine = "vllm"), end to end: `kvmesh up` under the
Python that has vLLM, two aggregated decode workers on the tiny model (eager mode). Its
greedy outputs equal in-process vllm.LLM's; a shared prefix goes to the worker holding
it, told by vLLM's own KV events renamed by kvmesh's hashes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

from kvmesh.bench.cluster import start_cluster
from kvmesh.bench.engine import run_vllm_peer
from tests.cluster.test_faults import run_streams
from tests.polling import wait_until
from tests.prompts import random_prompts
from tests.tools import require_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.cluster]

BLOCK_SIZE = 32
MAX_TOKENS = 12
VLLM_CLUSTER = (
    "nodes.0.actors.2.count=0",  # no prefill worker
    "nodes.0.actors.3.count=2",  # two vLLM decode workers
    "nodes.0.actors.4.count=0",  # no cache actor
    "model.engine=vllm",
    "model.name=tiny-llama",
    f"model.block_size={BLOCK_SIZE}",
    "model.max_model_len=512",
    "model.vllm.enforce_eager=true",
)
PROMPTS = random_prompts([(20, 90)] * 4, seed=15)
LONG = 400  # output tokens of the streams a worker's death migrates


@pytest.fixture(scope="module")
def vllm_python():
    return require_vllm()


@pytest.fixture(scope="module")
def started(tmp_path_factory, tiny_model_dir, vllm_python):
    """The cluster and, started alongside it (imports are single-threaded: two cores
    serve both), in-process vllm.LLM's greedy outputs for PROMPTS."""
    request = {
        "model": str(tiny_model_dir),
        "dtype": "float32",
        "threads": 1,
        "max_model_len": 512,
        "workload": [[ids, MAX_TOKENS] for ids in PROMPTS] + [[ids, LONG] for ids in PROMPTS[:2]],
    }
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # vllm.LLM's engine in-process
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(run_vllm_peer, vllm_python, request, 600)
        cluster = start_cluster(
            tmp_path_factory.mktemp("vllm-cluster"),
            tiny_model_dir,
            *VLLM_CLUSTER,
            timeout=600,
            python=vllm_python,
        )
        try:
            outputs = reference.result()
        except BaseException:
            cluster.stop()
            raise
        finally:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    yield cluster, outputs
    assert cluster.stop() == 0, cluster.log.read_text()[-3000:]


def complete(cluster, prompt: list[int], **fields) -> dict:
    body = {
        "model": "tiny-llama",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    response = httpx.post(f"{cluster.url}/v1/completions", json=body | fields, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_outputs_equal_in_process_vllm(started, tiny_model_dir):
    """Text for text as vLLM detokenizes it (its incremental detokenizer, streamed here,
    may differ from a plain decode of the ids: for PROMPTS[2] it starts with text of the
    prompt; in-process vLLM's is compared as well, and must agree)."""
    cluster, reference = started
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched on both workers
        replies = list(pool.map(lambda p: complete(cluster, p), PROMPTS))
    for i, (prompt, reply) in enumerate(zip(PROMPTS, replies, strict=True)):
        text = reply["choices"][0]["text"]
        assert reply["usage"]["prompt_tokens"] == len(prompt)
        assert reply["usage"]["completion_tokens"] == MAX_TOKENS
        assert reply["choices"][0]["finish_reason"] == "length"
        assert text == reference["texts"][i]
        assert text.endswith(tokenizer.decode(reference["outputs"][i]))


def test_a_shared_prefix_goes_to_the_worker_holding_it(started):
    """Two families of prompts, each a 3-block prefix and its own suffixes: once the
    first of a family ran, every later one finds the prefix cached where it is sent
    (round robin would miss about half of them)."""
    cluster, _ = started
    prefixes = random_prompts([3 * BLOCK_SIZE] * 2, seed=16)
    suffixes = random_prompts([10] * 8, seed=17)
    for prefix in prefixes:
        first = complete(cluster, prefix + suffixes[0], max_tokens=2)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    time.sleep(1.0)  # the workers' KV events reach the router
    cached = [
        complete(cluster, prefix + suffix, max_tokens=2)["usage"]["prompt_tokens_details"][
            "cached_tokens"
        ]
        for prefix in prefixes  # a family's in a row: round robin would split them
        for suffix in suffixes[1:4]
    ]
    assert cached == [3 * BLOCK_SIZE] * 6

    def counted():  # the workers' totals reach the router with their next load report
        status = cluster.status()
        workers = [status["decode-0"], status["decode-1"]]
        assert all(w["health"] == "alive" for w in workers)
        return sum(w["cached_tokens_total"] for w in workers) >= 6 * 3 * BLOCK_SIZE

    wait_until(counted, "the workers' cached_tokens_total counting the 6 hits", timeout=10)


def test_an_unknown_engine_arg_stops_kvmesh_up_naming_it(vllm_python, tiny_model_dir):
    """Checked against the installed vLLM's EngineArgs, before any actor starts."""
    sets = [f"--set={o}" for o in (*VLLM_CLUSTER, f"model.path={tiny_model_dir}")]
    proc = subprocess.run(
        [vllm_python, "-m", "kvmesh", "up", *sets, "--set=model.vllm.gpu_memory_utilisation=0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        "model.vllm.gpu_memory_utilisation: not an argument of vllm.EngineArgs; did you mean "
        "gpu_memory_utilization" in proc.stderr
    )


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (vLLM's EngineCore of a worker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def migrations(cluster) -> float:
    metrics = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("kvmesh_migrations_total")
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_of_a_vllm_worker_migrates_its_streams_unchanged(started):
    """The frontend replays prompt + tokens so far on the other worker: greedy text as
    if nothing happened. The dead worker's EngineCore does not outlive it."""
    cluster, reference = started
    victim = cluster.status()["decode-0"]["pid"]
    engine_cores = children(victim)

    streams = run_streams(
        cluster, "tiny-llama", PROMPTS[:2], LONG, during=lambda: os.kill(victim, signal.SIGKILL)
    )
    assert [s.error for s in streams] == [None, None]
    assert [s.finish_reason for s in streams] == ["length", "length"]
    assert [s.text for s in streams] == reference["texts"][len(PROMPTS) :]
    assert migrations(cluster) >= 1  # decode-0 ran one of them at least
    assert engine_cores
    wait_until(
        lambda: not any(alive(pid) for pid in engine_cores),
        "the killed worker's EngineCore exiting",
        timeout=60,
    )
