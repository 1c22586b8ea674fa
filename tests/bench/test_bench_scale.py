"""Mock workers against the real router and frontend: answers through the openai
client, `kvmesh bench scale router|routing` on a few workers, the session synthesizer."""

import asyncio
import json
import subprocess
import sys

import openai
import pytest

from kvmesh.actors.load_reports import KEEPALIVE_S
from kvmesh.bench.mock_cluster import MockCluster
from kvmesh.bench.mock_host import node_workers
from kvmesh.bench.scale import Replies
from kvmesh.bench.sessions import SessionSpec, synthesize
from kvmesh.config import load_config


def reply_of(prompt: list[int], max_tokens: int) -> list[int]:
    return [1000 + len(prompt) + i for i in range(max_tokens)]


def test_sessions_grow_their_history_turn_by_turn():
    spec = SessionSpec(
        num_sessions=3,
        num_turns=3,
        num_system_prompts=2,
        system_tokens=32,
        question_tokens=(4, 8),
        reply_tokens=5,
        seed=7,
    )
    sessions = synthesize(spec, list(range(16, 2048)), reply_of)
    assert sessions == synthesize(spec, list(range(16, 2048)), reply_of)  # seeded
    assert len(sessions) == 3
    for session in sessions:
        assert len(session.turns) == 3
        assert 0 <= session.start_s <= spec.ramp_s
        for before, after in zip(session.turns, session.turns[1:], strict=False):
            grown = before.prompt + reply_of(before.prompt, 5)
            assert after.prompt[: len(grown)] == grown
            assert 4 <= len(after.prompt) - len(grown) <= 8
        assert 36 <= len(session.turns[0].prompt) <= 40
    systems = {tuple(s.turns[0].prompt[:32]) for s in sessions}
    assert 1 <= len(systems) <= 2


def test_session_spec_names_the_bad_field():
    with pytest.raises(ValueError, match="num_turns must be >= 1, got 0"):
        SessionSpec(num_turns=0)
    with pytest.raises(ValueError, match="question_tokens must be"):
        SessionSpec(question_tokens=(9, 3))


def test_mock_host_refuses_a_cluster_without_the_mock_engine(tmp_path):
    cfg = load_config(None)
    with pytest.raises(ValueError, match="model.engine is 'kvmesh': a mock host runs"):
        node_workers(cfg, "local", None)
    mock = load_config(None, ["model.engine=mock"])
    with pytest.raises(ValueError, match="node 'elsewhere' has no prefill or decode actor"):
        node_workers(mock, "elsewhere", None)


@pytest.mark.cluster
def test_mock_workers_answer_through_the_openai_client(tiny_model_dir):
    replies = Replies(tiny_model_dir)
    prompt = replies.plain[:70]

    async def scenario():
        async with MockCluster(tiny_model_dir, 3) as cluster:
            client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="-", max_retries=0)
            first = await client.completions.create(
                model=cluster.model, prompt=prompt, max_tokens=6, temperature=0
            )
            again = await client.completions.create(
                model=cluster.model, prompt=prompt + [7, 8], max_tokens=6, temperature=0
            )
            await client.close()
            return first, again, dict(cluster.probe.placed), cluster.probe.num_events

    first, again, placed, num_events = asyncio.run(scenario())
    assert first.choices[0].text == replies.tokenizer.decode(replies.tokens(prompt, 6))
    assert first.usage.completion_tokens == 6
    assert again.choices[0].text == replies.tokenizer.decode(replies.tokens(prompt + [7, 8], 6))
    # the second found the first's 4 full blocks on the worker kv routing chose again
    assert again.usage.prompt_tokens_details.cached_tokens == 64
    assert list(placed.values()) == [2]
    assert num_events >= 1


def run_bench(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmesh", "bench", "scale", *args],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{\n") :])


@pytest.mark.cluster
def test_bench_scale_router_times_every_decision_of_both_policies(tiny_model_dir):
    out = run_bench(
        "router", "--workers", "3", "--requests", "12", "--concurrency", "4",
        "--model", str(tiny_model_dir),
    )  # fmt: skip
    [result] = out["results"]
    assert result["workers"] == 3
    for policy in ("kv", "round_robin"):
        assert result[policy]["decisions"] == 12
        assert result[policy]["workers_registered"] == 3
        assert result[policy]["p50_s"] <= result[policy]["p99_s"] <= result[policy]["max_s"]
    assert result["kv"]["kv_events"] >= 1
    # idle, each worker sends a keep-alive every KEEPALIVE_S (2 s), not a report per
    # 0.5 s tick (10 each in 5 s); at most one more each: its last step's, if late
    assert result["load_report_interval_s"] == 0.5
    per_worker = result["idle_s"] // KEEPALIVE_S + 2
    assert 3 <= result["idle_load_reports"] <= 3 * per_worker


@pytest.mark.cluster
@pytest.mark.slow  # two clusters; the router bench above is the default suite's
def test_bench_scale_routing_replays_every_turn_and_kv_reuses_history(tiny_model_dir):
    out = run_bench(
        "routing", "--workers", "2", "--sessions-per-worker", "2", "--turns", "3",
        "--think", "0", "--scale", "0.1", "--model", str(tiny_model_dir),
    )  # fmt: skip
    [result] = out["results"]
    assert result["sessions"] == 4
    for policy in ("kv", "round_robin"):
        assert result[policy]["turns"] == 12
        assert result[policy]["requests_per_worker_mean"] == 6
    kv = result["kv"]
    assert 0 < kv["router_expected_cached_tokens"] <= kv["router_best_cached_tokens"]
    assert kv["cached_tokens"] > 0
