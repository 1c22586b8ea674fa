"""`kvmesh bench stress`: the workload is seeded and its replies are the Engine's, the
checks notice a lost token, a wrong finish reason or a busy idle cluster, and short rounds
against real clusters (a worker SIGKILLed in one) pass every check; the long run is slow."""

import os
import subprocess
import sys

import pytest

from kvmesh.bench.stress import (
    SCENARIOS,
    Reply,
    compare,
    idle_problems,
    make_workload,
    orphaned,
    reference_engine,
    stress_round,
)


def test_a_leak_is_a_segment_whose_creator_is_gone_not_another_clusters():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    names = {
        f"kvmesh-kv-cache-0-{gone.pid}-0a1b2c3d",  # its creator exited: leaked
        f"kvmesh-decode-1-{os.getpid()}-0a1b2c3d",  # a live process's: not this round's
    }
    assert orphaned(names) == [f"kvmesh-kv-cache-0-{gone.pid}-0a1b2c3d"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return reference_engine(tiny_model_dir)


def reply_of(engine, request) -> Reply:
    """What a client that got exactly the Engine's reply holds."""
    reply = Reply(
        usage={
            "prompt_tokens": len(request.prompt),
            "completion_tokens": sum(len(o.token_ids) for o in request.expected),
        }
    )
    for j, out in enumerate(request.expected):
        reply.texts[j] = out.text
        reply.finish[j] = out.finish_reason
        reply.tokens[j] = [
            engine.tokenizer.decode([t], skip_special_tokens=False) for t in out.token_ids
        ]
    return reply


# --- the workload ---


def test_workload_is_seeded_multi_turn_and_its_stops_fire(engine):
    requests = make_workload(engine, seed=3, num_sessions=8, max_turns=3)
    again = make_workload(engine, seed=3, num_sessions=8, max_turns=3)
    assert [(r.prompt, r.body) for r in requests] == [(r.prompt, r.body) for r in again]
    assert [(r.prompt, r.body) for r in make_workload(engine, 4, 8, 3)] != [
        (r.prompt, r.body) for r in requests
    ]
    by_session = {}
    for r in requests:
        by_session.setdefault(r.session, []).append(r)
    multi = [turns for turns in by_session.values() if len(turns) > 1]
    assert multi, "some session has several turns"
    for turns in multi:
        for before, after in zip(turns, turns[1:], strict=False):
            # the next turn holds the prompt and the Engine's reply to it
            history = before.prompt + before.expected[0].token_ids
            assert after.prompt[: len(history)] == history
            assert len(after.prompt) > len(history)
    stopped = [r for r in requests if r.body.get("stop")]
    # cut from choice 0's reply, so it fires there (another choice samples other text)
    assert stopped and all(r.expected[0].finish_reason == "stop" for r in stopped)
    assert all(len(r.expected) == r.body["n"] for r in requests)
    assert any(r.body["n"] == 2 for r in requests)
    assert any("seed" in r.body for r in requests) and any(
        r.body.get("temperature") == 0.0 for r in requests
    )


# --- the checks can fail ---


def test_compare_passes_the_engines_reply_and_names_each_difference(engine):
    requests = make_workload(engine, seed=5, num_sessions=4, max_turns=2)
    replies = [reply_of(engine, r) for r in requests]
    assert compare(engine, requests, replies) == []
    r = next(r for r in requests if r.expected[0].finish_reason == "length")
    lost = replies[r.index]
    lost.texts[0] = lost.texts[0][:-1]  # a lost last character
    lost.usage = dict(lost.usage, completion_tokens=lost.usage["completion_tokens"] - 1)
    replies[0].finish[0] = "abort" if replies[0].finish[0] != "abort" else "length"
    problems = compare(engine, requests, replies)
    assert any(f"request {r.index} " in p and "text" in p for p in problems)
    assert any(f"request {r.index} " in p and "usage" in p for p in problems)
    assert any("request 0 " in p and "finish_reason" in p for p in problems)


def test_a_disconnected_stream_must_hold_a_prefix_of_the_engines_text(engine):
    (request, *_) = make_workload(engine, seed=6, num_sessions=1, max_turns=1)
    got = Reply(disconnected=True, texts={0: request.expected[0].text[:3]})
    assert compare(engine, [request], [got]) == []
    got.texts[0] = "#" + got.texts[0]
    assert "not a prefix" in compare(engine, [request], [got])[0]


class FakeCluster:
    url = "http://127.0.0.1:9"

    def __init__(self, rows):
        self.rows = rows

    def status(self):
        return self.rows


def test_idle_invariants_name_what_is_still_held(monkeypatch):
    monkeypatch.setattr("kvmesh.bench.serve.scrape", lambda url: {"kvmesh_requests_running": 1})
    rows = {
        "decode-0": {"role": "decode", "load": {"num_running": 0, "kv_usage": 0.25}},
        "decode-1": {"role": "decode", "load": {"num_running": 0, "kv_usage": 0.0}},
        "cache-0": {"role": "cache", "load": {"reserved_host": 2.0}},
        "router": {"role": "router", "load": {"pending_tokens": 0.0, "pending_placements": 1.0}},
    }
    problems = idle_problems(FakeCluster(rows))
    assert len(problems) == 4
    assert "decode-0 is not idle" in problems[0] and "'kv_usage': 0.25" in problems[0]
    assert "cache-0 holds 2 slot reservations" in problems[1]
    assert "router still predicts load" in problems[2]
    assert "1 requests still running" in problems[3]


# --- real clusters ---


@pytest.mark.cluster
@pytest.mark.parametrize(
    "scenario, seed", [("kv-kill", 11), ("round_robin", 12), ("kv-disagg-keyed-kill", 13)]
)
def test_short_stress_round(engine, tiny_model_dir, scenario, seed):
    result = stress_round(engine, tiny_model_dir, scenario, seed, num_sessions=8, max_turns=3)
    assert result["problems"] == []
    assert result["requests"] >= 8
    assert (result["killed"] is not None) == SCENARIOS[scenario][1]


@pytest.mark.cluster
@pytest.mark.slow
def test_long_stress_run_every_scenario(tmp_path, tiny_model_dir):
    """Two rounds of every scenario through the CLI (CI runs this)."""
    out = tmp_path / "stress.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmesh",
            "--log-level",
            "warning",
            "bench",
            "stress",
            "--model",
            str(tiny_model_dir),
            "--seed",
            "100",
            "--rounds",
            str(2 * len(SCENARIOS)),
            "--sessions",
            "16",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every reply equal to the Engine's, every invariant held" in proc.stdout
