"""`kvmesh bench stress`: a differential torture test of whole clusters against the
in-process Engine, as databases torture-test themselves.

A round draws a workload from one seed, serves it on a fresh `kvmesh up` (one scenario:
routing policy, disaggregation on or off, tight device pools, tiny host and SSD tiers,
maybe a worker SIGKILLed at a random moment), and holds every reply to the Engine's:

    workload   sessions of several turns behind a few shared system prefixes; turn t+1's
               prompt is turn t's prompt + the Engine's reply + new user tokens, so the
               cluster reuses blocks it generated itself. Each request draws max_tokens,
               greedy or seeded sampling (temperature, top_p, top_k, seed), n (1 or 2),
               ignore_eos, logprobs, a priority, streaming or not, a stop string cut from
               the Engine's own reply (so it fires), and a client disconnect after k chunks
    reference  the Engine (a roomy pool) on every choice with the frontend's parameters
               (choice j of a seeded request samples with seed + j)
    checks     every finished choice: text, finish reason, tokens (with logprobs), usage
               (prompt and completion tokens) equal the Engine's; a disconnected stream
               got a prefix of the Engine's text; no request errs or hangs
    invariants once idle: every worker has nothing running, waiting or parked and every
               device block free (kv_usage 0), the cache actor holds no reservation,
               the router no pending-load prediction nor placement, the frontend no request
               running; after SIGTERM the cluster exits 0 and leaves no shared memory

A failure raises StressFailure naming the seed and scenario that reproduce it:
`kvmesh bench stress --scenario NAME --seed S --sessions N --turns T --rounds 1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

BLOCK_SIZE = 16
DEVICE_BLOCKS = 32  # per worker: 512 tokens, so two or three sessions already thrash
MAX_SEQ_TOKENS = 384  # prompt + max_tokens of any request: inside one pool
TIERS = ["kv.host_gb=0.0005", "kv.disk_gb=0.002"]  # ~16 host slots, ~64 disk files
REQUEST_TIMEOUT = 180.0  # s: a reply not done by then is a stuck request
PRESSURE = ("preemptions", "remote_prefills", "onboarded_blocks")
KILL_WINDOW = (0.5, 5.0)  # s into the load: when the SIGKILL lands (load ending sooner: then)
IDLE_TIMEOUT = 30.0  # s for the cluster to report every invariant once the load is over

# name -> (overrides, kill a worker mid-run); actors: frontend, router, prefill, decode, cache
SCENARIOS: dict[str, tuple[list[str], bool]] = {
    "kv-disagg": (["router.policy=kv", "router.disagg_min_tokens=0"], False),
    "round_robin": (["router.policy=round_robin"], False),
    "kv-kill": (["router.policy=kv"], True),
    "random-aggregated": (["router.policy=random", "nodes.0.actors.2.count=0"], False),
    "least_loaded-disagg-kill": (
        ["router.policy=least_loaded", "router.disagg_min_tokens=0"],
        True,
    ),
    "round_robin-3-decode": (["router.policy=round_robin", "nodes.0.actors.3.count=3"], False),
    # per-actor keys (made for the round in {tmp}/keys): CURVE on every socket, roles,
    # data-plane grants and the cluster's block-hash key, under the same pressure
    "kv-disagg-keyed-kill": (
        ["router.policy=kv", "router.disagg_min_tokens=0", "security.key_dir={tmp}/keys"],
        True,
    ),
}


class StressFailure(AssertionError):
    """A reply or an invariant that differs from what the Engine and an idle cluster say."""


@dataclass
class StressRequest:
    """One HTTP completion request of the workload and what the Engine says of it."""

    index: int
    prompt: list[int]
    body: dict  # the sampling fields sent, beside model, prompt and stream
    stream: bool
    disconnect_after: int | None  # chunks read before the client goes away
    session: int | None = None
    expected: list = field(default_factory=list)  # the Engine's RequestOutput per choice


@dataclass
class Reply:
    """What the client got for one request, per choice index."""

    texts: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    disconnected: bool = False
    error: str | None = None


# --- the workload ---


def draw_body(rng: random.Random, max_tokens: int) -> dict:
    body = {
        "max_tokens": max_tokens,
        "n": rng.choice([1, 1, 1, 2]),
        "ignore_eos": rng.random() < 0.6,
        "priority": rng.choice([-1, 0, 0, 1]),
    }
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:  # seeded sampling: exact on any worker, after any migration
        body |= {
            "temperature": rng.choice([0.7, 1.0]),
            "top_p": rng.choice([1.0, 0.9]),
            "top_k": rng.choice([0, 40]),
            "seed": rng.randrange(1 << 20),
        }
    if rng.random() < 0.3:
        body["logprobs"] = rng.choice([0, 2])
    return body


def params_of(body: dict, choice: int):
    """The SamplingParams the frontend makes of `body` for one choice."""
    from kvmesh.params import SamplingParams

    seed = body.get("seed")
    return SamplingParams(
        max_tokens=body["max_tokens"],
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        top_k=body.get("top_k", 0),
        seed=None if seed is None else seed + choice,
        stop=body.get("stop", []),
        ignore_eos=body["ignore_eos"],
        logprobs=body.get("logprobs"),
        priority=body["priority"],
    )


def run_reference(engine, requests: list[StressRequest]) -> None:
    """Every choice of `requests` on the Engine, all in one batch; fills `expected`."""
    prompts, params = [], []
    for r in requests:
        for j in range(r.body["n"]):
            prompts.append(r.prompt)
            params.append(params_of(r.body, j))
    outs = iter(engine.generate(prompts, params))
    for r in requests:
        r.expected = [next(outs) for _ in range(r.body["n"])]


def cut_stop(rng: random.Random, text: str) -> str | None:
    """A short piece of `text` past its start, so a stop string on it fires mid-reply.
    Never one with U+FFFD: that stands for bytes of a character not yet complete, which
    the final text may show otherwise."""
    if len(text) < 6:
        return None
    at = rng.randrange(2, len(text) - 2)
    piece = text[at : at + rng.randint(1, 3)]
    return None if "\ufffd" in piece else piece


def make_workload(engine, seed: int, num_sessions: int, max_turns: int) -> list[StressRequest]:
    """Sessions of 1..max_turns turns over 3 shared system prefixes, with the Engine's
    replies filled in (turn by turn: each turn's prompt holds the last turn's reply)."""
    from kvmesh.bench.trace import random_prompt

    rng = random.Random(f"stress:{seed}")
    vocab = engine.config.vocab_size
    systems = [random_prompt(rng, rng.randint(16, 80), vocab) for _ in range(3)]
    histories = [
        rng.choice(systems) + random_prompt(rng, rng.randint(1, 60), vocab)
        for _ in range(num_sessions)
    ]
    turns = [rng.randint(1, max_turns) for _ in range(num_sessions)]
    requests: list[StressRequest] = []
    for turn in range(max_turns):
        wave = []
        for s in range(num_sessions):
            room = MAX_SEQ_TOKENS - len(histories[s])
            if turn >= turns[s] or room < 8:
                continue
            max_tokens = rng.randint(4, min(64, room))
            streamed = rng.random() < 0.8
            disconnect = rng.randint(1, 4) if streamed and rng.random() < 0.15 else None
            wave.append(
                StressRequest(
                    len(requests) + len(wave),
                    list(histories[s]),
                    draw_body(rng, max_tokens),
                    streamed,
                    disconnect,
                    s,
                )
            )
        run_reference(engine, wave)
        stopped = [
            r
            for r in wave
            if rng.random() < 0.25
            and (stop := cut_stop(rng, r.expected[0].text)) is not None
            and r.body.setdefault("stop", [stop])
        ]
        run_reference(engine, stopped)
        for r in wave:
            reply = r.expected[0].token_ids
            histories[r.session] = r.prompt + reply + random_prompt(rng, rng.randint(1, 40), vocab)
        requests += wave
    return requests


# --- the client ---


async def send(http, model: str, request: StressRequest, reply: Reply) -> None:
    """One request as a client sends it; what came back lands in `reply`."""
    import httpx

    from kvmesh.bench.trace import sse_events
    from kvmesh.client import COMPLETIONS, APIError, chunk_deltas, error_of

    body = {"model": model, "prompt": request.prompt, **request.body, "stream": request.stream}
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    try:
        if not request.stream:
            response = await http.post(COMPLETIONS, json=body)
            if response.is_error:
                raise error_of(response)
            raw = response.json()
            for c in raw["choices"]:
                take(reply, c["index"], c["text"], c["finish_reason"], c.get("logprobs"))
            reply.usage = raw["usage"]
            return
        chunks = 0
        async with contextlib.aclosing(sse_events(http, body)) as events:
            async for data in events:
                for delta in chunk_deltas(COMPLETIONS, data):
                    take(reply, delta.index, delta.text, delta.finish_reason, delta.logprobs)
                reply.usage = data.get("usage") or reply.usage
                chunks += 1
                if chunks == request.disconnect_after:
                    reply.disconnected = True
                    return  # leaving the block closes the connection mid-stream
    except (APIError, httpx.HTTPError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"


def take(reply: Reply, index: int, text: str, finish_reason, logprobs) -> None:
    reply.texts[index] = reply.texts.get(index, "") + text
    reply.tokens.setdefault(index, []).extend((logprobs or {}).get("tokens") or [])
    if finish_reason is not None:
        reply.finish[index] = finish_reason


async def drive(
    url: str, model: str, requests: list[StressRequest], spread: float, seed: int, on_time=None
) -> list[Reply]:
    """Sessions start at random times within `spread` s, each turn after the one before
    it ends (a chat waits for its reply); `on_time(elapsed)` is polled meanwhile."""
    from kvmesh.bench.trace import http_client

    rng = random.Random(f"stress-arrivals:{seed}")
    sessions: dict[int, list[StressRequest]] = {}
    for r in requests:
        sessions.setdefault(r.session, []).append(r)
    replies = [Reply() for _ in requests]
    async with http_client(url) as http:
        http.timeout = REQUEST_TIMEOUT

        async def chat(turns: list[StressRequest], start: float) -> None:
            await asyncio.sleep(start)
            for r in turns:
                await send(http, model, r, replies[r.index])

        tasks = [
            asyncio.ensure_future(chat(turns, rng.uniform(0, spread)))
            for turns in sessions.values()
        ]
        t0 = time.monotonic()
        while not all(t.done() for t in tasks):
            if on_time is not None:
                on_time(time.monotonic() - t0)
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
    return replies


# --- the checks ---


def compare(engine, requests: list[StressRequest], replies: list[Reply]) -> list[str]:
    """Every way a reply differs from the Engine's, one line each."""
    problems = []
    for r, got in zip(requests, replies, strict=True):
        where = f"request {r.index} (session {r.session}, {json.dumps(r.body)})"
        if got.error is not None:
            problems.append(f"{where}: failed: {got.error}")
            continue
        if got.disconnected:
            for j, text in got.texts.items():
                if not r.expected[j].text.startswith(text):
                    problems.append(
                        f"{where} choice {j}: streamed {text!r} before the "
                        f"disconnect, not a prefix of {r.expected[j].text!r}"
                    )
            continue
        for j, want in enumerate(r.expected):
            if got.texts.get(j) != want.text:
                problems.append(
                    f"{where} choice {j}: text {got.texts.get(j)!r}, Engine {want.text!r}"
                )
            if got.finish.get(j) != want.finish_reason:
                problems.append(
                    f"{where} choice {j}: finish_reason {got.finish.get(j)!r}, "
                    f"Engine {want.finish_reason!r}"
                )
            if "logprobs" in r.body:
                tokens = [
                    engine.tokenizer.decode([t], skip_special_tokens=False) for t in want.token_ids
                ]
                if got.tokens.get(j) != tokens:
                    problems.append(
                        f"{where} choice {j}: tokens {got.tokens.get(j)}, Engine {tokens}"
                    )
        usage = {
            "prompt_tokens": len(r.prompt),
            "completion_tokens": sum(len(o.token_ids) for o in r.expected),
        }
        got_usage = {k: got.usage.get(k) for k in usage}
        if got_usage != usage:
            problems.append(f"{where}: usage {got_usage}, Engine {usage}")
    return problems


def idle_problems(cluster) -> list[str]:
    """What an idle cluster still holds: requests, blocks, reservations, predictions."""
    from kvmesh.bench.serve import scrape

    problems = []
    for actor, row in cluster.status().items():
        load = row.get("load", {})
        if row["role"] in ("prefill", "decode"):
            held = {
                k: load.get(k, 0) for k in ("num_running", "num_waiting", "num_remote", "kv_usage")
            }
            if any(held.values()):
                problems.append(f"{actor} is not idle: {held}")
        elif row["role"] == "cache" and load.get("reserved_host", 0):
            problems.append(f"{actor} holds {load['reserved_host']:.0f} slot reservations")
        elif row["role"] == "router":
            pending = {k: load.get(k, 0) for k in ("pending_tokens", "pending_placements")}
            if any(pending.values()):
                problems.append(f"{actor} still predicts load: {pending}")
    running = scrape(cluster.url).get("kvmesh_requests_running", 0)
    if running:
        problems.append(f"the frontend counts {running:.0f} requests still running")
    return problems


def pressure(cluster) -> dict[str, int]:
    """What the round made the cluster do, from the workers' counters (a killed worker's
    died with it): preemptions, remote prefills, blocks onboarded from the tiers."""
    totals = dict.fromkeys(PRESSURE, 0)
    for row in cluster.status().values():
        load = row.get("load", {})
        if row["role"] == "decode":  # a remote prefill counts on both of its workers
            totals["remote_prefills"] += int(load.get("remote_prefills_total", 0))
        totals["preemptions"] += int(load.get("preemptions_total", 0))
        totals["onboarded_blocks"] += int(
            load.get("onboarded_host", 0) + load.get("onboarded_disk", 0)
        )
    return totals


def wait_idle(cluster, timeout: float = IDLE_TIMEOUT) -> list[str]:
    """The idle invariants, polled until they hold or `timeout` passes (load reports and
    aborts take a moment to land); what still fails then."""
    deadline = time.monotonic() + timeout
    while True:
        problems = idle_problems(cluster)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.5)


def shm_segments() -> set[str]:
    from kvmesh.kv.segment import SHM_DIR

    return {p.name for p in SHM_DIR.glob("kvmesh-*")}


def orphaned(names: set[str]) -> list[str]:
    """The segments among `names` whose creator (kvmesh-<actor>-<pid>-<random>) is gone:
    once the cluster has stopped, its leaks; another cluster running on the machine
    meanwhile has live creators and is none of this round's business."""
    left = []
    for name in sorted(names):
        pid = int(name.rsplit("-", 2)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            left.append(name)
        except PermissionError:
            pass  # alive, another user's
    return left


# --- a round ---


class Killer:
    """SIGKILLs one worker (drawn from the seed) once `at` seconds of the run have passed."""

    def __init__(self, cluster, seed: int, at: float) -> None:
        rng = random.Random(f"stress-kill:{seed}")
        workers = sorted(
            a for a, row in cluster.status().items() if row["role"] in ("prefill", "decode")
        )
        self.cluster, self.victim, self.at = cluster, rng.choice(workers), at
        self.killed_pid: int | None = None

    def __call__(self, elapsed: float) -> None:
        if self.killed_pid is None and elapsed >= self.at:
            self.killed_pid = self.cluster.status()[self.victim]["pid"]
            os.kill(self.killed_pid, signal.SIGKILL)

    def wait_back(self, timeout: float = 120.0) -> None:
        """The launcher restarts the victim; the invariants count it once registered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                row = self.cluster.status().get(self.victim)
                if row is not None and row["pid"] not in (0, self.killed_pid):
                    return
            time.sleep(0.5)
        raise StressFailure(f"{self.victim} did not come back after its SIGKILL")


def make_keys(overrides: list[str]) -> None:
    """The keys of every actor (and the operator), when the scenario names a key_dir."""
    from kvmesh.config import load_config
    from kvmesh.transport.keys import OPERATOR, generate

    key_dir = next(
        (o.partition("=")[2] for o in overrides if o.startswith("security.key_dir=")), None
    )
    if key_dir is not None:
        cfg = load_config(None, overrides)
        generate(
            Path(key_dir),
            [*((spec.actor_id, spec.role) for spec in cfg.actors), (OPERATOR, OPERATOR)],
        )


def stress_round(
    engine,
    model_dir: Path,
    scenario: str,
    seed: int,
    num_sessions: int = 12,
    max_turns: int = 3,
    spread: float = 1.0,
    log=print,
) -> dict:
    """One scenario on one seeded workload; raises StressFailure naming both."""
    import httpx

    from kvmesh.bench.cluster import DISAGGREGATED, start_cluster

    overrides, kill = SCENARIOS[scenario]
    requests = make_workload(engine, seed, num_sessions, max_turns)
    before = shm_segments()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmesh-stress-") as tmp:
        overrides = [override.replace("{tmp}", tmp) for override in overrides]
        make_keys(overrides)
        cluster = start_cluster(
            Path(tmp),
            model_dir,
            f"kv.device_blocks={DEVICE_BLOCKS}",
            *TIERS,
            f"kv.disk_path={tmp}/tiers",
            f"router.seed={seed}",
            *DISAGGREGATED,  # the scenarios' counts are changes to 1 prefill + 2 decode
            *overrides,
            timeout=120,
        )
        problems: list[str] = []
        did = dict.fromkeys(PRESSURE, 0)
        try:
            model = httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]
            killer = (
                Killer(cluster, seed, random.Random(seed).uniform(*KILL_WINDOW)) if kill else None
            )
            replies = asyncio.run(drive(cluster.url, model, requests, spread, seed, killer))
            if killer is not None:
                killer(float("inf"))  # the load ended first: the restart is still checked
            problems += compare(engine, requests, replies)
            if killer is not None:
                killer.wait_back()
            problems += wait_idle(cluster)
            did = pressure(cluster)
        finally:
            code = cluster.stop()
        if code != 0:
            problems.append(f"kvmesh up exited {code} on SIGTERM")
        left = orphaned(shm_segments() - before)
        if left:
            problems.append(f"shared-memory segments left in /dev/shm: {left}")
        kept = Path(tempfile.gettempdir()) / f"kvmesh-stress-{scenario}-{seed}.log"
        if problems:  # the cluster's log outlives its directory
            kept.write_bytes(cluster.log.read_bytes())
    result = {
        "scenario": scenario,
        "seed": seed,
        "requests": len(requests),
        "choices": sum(r.body["n"] for r in requests),
        "disconnects": sum(r.disconnect_after is not None for r in requests),
        "killed": killer.victim if kill else None,
        "seconds": time.monotonic() - t0,
        "problems": problems,
    }
    result |= did
    log(
        f"{scenario:26s} seed {seed:<6d} {result['requests']:3d} requests "
        f"({result['choices']} choices, {result['disconnects']} disconnects"
        f"{', killed ' + result['killed'] if kill else ''}; {did['preemptions']} preemptions, "
        f"{did['remote_prefills']} remote prefills, {did['onboarded_blocks']} blocks onboarded)"
        f" in {result['seconds']:.0f} s: "
        f"{'ok' if not problems else f'{len(problems)} PROBLEMS'}"
    )
    if problems:
        raise StressFailure(
            f"stress scenario {scenario!r}, seed {seed}: {len(problems)} problems "
            f"(reproduce: kvmesh bench stress --scenario {scenario} --seed {seed} "
            f"--sessions {num_sessions} --turns {max_turns} --rounds 1; the cluster's log: "
            f"{kept})\n" + "\n".join(problems[:20])
        )
    return result


def reference_engine(model_dir: Path):
    """The Engine every round is held to: a pool roomy enough never to preempt."""
    from kvmesh.engine.engine import Engine

    return Engine.from_pretrained(str(model_dir), num_blocks=4096)


@click.command("stress")
@click.option(
    "--model",
    "model_path",
    default=None,
    help="HF model directory, a .gguf file (imported once) or smollm2 [default: the tiny model].",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the first round; round i uses seed + i."
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(sorted(SCENARIOS)),
    help="Scenario to run (repeatable) [default: all, in turn].",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Start rounds until this many seconds have passed.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=None,
    help="Rounds to run [default: one per scenario, or as many as --seconds allows].",
)
@click.option(
    "--sessions",
    type=click.IntRange(1),
    default=12,
    show_default=True,
    help="Chat sessions per round.",
)
@click.option(
    "--turns", type=click.IntRange(1), default=3, show_default=True, help="Most turns per session."
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write every round's result to this JSON file.",
)
def stress_command(
    model_path, seed, scenarios, seconds, rounds, sessions, turns, json_file
) -> None:
    """Differential stress: whole clusters under tight pools, tiny tiers, every routing
    policy, disaggregation on and off and a worker SIGKILLed, every reply held to the
    in-process Engine's, then the idle invariants (no leaked blocks, reservations,
    predictions or shared memory). Fails naming the seed that reproduces."""
    from kvmesh.bench.serve import model_dir

    path = model_dir(model_path)
    names = list(scenarios) or list(SCENARIOS)
    if rounds is None and seconds is None:
        rounds = len(names)
    engine = reference_engine(path)
    results, start = [], time.monotonic()
    i = 0
    while (rounds is None or i < rounds) and (
        seconds is None or time.monotonic() - start < seconds
    ):
        try:
            results.append(
                stress_round(
                    engine, path, names[i % len(names)], seed + i, sessions, turns, log=click.echo
                )
            )
        except StressFailure as failure:
            raise click.ClickException(str(failure)) from None
        finally:
            if json_file:
                Path(json_file).write_text(json.dumps(results, indent=2))
        i += 1
    click.echo(
        f"{len(results)} rounds, {sum(r['requests'] for r in results)} requests, "
        "every reply equal to the Engine's, every invariant held"
    )
