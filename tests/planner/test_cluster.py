"""The planner in a real cluster: `kvmesh up` with a planner actor, streams in flight
while it moves a decode worker to the prefill role (its own streams finish there, and
it prefills for the other from then on); every output equals the single-process
Engine's greedy one and the decision is in the planner's metric."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.bench.cluster import start_cluster
from tests.polling import wait_until
from tests.prompts import random_prompts

pytestmark = pytest.mark.cluster

MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planner_metric(port: int, action: str, outcome: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    want = f'kvmesh_planner_decisions_total{{action="{action}",outcome="{outcome}"}} '
    for line in text.splitlines():
        if line.startswith(want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


API_KEY = "planner-test-key"


@pytest.fixture(scope="module", params=["open", "keys"])
def cluster(request, tmp_path_factory, tiny_model_dir, metrics_port):
    """frontend, router, prefill-0, decode-0, decode-1 and a planner (in the cache
    actor's place) whose targets make prefill short and decode spare: TTFT over any
    measurable target, ITL far under its own. One switch (long cooldown). "keys": every
    actor holds a CurveZMQ key (the workers' name the role "worker", which the planner
    switches) and /metrics needs an API key (the planner scrapes with the key file's)."""
    directory = tmp_path_factory.mktemp("planner")
    secured = []
    if request.param == "keys":
        planner = "nodes.0.actors.4.role=planner"
        subprocess.run(
            [sys.executable, "-m", "kvmesh", "keys", "generate", str(directory / "keys")]
            + ["--set", planner],
            check=True,
            capture_output=True,
        )
        (directory / "api_keys").write_text(f"{API_KEY}\n")
        secured = [
            f"security.key_dir={directory / 'keys'}",
            f"frontend.api_key_file={directory / 'api_keys'}",
            "frontend.metrics_auth=true",
        ]
    c = start_cluster(
        directory,
        tiny_model_dir,
        *secured,
        # explicit counts: without a cluster.toml, a small machine gets one worker
        "nodes.0.actors.2.count=1",
        "nodes.0.actors.3.count=2",
        "nodes.0.actors.4.role=planner",
        "router.disagg_min_tokens=0",
        "planner.ttft_target=0.000001",
        "planner.itl_target=1000",
        "planner.patience=1",
        "planner.interval=0.5",
        "planner.cooldown=3600",
        f"planner.metrics_port={metrics_port}",
    )
    c.headers = {"Authorization": f"Bearer {API_KEY}"} if secured else {}
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


def complete(url: str, model: str, prompt: list[int], headers: dict) -> str:
    """One streamed completion's text; raises on an error status or a stream error."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    text = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120
    ) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["text"])
    return "".join(text)


def test_planner_switches_a_worker_without_losing_a_request(cluster, tiny_model_dir, metrics_port):
    prompts = random_prompts([(150, 300)] * 6, seed=14)
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=512)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [out.text for out in engine.generate(prompts, params)]
    model = httpx.get(f"{cluster.url}/v1/models", headers=cluster.headers).json()["data"][0]["id"]

    switched = threading.Event()
    results: list[tuple[int, str | BaseException, bool]] = []  # prompt, text, after switch

    def client(k: int) -> None:
        n = k
        stop_at = None
        while stop_at is None or time.monotonic() < stop_at:
            after = switched.is_set()
            try:
                results.append(
                    (n % 6, complete(cluster.url, model, prompts[n % 6], cluster.headers), after)
                )
            except Exception as exc:  # every failure is reported below, none lost
                results.append((n % 6, exc, after))
            n += 4
            if switched.is_set() and stop_at is None:
                stop_at = time.monotonic() + 3.0  # keep going a while in the new split

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: planner_metric(metrics_port, "to_prefill", "switched") == 1.0,
            "the planner moved a worker to prefill",
            timeout=120,
        )
    finally:
        switched.set()
        for t in threads:
            t.join(timeout=300)

    failures = [(i, r) for i, r, _ in results if isinstance(r, BaseException)]
    assert failures == []
    wrong = [i for i, text, _ in results if text != expected[i]]
    assert wrong == []
    assert any(after for _, _, after in results)
    roles = {actor: row["role"] for actor, row in cluster.status().items()}
    workers = ("prefill-0", "decode-0", "decode-1")
    assert sorted(roles[w] for w in workers) == ["decode", "prefill", "prefill"]
    assert roles["prefill-0"] == "prefill"
    assert planner_metric(metrics_port, "to_prefill", "switched") == 1.0
    assert planner_metric(metrics_port, "to_decode", "switched") == 0.0
    # requests after the switch: one decode worker, two prefill workers
    for i in range(6):
        assert complete(cluster.url, model, prompts[i], cluster.headers) == expected[i]
