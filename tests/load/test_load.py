"""Bounded load on a real cluster: `kvmesh up` on 127.0.0.1 (frontend, router, prefill and
decode workers, each its own process), driven by concurrent streaming clients over
HTTP/SSE for a fixed number of requests; it stops by itself.

Every request is accounted for. It either streams to the end (a finish_reason, usage, then
`data: [DONE]`) or, only when the frontend's admission limit (frontend.max_num_requests)
is hit, gets a 429 with Retry-After, which the client honours (plus jitter) and retries, a
bounded number of times, until it is served. Anything else fails the test: a 5xx, another
4xx, a stream cut short, an error sent in band, a timeout. A sample of the greedy outputs
must equal kvmesh.Engine's for the same prompts. The peak RSS (VmHWM) of every process of
the cluster is printed (`pytest -s`) and attached to the report (`record_property`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.bench.cluster import DISAGGREGATED, Cluster, start_cluster
from kvmesh.client import CHAT, COMPLETIONS, DONE, APIError, chunk_deltas, event_data

pytestmark = pytest.mark.cluster

WORDS = (
    "once upon a time the river ran past seven blue mountains where a quick cat "
    "told stories about numbers and the capital of France"
).split()
MAX_ATTEMPTS = 60  # per request: the first try and its retries after 429s
SINGLE_DECODE = ("nodes.0.actors.2.count=0", "nodes.0.actors.3.count=1")  # no prefill, 1 decode


# --- the workload ---


@dataclass(frozen=True)
class Job:
    """One request to send: path and JSON body (always greedy and streamed)."""

    path: str
    body: dict


def make_jobs(count: int, model: str, seed: int = 0) -> list[Job]:
    """Short prompts and outputs, in turn: token ids (ignore_eos), token ids, text, chat."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        body = {
            "model": model,
            "max_tokens": rng.randint(4, 12),
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        words = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
        if i % 4 == 3:
            jobs.append(Job(CHAT, body | {"messages": [{"role": "user", "content": words}]}))
        elif i % 4 == 2:
            jobs.append(Job(COMPLETIONS, body | {"prompt": words}))
        else:
            ids = [rng.randrange(16, 2048) for _ in range(rng.randint(4, 48))]
            jobs.append(Job(COMPLETIONS, body | {"prompt": ids, "ignore_eos": i % 4 == 0}))
    return jobs


def engine_outputs(engine: Engine, jobs: list[Job]) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) of each job, from the in-process Engine."""
    tokenizer = engine.tokenizer
    prompts = []
    for job in jobs:
        if job.path == CHAT:
            text = tokenizer.apply_chat_template(job.body["messages"])
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            prompts.append(job.body["prompt"])
    params = [
        SamplingParams(
            max_tokens=job.body["max_tokens"],
            temperature=0.0,
            ignore_eos=job.body.get("ignore_eos", False),
        )
        for job in jobs
    ]
    return [
        (out.text, out.finish_reason, len(out.token_ids))
        for out in engine.generate(prompts, params)
    ]


# --- one client's view of one request ---


@dataclass
class Outcome:
    """What one request got, over all its attempts."""

    statuses: list[int] = field(default_factory=list)
    refusals: list[tuple[str | None, dict]] = field(default_factory=list)  # (Retry-After, error)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    done: bool = False
    error: str | None = None

    @property
    def complete(self) -> bool:
        return (
            self.error is None
            and self.done
            and self.finish_reason is not None
            and self.usage is not None
        )


async def run_job(http: httpx.AsyncClient, job: Job, rng: random.Random) -> Outcome:
    """Send `job` until it is served; after a 429 wait Retry-After seconds plus jitter."""
    outcome = Outcome()
    for _ in range(MAX_ATTEMPTS):
        try:
            async with http.stream("POST", job.path, json=job.body) as response:
                outcome.statuses.append(response.status_code)
                if response.status_code == 200:
                    await read_stream(response, job.path, outcome)
                    return outcome
                body = (await response.aread()).decode(errors="replace")
                if response.status_code != 429:
                    outcome.error = f"HTTP {response.status_code}: {body}"
                    return outcome
                retry_after = response.headers.get("retry-after")
                outcome.refusals.append((retry_after, json.loads(body)["error"]))
                if retry_after is None or not retry_after.isdigit() or int(retry_after) < 1:
                    outcome.error = f"429 with Retry-After {retry_after!r}"
                    return outcome
        except (httpx.HTTPError, APIError, ValueError, KeyError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            return outcome
        await asyncio.sleep(int(retry_after) + rng.random())  # jitter: no thundering herd
    outcome.error = f"still refused after {MAX_ATTEMPTS} attempts"
    return outcome


async def read_stream(response: httpx.Response, path: str, outcome: Outcome) -> None:
    """Events until the server closes; an in-band error raises APIError (chunk_deltas)."""
    async for line in response.aiter_lines():
        data = event_data(line)
        if data is None:
            continue
        if outcome.done:
            outcome.error = f"an event after [DONE]: {line}"
            return
        if data is DONE:
            outcome.done = True
            continue
        for delta in chunk_deltas(path, data):
            outcome.text += delta.text
            if delta.finish_reason is not None:
                if outcome.finish_reason is not None:
                    outcome.error = f"a second finish_reason: {line}"
                outcome.finish_reason = delta.finish_reason
        outcome.usage = data.get("usage") or outcome.usage


# --- the load ---


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    seconds: float

    def statuses(self) -> Counter:
        return Counter(status for o in self.outcomes for status in o.statuses)

    def summary(self) -> str:
        tokens = sum(o.usage["completion_tokens"] for o in self.outcomes if o.usage)
        return (
            f"{len(self.outcomes)} requests in {self.seconds:.1f} s "
            f"({tokens / self.seconds:.0f} output tokens/s), "
            f"statuses {dict(sorted(self.statuses().items()))}"
        )


def run_load(url: str, jobs: list[Job], num_clients: int, budget_s: float) -> LoadResult:
    """`num_clients` clients, each sending one job at a time from the shared list until it
    is empty; fails the test if they are not all done within `budget_s`."""
    outcomes: list[Outcome | None] = [None] * len(jobs)

    async def client(http: httpx.AsyncClient, todo, seed: int) -> None:
        rng = random.Random(seed)
        for i, job in todo:
            outcomes[i] = await run_job(http, job, rng)

    async def main() -> None:
        limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
        async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as http:
            todo = iter(enumerate(jobs))
            await asyncio.gather(*(client(http, todo, seed) for seed in range(num_clients)))

    start = time.perf_counter()
    try:
        asyncio.run(asyncio.wait_for(main(), budget_s))
    except TimeoutError:
        unfinished = sum(o is None for o in outcomes)
        pytest.fail(f"{unfinished} of {len(jobs)} requests unfinished after {budget_s} s")
    return LoadResult(outcomes, time.perf_counter() - start)


def assert_every_request_served(result: LoadResult, allowed: set[int]) -> None:
    lost = [(i, o) for i, o in enumerate(result.outcomes) if not o.complete]
    assert not lost, f"{len(lost)} requests not served, e.g. " + "; ".join(
        f"#{i} statuses {o.statuses}: {o.error or 'stream incomplete'}" for i, o in lost[:5]
    )
    assert set(result.statuses()) <= allowed, result.summary()


def assert_sample_equals_engine(
    engine: Engine, jobs: list[Job], result: LoadResult, every: int
) -> None:
    indices = range(0, len(jobs), every)
    expected = engine_outputs(engine, [jobs[i] for i in indices])
    for i, (text, finish_reason, num_tokens) in zip(indices, expected, strict=True):
        got = result.outcomes[i]
        assert (got.text, got.finish_reason, got.usage["completion_tokens"]) == (
            text,
            finish_reason,
            num_tokens,
        ), (i, jobs[i].body)


# --- the cluster's processes ---


def cluster_pids(cluster: Cluster) -> dict[str, int]:
    """Every process of the cluster: "up" (the launcher) and each actor by id, as
    `kvmesh status` gives them; each must be the launcher's child of that actor's argv."""
    status = cluster.kvmesh("status", "--json")
    assert status.returncode == 0, status.stderr
    children = launcher_children(cluster.process.pid)
    pids = {"up": cluster.process.pid}
    for row in json.loads(status.stdout):
        assert row["pid"] == children.get(row["actor"]), (row, children)
        pids[row["actor"]] = row["pid"]
    assert set(pids) == {"up", *children}, (pids, children)
    return pids


def launcher_children(launcher: int) -> dict[str, int]:
    """actor id -> pid of the launcher's children (`kvmesh ... actor <id>`: the last arg)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher:
                argv = (stat.parent / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                children[argv[-1].decode()] = int(stat.parent.name)
    return children


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def report_peak_rss(
    cluster: Cluster, pids: dict[str, int], record_property, result: LoadResult
) -> dict[str, float]:
    """Print and record every process's peak RSS; the pids must be those of the start
    (an actor that crashed and was restarted by the launcher would have a new one)."""
    assert cluster_pids(cluster) == pids, "an actor was restarted during the load"
    peaks = {name: round(peak_rss_mib(pid), 1) for name, pid in pids.items()}
    print(
        f"\n{result.summary()}\npeak RSS (VmHWM), MiB: "
        + ", ".join(f"{name} {mib:.0f}" for name, mib in peaks.items())
        + f"; total {sum(peaks.values()):.0f}"
    )
    record_property("load", result.summary())
    record_property("peak_rss_mib", peaks)
    return peaks


def model_name(cluster: Cluster) -> str:
    return httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]


def assert_still_serving(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.url}/health").status_code == 200
    body = {"model": model_name(cluster), "prompt": "still there?", "max_tokens": 3}
    reply = httpx.post(f"{cluster.url}{COMPLETIONS}", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3


# --- fixtures ---


@contextlib.contextmanager
def running_cluster(tmp_path: Path, model_dir: Path, *overrides: str):
    cluster = start_cluster(tmp_path, model_dir, *overrides)
    try:
        yield cluster
    finally:
        assert cluster.stop() == 0, cluster.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir, num_blocks=512)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """Frontend, router, 1 prefill and 2 decode workers; every prompt is prefilled on the
    prefill worker (disagg_min_tokens=0), so the load crosses the KV data plane too. The
    first load is its first traffic: the frontend connects to the workers mid-burst."""
    with running_cluster(
        tmp_path_factory.mktemp("load"),
        tiny_model_dir,
        *DISAGGREGATED,
        "router.disagg_min_tokens=0",
    ) as c:
        yield c


@pytest.fixture(scope="module")
def limited_cluster(tmp_path_factory, tiny_model_dir):
    """The same cluster, admitting at most 8 requests at a time."""
    with running_cluster(
        tmp_path_factory.mktemp("limited"),
        tiny_model_dir,
        *DISAGGREGATED,
        "router.disagg_min_tokens=0",
        "frontend.max_num_requests=8",
    ) as c:
        yield c


# --- tests ---


@pytest.mark.parametrize(
    ("num_clients", "num_requests", "sample_every", "budget_s"),
    [
        pytest.param(64, 128, 4, 120, id="64-clients"),
        pytest.param(500, 1000, 16, 480, id="500-clients", marks=pytest.mark.slow),
    ],
)
def test_concurrent_streams_are_all_served(
    cluster, engine, record_property, num_clients, num_requests, sample_every, budget_s
):
    pids = cluster_pids(cluster)
    jobs = make_jobs(num_requests, model_name(cluster), seed=num_clients)
    result = run_load(cluster.url, jobs, num_clients, budget_s)
    report_peak_rss(cluster, pids, record_property, result)
    assert_every_request_served(result, allowed={200})  # far below the admission limit
    assert_sample_equals_engine(engine, jobs, result, every=sample_every)
    assert_still_serving(cluster)


def test_admission_limit_refuses_with_retry_after_until_served(
    limited_cluster, engine, record_property
):
    pids = cluster_pids(limited_cluster)
    jobs = make_jobs(64, model_name(limited_cluster), seed=8)
    result = run_load(limited_cluster.url, jobs, num_clients=64, budget_s=180)
    report_peak_rss(limited_cluster, pids, record_property, result)
    assert_every_request_served(result, allowed={200, 429})
    refusals = [r for o in result.outcomes for r in o.refusals]
    # 64 clients start at once against a limit of 8: most of the first wave is refused
    # (56 if none of the 8 finishes before the last arrives; half is the margin for a slow
    # machine). An unenforced limit refuses none.
    assert sum(bool(o.refusals) for o in result.outcomes) >= 32, result.summary()
    assert {(error["type"], error["code"]) for _, error in refusals} == {
        ("rate_limit_error", "overloaded")
    }
    assert all(error["message"] and error["param"] is None for _, error in refusals)
    assert_sample_equals_engine(engine, jobs, result, every=4)
    assert_still_serving(limited_cluster)


def test_top_k_beyond_int64_is_refused_by_the_cluster(tmp_path, tiny_model_dir):
    with running_cluster(tmp_path, tiny_model_dir, *SINGLE_DECODE, "cluster.grace_period=1") as c:
        body = {"model": model_name(c), "prompt": "x", "max_tokens": 2}
        reply = None
        with contextlib.suppress(httpx.TimeoutException):
            reply = httpx.post(f"{c.url}{COMPLETIONS}", json=body | {"top_k": 2**63}, timeout=5)
        assert reply is not None, "no answer in 5 s"
        assert (reply.status_code, reply.json()["error"]["param"]) == (400, "top_k")
        assert httpx.post(f"{c.url}{COMPLETIONS}", json=body, timeout=10).status_code == 200
