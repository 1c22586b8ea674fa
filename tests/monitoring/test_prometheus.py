"""A real Prometheus (Debian's 2.42) scraping a real `kvmesh up`: with load applied,
every query of the shipped Grafana dashboard returns data; the frontend refusing
requests (a small frontend.max_num_requests) fires ModelOverload; a decode worker
SIGKILLed fires BackendFailure.

Prometheus runs on the shipped deploy/prometheus/prometheus.yml with its intervals set
to 1 s and its target set to this cluster's frontend, and on the shipped alerts.yml
with only its durations shortened, a minute to a second (`for: 5m` -> `for: 5s`,
`[10m]` -> `[10s]`; tests.monitoring.deploy.shortened): the rules' expressions and
thresholds are the shipped ones."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading

import httpx
import openai
import pytest
import yaml

from kvmesh.bench.cluster import DISAGGREGATED, free_port_range, start_cluster
from tests.monitoring.deploy import PROMETHEUS, dashboard_queries, shortened
from tests.polling import wait_until
from tests.prompts import random_prompt, random_prompts
from tests.tools import require_tools

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

MAX_NUM_REQUESTS = 4  # the frontend refuses (429) beyond this many in flight
SHARED = random_prompt(64, seed=1)  # a prefix every request of the load shares: 4 blocks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    require_tools("prometheus")
    c = start_cluster(
        tmp_path_factory.mktemp("monitored"),
        tiny_model_dir,
        *DISAGGREGATED,  # 2 decode workers: the streams of the one killed move to the other
        f"frontend.max_num_requests={MAX_NUM_REQUESTS}",
    )  # liveness stays the default 3 x 1 s: shorter, a busy worker on 2 cores is taken for dead
    yield c
    c.stop()


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    """The URL of a Prometheus scraping the cluster's frontend every second."""
    path = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (path / "alerts.yml").write_text(shortened(seconds_per_minute=1))
    config["rule_files"] = [str(path / "alerts.yml")]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [cluster.url.removeprefix("http://")]}]
    (path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port_range(1)
    log = (path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={path / 'prometheus.yml'}",
            f"--storage.tsdb.path={path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url), "prometheus ready", timeout=60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, promql: str) -> list[float]:
    """The values of an instant query's result vector."""
    reply = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert reply["status"] == "success", (promql, reply)
    return [float(sample["value"][1]) for sample in reply["data"]["result"]]


def firing(url: str, alertname: str) -> set[str]:
    """The causes of `alertname` firing now."""
    alerts = httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return {
        a["labels"]["cause"]
        for a in alerts
        if a["labels"]["alertname"] == alertname and a["state"] == "firing"
    }


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="-", max_retries=0)


def model(cluster) -> str:
    return httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]


def test_every_dashboard_query_returns_data(cluster, prometheus):
    """Two clients (under max_num_requests) streaming completions that share a 64-token
    prefix, until every panel's query has a finite value for each of its series."""
    wait_until(lambda: query(prometheus, "up") == [1.0], "the frontend scraped", timeout=30)
    api, name = client(cluster), model(cluster)
    done = threading.Event()

    def load(seed: int) -> None:
        for suffix in random_prompts([24] * 1000, seed=seed):
            if done.is_set():
                return
            stream = api.completions.create(
                model=name, prompt=SHARED + suffix, max_tokens=8, temperature=0, stream=True
            )
            assert len("".join(c.choices[0].text for c in stream if c.choices)) > 0

    clients = [threading.Thread(target=load, args=(seed,)) for seed in (2, 3)]
    for t in clients:
        t.start()
    without_data: dict[str, list[float]] = {}

    def every_query_has_data() -> bool:
        without_data.clear()
        for title, promql in dashboard_queries():
            values = query(prometheus, promql)
            if not values or not all(map(math.isfinite, values)):
                without_data[f"{title}: {promql}"] = values
        return not without_data

    try:
        wait_until(every_query_has_data, "every dashboard query has data", timeout=60)
    finally:
        done.set()
        for t in clients:
            t.join()
        assert without_data == {}
    # the shared prefix: reusable in the traffic, held, and reused by the placements
    assert query(prometheus, "sum(kvmesh_reusable_tokens_total)")[0] > 0
    [achieved] = query(prometheus, "sum(kvmesh_router_cached_tokens_total)")
    [achievable] = query(prometheus, "sum(kvmesh_router_best_cached_tokens_total)")
    assert 0 < achieved <= achievable
    assert firing(prometheus, "BackendFailure") == set()
    assert firing(prometheus, "ModelOverload") == set()


def test_refusing_requests_fires_model_overload(cluster, prometheus):
    """Twelve clients against max_num_requests=4: most requests get 429 until the
    rejecting cause of ModelOverload fires."""
    api, name = client(cluster), model(cluster)
    done = threading.Event()
    statuses: list[int] = []

    def flood(seed: int) -> None:
        prompt = random_prompt(32, seed=seed)
        while not done.is_set():
            try:
                api.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)

    threads = [threading.Thread(target=flood, args=(seed,)) for seed in range(12)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: "rejecting" in firing(prometheus, "ModelOverload"),
            "ModelOverload (rejecting) firing",
            timeout=60,
        )
    finally:
        done.set()
        for t in threads:
            t.join()
    assert set(statuses) == {200, 429}


def test_a_killed_decode_worker_fires_backend_failure(cluster, prometheus):
    """SIGKILL decode-0 while it streams: the router declares it dead and counts the
    death, the worker_died cause of BackendFailure fires (its `for:` is 0 s), and the
    streams it carried move to decode-1 (kvmesh_migrations_total) and finish."""
    assert "worker_died" not in firing(prometheus, "BackendFailure")
    api, name = client(cluster), model(cluster)
    texts: list[str] = []
    errors: list[str] = []

    def stream(seed: int) -> None:
        try:
            chunks = api.completions.create(
                model=name,
                prompt=random_prompt(32, seed=seed),
                max_tokens=1000,  # still streaming when the kill is noticed (3 s)
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            texts.append("".join(c.choices[0].text for c in chunks if c.choices))
        except openai.OpenAIError as exc:
            errors.append(repr(exc))

    victim = cluster.status()["decode-0"]["pid"]
    idle = "sum(kvmesh_requests_running) == 0"  # the flood before has left the frontend
    wait_until(lambda: query(prometheus, idle), "no request in flight", timeout=30)
    streams = [threading.Thread(target=stream, args=(seed,)) for seed in range(10, 13)]
    for t in streams:  # fewer than frontend.max_num_requests: none is refused
        t.start()
    running = 'kvmesh_worker_num_running{worker="decode-0"} > 0'
    wait_until(lambda: query(prometheus, running), "decode-0 streaming", timeout=30)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: "worker_died" in firing(prometheus, "BackendFailure"),
        "BackendFailure (worker_died) firing",
        timeout=60,
    )
    for t in streams:
        t.join()
    assert errors == []
    assert len(texts) == len(streams) and all(texts)
    assert query(prometheus, "sum(kvmesh_router_worker_deaths_total)") == [1.0]
    wait_until(
        lambda: query(prometheus, "sum(kvmesh_migrations_total) >= 1"),
        "migrations counted",
        timeout=30,
    )
