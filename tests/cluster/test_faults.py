"""Failures on a real cluster: a decode worker SIGKILLed mid-stream, the prefill worker
SIGKILLed, SIGTERM to `kvmesh up` with streams in flight. Every request still ends
exactly as the single-process Engine says."""

import json
import os
import signal
import threading

import httpx
import pytest

from kvmesh import SamplingParams
from kvmesh.bench.cluster import DISAGGREGATED, start_cluster
from tests.polling import wait_until
from tests.prompts import random_prompt

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    c = start_cluster(
        tmp_path_factory.mktemp("faults"),
        tiny_model_dir,
        *DISAGGREGATED,
        "router.disagg_min_tokens=0",
    )
    yield c
    c.stop()


class Stream(threading.Thread):
    """One streaming completion; records its text and how many chunks have arrived."""

    def __init__(self, url: str, model: str, prompt: list[int], max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        self.url = url
        self.text = ""
        self.chunks = 0
        self.finish_reason = None
        self.error = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/completions", json=self.body, timeout=180
            ) as reply:
                if reply.status_code != 200:
                    self.error = f"HTTP {reply.status_code}: {reply.read()!r}"
                    return
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.error = event["error"]
                        continue
                    for choice in event["choices"]:
                        self.text += choice["text"]
                        self.finish_reason = choice["finish_reason"] or self.finish_reason
                    self.chunks += 1
        except httpx.HTTPError as exc:
            self.error = repr(exc)


def run_streams(cluster, model_name, prompts, max_tokens, during=None):
    streams = [Stream(cluster.url, model_name, p, max_tokens) for p in prompts]
    for s in streams:
        s.start()
    if during is not None:
        wait_until(
            lambda: min(s.chunks for s in streams) >= 3,
            "every stream's first chunks",
            timeout=120,
            interval=0.05,
        )
        during()
    for s in streams:
        s.join(timeout=240)
    return streams


def test_sigkill_of_a_decode_worker_loses_no_stream(cluster, model_name, engine):
    prompts = [random_prompt(40 + 10 * i, seed=100 + i) for i in range(16)]
    expected = engine.generate(
        prompts, SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    )
    victim = cluster.status()["decode-0"]["pid"]
    streams = run_streams(
        cluster, model_name, prompts, 120, during=lambda: os.kill(victim, signal.SIGKILL)
    )
    assert [s.error for s in streams] == [None] * 16
    assert [s.finish_reason for s in streams] == ["length"] * 16
    assert [s.text for s in streams] == [o.text for o in expected]
    # the launcher restarts the worker and it rejoins
    wait_until(
        lambda: (row := cluster.status().get("decode-0")) and row["pid"] not in (0, victim),
        "decode-0 coming back",
        timeout=120,
        interval=0.5,
    )


def test_sigkill_of_the_prefill_worker_still_finishes_requests(cluster, model_name, engine):
    prompts = [random_prompt(300, seed=200 + i) for i in range(4)]
    expected = engine.generate(
        prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    )
    os.kill(cluster.status()["prefill-0"]["pid"], signal.SIGKILL)
    streams = run_streams(cluster, model_name, prompts, 16)
    assert [s.error for s in streams] == [None] * 4
    assert [s.text for s in streams] == [o.text for o in expected]


def test_sigterm_drains_streams_in_flight(cluster, model_name, engine):
    prompts = [random_prompt(30 + i, seed=300 + i) for i in range(4)]
    expected = engine.generate(
        prompts, SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    )
    codes = []
    streams = run_streams(
        cluster,
        model_name,
        prompts,
        150,
        during=lambda: codes.append(cluster.process.send_signal(signal.SIGTERM)),
    )
    assert [s.error for s in streams] == [None] * 4
    assert [s.text for s in streams] == [o.text for o in expected]
    assert cluster.process.wait(timeout=60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{cluster.url}/health", timeout=2)


def test_request_timeout_aborts_and_answers_429(tmp_path, tiny_model_dir):
    c = start_cluster(
        tmp_path, tiny_model_dir, "frontend.request_timeout=1.0", "nodes.0.actors.2.count=0"
    )
    try:
        name = httpx.get(f"{c.url}/v1/models").json()["data"][0]["id"]
        slow = httpx.post(
            f"{c.url}/v1/completions",
            timeout=60,
            json={
                "model": name,
                "prompt": random_prompt(20, 1),
                "max_tokens": 4000,
                "ignore_eos": True,
            },
        )
        assert slow.status_code == 429, slow.text
        assert "request_timeout" in slow.json()["error"]["message"]
        assert float(slow.headers["retry-after"]) > 0
        quick = httpx.post(
            f"{c.url}/v1/completions",
            timeout=60,
            json={"model": name, "prompt": "hi", "max_tokens": 2},
        )
        assert quick.status_code == 200  # the timed-out request freed its worker
        streamed = Stream(c.url, name, random_prompt(20, 2), 4000)
        streamed.run()
        assert streamed.error is not None and "request_timeout" in json.dumps(streamed.error)
    finally:
        assert c.stop() == 0
