"""Elastic membership with real processes: node a (127.0.0.1: frontend, router, decode-0,
decode-1) serves alone, as `kvmesh up --node a` with a cluster.toml that lists only it.

- Its router is SIGKILLed and restarted by the launcher: the workers re-register and
  the router asks each for its device prefix cache, so a prompt warmed before the
  restart goes back to the worker that holds it, which reports the cached tokens.
- Node b (127.0.0.2: decode-2, cache-0) joins: the same cluster.toml with b appended, `kvmesh up
  --node b` on it; nothing on node a restarts and the router places work on decode-2.
  `kvmesh status` shows decode-2 unhealthy, naming cache-0, while b's cache actor is
  stopped (SIGSTOP), and alive again once it runs on.
  Then b leaves: SIGTERM to its `kvmesh up` while decode-2 streams; decode-2 leaves the
  router first (new work goes elsewhere), finishes its streams, and b exits 0.

Requests go through the official openai client the whole time; every output equals the
in-process Engine's greedy one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from kvmesh import SamplingParams
from kvmesh.bench.cluster import free_port_range
from tests.cluster.nodes import spawned_pids
from tests.cluster.test_two_nodes import Node
from tests.polling import wait_until
from tests.prompts import random_prompt, random_prompts

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

NODE_A = (
    '[[nodes]]\nname = "a"\naddress = "127.0.0.1"\n'
    '[[nodes.actors]]\nrole = "frontend"\n[[nodes.actors]]\nrole = "router"\n'
    '[[nodes.actors]]\nrole = "decode"\ncount = 2\n'
)
NODE_B = (
    '[[nodes]]\nname = "b"\naddress = "127.0.0.2"\n'
    '[[nodes.actors]]\nrole = "decode"\n[[nodes.actors]]\nrole = "cache"\n'
)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class Site:
    """Node a's cluster.toml, and the one with node b appended (b joins with it)."""

    def __init__(self, tmp_path: Path, model_dir: Path) -> None:
        self.base = free_port_range(32)
        head = (
            f"[cluster]\nbase_port = {self.base}\ngrace_period = 60\n"
            f'[model]\npath = "{model_dir}"\n'
            f"[kv]\ndevice_blocks = 256\nhost_gb = 0.02\n[frontend]\nhttp_port = {self.base + 30}\n"
        )
        self.config_a = tmp_path / "cluster.toml"
        self.config_a.write_text(head + NODE_A)
        self.config_ab = tmp_path / "cluster-with-b.toml"
        self.config_ab.write_text(head + NODE_A + NODE_B)
        self.url = f"http://127.0.0.1:{self.base + 30}/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0)
        self.model = ""  # the served name, once up

    def status(self) -> dict[str, dict]:
        """`kvmesh status --json` by actor id ({} while the router does not answer)."""
        proc = subprocess.run(
            [sys.executable, "-m", "kvmesh", "status", "--json", "--config", str(self.config_a)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0 and "no router answers" not in proc.stderr:
            raise RuntimeError(f"kvmesh status failed: {proc.stderr}")
        return {row["actor"]: row for row in json.loads(proc.stdout or "[]")}

    def complete(self, prompt: list[int], max_tokens: int):
        return self.client.completions.create(
            model=self.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )


class Stream(threading.Thread):
    """One streaming completion through the openai client: its text and chunks so far."""

    def __init__(self, site: Site, prompt: list[int], max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.site, self.prompt, self.max_tokens = site, prompt, max_tokens
        self.text, self.chunks, self.error = "", 0, None

    def run(self) -> None:
        try:
            for chunk in self.site.client.completions.create(
                model=self.site.model,
                prompt=self.prompt,
                max_tokens=self.max_tokens,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                self.text += "".join(choice.text for choice in chunk.choices)
                self.chunks += 1
        except Exception as exc:  # any failure is this stream's result
            self.error = repr(exc)


class Traffic(threading.Thread):
    """Requests one after another, cycling through `prompts`, until stopped: (prompt
    index, text or error) of each."""

    def __init__(self, site: Site, prompts: list[list[int]], max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.site, self.prompts, self.max_tokens = site, prompts, max_tokens
        self.results: list[tuple[int, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            i = n % len(self.prompts)
            try:
                text = self.site.complete(self.prompts[i], self.max_tokens).choices[0].text
            except openai.OpenAIError as exc:
                text = f"error: {exc!r}"
            self.results.append((i, text))
            n += 1


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("elastic")
    site = Site(tmp_path, tiny_model_dir)
    site.node_a = Node(tmp_path, site.config_a, "a")
    try:
        site.node_a.wait_said(f"kvmesh is up: {site.url}", timeout=240)
        site.model = site.client.models.list().data[0].id
        yield site
    finally:
        site.node_a.stop()
    assert site.node_a.process.returncode == 0, site.node_a.output()


def served(status: dict[str, dict]) -> dict[str, int]:
    """Prompt tokens each decode worker has served."""
    return {a: r["prompt_tokens_total"] for a, r in status.items() if r["role"] == "decode"}


def learned(log: Path) -> int:
    return sum("device_blocks_learned" in line for line in log.read_text().splitlines())


def test_a_restarted_router_routes_a_warm_prefix_back_to_the_worker_holding_it(site, engine):
    # 170 and 234 tokens: 10 and 14 full blocks of 16 are reusable
    p0, p1 = random_prompt(170, seed=71), random_prompt(234, seed=72)
    (long0,) = engine.generate([p0], greedy(120))
    short = engine.generate([p0, p1], greedy(8))
    # p0 streams on one worker while p1 is placed: p1 goes to the other one
    first = Stream(site, p0, 120)
    first.start()
    wait_until(lambda: first.chunks >= 2 or first.error, "p0's first chunks", timeout=120)
    assert site.complete(p1, 8).choices[0].text == short[1].text
    first.join(timeout=120)
    assert (first.error, first.text) == (None, long0.text)
    before = served(site.status())
    holder = {n: w for w, n in before.items()}
    assert sorted(holder) == [170, 234], before
    learned_before = learned(site.node_a.log)  # one per registration: 2

    router = site.status()["router-0"]["pid"]
    os.kill(router, signal.SIGKILL)
    wait_until(
        lambda: (
            (s := site.status()).get("router-0", {}).get("pid") not in (None, router)
            and {"decode-0", "decode-1"} <= set(s)
        ),
        "the router's successor with both workers registered",
        timeout=120,
    )
    wait_until(
        lambda: learned(site.node_a.log) >= learned_before + 2,
        "the new router asking both workers what they hold",
        timeout=60,
    )
    again = [site.complete(p, 8) for p in (p0, p1)]
    after = served(site.status())
    assert [r.choices[0].text for r in again] == [o.text for o in short]
    assert [r.usage.prompt_tokens_details.cached_tokens for r in again] == [160, 224]
    # each went back to the worker that held it
    assert {w: after[w] - before[w] for w in after} == {holder[170]: 170, holder[234]: 234}


def test_a_node_joins_and_leaves_while_requests_flow(site, engine):
    node_a = site.node_a
    spawned_before = spawned_pids(node_a.log)
    prompts = random_prompts([(20, 90)] * 4, seed=81)
    short = [o.text for o in engine.generate(prompts, greedy(6))]
    streamed = random_prompts([(20, 60)] * 4, seed=82)
    long = [o.text for o in engine.generate(streamed, greedy(120))]
    traffic = Traffic(site, prompts, 6)
    traffic.start()
    node_b = Node(node_a.log.parent, site.config_ab, "b")
    try:
        node_b.wait_said("node b is up: cache-0, decode-2 registered with router-0", timeout=240)
        # health is reachability: decode-2 cannot reach its node's cache actor (stopped)
        cache = spawned_pids(node_b.log)["cache-0"]
        os.kill(cache, signal.SIGSTOP)
        try:
            unhealthy = wait_until(
                lambda: (row := site.status().get("decode-2")) and row["problems"] and row,
                "decode-2 unhealthy",
                timeout=120,
            )
        finally:
            os.kill(cache, signal.SIGCONT)
        assert unhealthy["health"] == "unhealthy"
        assert unhealthy["problems"][0].startswith(
            f"cannot reach cache-0 at tcp://127.0.0.2:{site.base + 2 * 5} (this node's cache actor)"
        ), unhealthy
        wait_until(
            lambda: site.status().get("decode-2", {}).get("health") == "alive",
            "decode-2 healthy again, its cache actor back",
            timeout=120,
        )
        # four streams at once: the router spreads them, decode-2 included
        streams = [Stream(site, p, 120) for p in streamed]
        for s in streams:
            s.start()
        wait_until(
            lambda: min(s.chunks for s in streams) >= 3 or any(s.error for s in streams),
            "every stream's first chunks",
            timeout=120,
            interval=0.05,
        )
        node_b.process.send_signal(signal.SIGTERM)  # b leaves, decode-2 streaming
        assert node_b.process.wait(timeout=120) == 0, node_b.output()
        for s in streams:
            s.join(timeout=240)
        assert [s.error for s in streams] == [None] * 4
        assert [s.text for s in streams] == long
        assert "decode-2" not in site.status()
        served_after_leaving = len(traffic.results)
        wait_until(
            lambda: len(traffic.results) >= served_after_leaving + 4,
            "requests served after b left",
            timeout=120,
        )
    finally:
        traffic.stopped.set()
        traffic.join(timeout=120)
        node_b.stop()
    assert len(traffic.results) >= 4
    assert [text for _, text in traffic.results] == [short[i] for i, _ in traffic.results]
    # b drained cleanly: decode-2 left the router with streams in flight, then ended them
    leaving = re.search(r"leaving_router\s+actor=decode-2 in_flight=(\d+)", node_b.log.read_text())
    assert leaving is not None and int(leaving[1]) > 0, node_b.log.read_text()[-3000:]
    assert "worker_left" in node_a.log.read_text()
    assert "Traceback" not in node_b.err.read_text(), node_b.output()
    # nothing on node a restarted
    assert spawned_pids(node_a.log) == spawned_before
    assert node_a.process.poll() is None
