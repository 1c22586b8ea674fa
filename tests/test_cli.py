"""The `kvmesh` command line, in process (click's CliRunner): log options before or after
the subcommand, the quick start, `kvmesh chat`'s quitting, and what `kvmesh status` prints
of each actor's typed load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmesh.cli import cli
from kvmesh.protocol import (
    ActorStatus,
    CacheLoad,
    ClusterStatus,
    OnboardCounters,
    RouterLoad,
    TierCounters,
    WorkerLoad,
)


@pytest.fixture
def configured(monkeypatch) -> list[tuple]:
    """The arguments of every kvmesh.log.configure call."""
    calls: list[tuple] = []
    monkeypatch.setattr("kvmesh.log.configure", lambda *args: calls.append(args))
    return calls


class FakeClient:
    """Stands in for kvmesh.client.Client: streams `pieces`, then raises `then`."""

    pieces = ["Hel", "lo"]
    then: BaseException | None = None

    def __init__(self, url, api_key=None) -> None:
        self.url = url

    def chat(self, messages, **params):
        for text in self.pieces:
            yield type("Piece", (), {"text": text})
        if self.then is not None:
            raise self.then


LOG_ARGS = [  # the command line, and what logging is configured with
    (["chat"], ("warning", False, None, "info")),
    (["--log-level", "debug", "chat"], ("debug", False, None, "info")),
    (["chat", "--log-level", "debug"], ("debug", False, None, "info")),
    (["--log-level", "error", "chat", "--log-level", "info"], ("info", False, None, "info")),
    (["-v", "chat"], ("info", False, None, "info")),
    (["chat", "-vv"], ("debug", False, None, "info")),
    (["-v", "chat", "-v"], ("debug", False, None, "info")),
    (
        ["chat", "--log-json", "--log-file", "x.log", "--log-file-level", "debug"],
        ("warning", True, Path("x.log"), "debug"),
    ),
]


@pytest.mark.parametrize(("args", "settings"), LOG_ARGS, ids=[" ".join(a) for a, _ in LOG_ARGS])
def test_log_options_go_before_or_after_the_subcommand(configured, args, settings):
    result = CliRunner().invoke(cli, args, input="")
    assert (result.exit_code, configured) == (0, [settings]), result.output


@pytest.mark.parametrize("args", [["--log-level", "warning"], ["-v"], ["--log-json"]])
def test_up_accepts_the_log_options_after_the_subcommand(args):
    result = CliRunner().invoke(cli, ["up", *args, "--help"])
    assert result.exit_code == 0, result.output


def test_the_quick_start_begins_with_kvmesh_up_on_smollm2():
    result = CliRunner().invoke(cli, ["--help"])
    quick_start = result.output.split("Quick start")[1].splitlines()[2]
    assert quick_start.strip() == 'kvmesh up --model smollm2 --ask "What is the capital of France?"'


def test_chat_says_how_to_quit_and_an_empty_line_quits(configured, monkeypatch):
    monkeypatch.setattr("kvmesh.client.Client", FakeClient)
    result = CliRunner().invoke(cli, ["chat", "--url", "http://127.0.0.1:1"], input="hi\n\n")
    assert (result.exit_code, result.stdout, result.stderr) == (
        0,
        "you> kvmesh> Hello\nyou> ",
        "chatting with http://127.0.0.1:1; an empty line, Ctrl-D or Ctrl-C quits\n",
    )


def test_ctrl_c_at_the_prompt_quits_without_aborted(configured, monkeypatch):
    def interrupted(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    result = CliRunner().invoke(cli, ["chat"])
    assert (result.exit_code, result.stdout) == (0, "\n")
    assert "Aborted" not in result.output


def test_ctrl_c_during_an_answer_stops_that_answer_only(configured, monkeypatch):
    monkeypatch.setattr("kvmesh.client.Client", FakeClient)
    monkeypatch.setattr(FakeClient, "then", KeyboardInterrupt())
    result = CliRunner().invoke(cli, ["chat"], input="hi\n\n")
    assert (result.exit_code, result.stdout) == (0, "you> kvmesh> Hello [stopped]\nyou> ")


def actor(actor_id: str, role: str, load) -> ActorStatus:
    return ActorStatus(
        actor_id=actor_id, role=role, node="n", pid=1, endpoints={}, alive=True, load=load
    )


CLUSTER = ClusterStatus(
    actors=[
        actor("router", "router", RouterLoad(routed_total=7, pending_tokens=40)),
        actor(
            "decode-0",
            "decode",
            WorkerLoad(
                num_running=2,
                kv_usage=0.25,
                prompt_tokens_total=300,
                cached_tokens_total=64,
                tiers={"host": OnboardCounters(onboarded=4), "disk": OnboardCounters(failed=1)},
            ),
        ),
        actor(
            "cache-0",
            "cache",
            CacheLoad(
                tiers={
                    "host": TierCounters(offloaded=5, lookups=8, hits=4),
                    "disk": TierCounters(),
                },
                blocks={"host": 3, "disk": 2},
                reserved={"host": 1},
                capacity={"host": 20, "disk": 100},
            ),
        ),
        actor("frontend-0", "frontend", None),
    ]
)


def test_status_prints_each_actors_typed_load_as_flat_numbers(configured, monkeypatch):
    monkeypatch.setattr("kvmesh.actors.client.status", lambda *args, **kwargs: CLUSTER)
    result = CliRunner().invoke(cli, ["status", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["actor"]: row for row in json.loads(result.output)}
    assert rows["router"]["load"] == {
        "routed_total": 7.0,
        "pending_tokens": 40.0,
        "pending_placements": 0.0,
        "prompt_tokens_total": 0.0,
        "cached_tokens_total": 0.0,
        "best_cached_tokens_total": 0.0,
        "remote_prefills_total": 0.0,
        "worker_deaths_total": 0.0,
        "pool_fallbacks_total": 0.0,
    }
    decode = rows["decode-0"]
    assert decode["load"] == {
        "num_running": 2.0,
        "num_waiting": 0.0,
        "num_remote": 0.0,
        "kv_usage": 0.25,
        "queued_prefill_tokens": 0.0,
        "prompt_tokens_total": 300.0,
        "cached_tokens_total": 64.0,
        "remote_prefills_total": 0.0,
        "transfer_bytes_total": 0.0,
        "preemptions_total": 0.0,
        "onboarded_host": 4.0,
        "failed_host": 0.0,
        "onboarded_disk": 0.0,
        "failed_disk": 1.0,
    }
    assert (decode["running"], decode["kv_usage"], decode["cache_hit_rate"]) == (2, 0.25, 0.213)
    cache = rows["cache-0"]
    assert list(cache["tiers"].items()) == [
        ("offloaded_host", 5),
        ("lookups_host", 8),
        ("hits_host", 4),
        ("evicted_host", 0),
        ("offloaded_disk", 0),
        ("lookups_disk", 0),
        ("hits_disk", 0),
        ("evicted_disk", 0),
        ("blocks_host", 3),
        ("reserved_host", 1),
        ("capacity_host", 20),
        ("blocks_disk", 2),
        ("capacity_disk", 100),
    ]
    assert (cache["kv_usage"], cache["cache_hit_rate"]) == (0.15, 0.5)
    assert rows["frontend-0"]["load"] == {}


def test_status_table_reads_the_typed_loads(configured, monkeypatch):
    monkeypatch.setattr("kvmesh.actors.client.status", lambda *args, **kwargs: CLUSTER)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    rows = [line.rsplit("  ", 1)[0] for line in result.output.splitlines()[1:]]
    assert rows == [
        "router       router    n                1 alive     0    0   0.0%   0.0%",
        "decode-0     decode    n                1 alive     2    0  25.0%  21.3%",
        "cache-0      cache     n                1 alive     0    0  15.0%  50.0%",
        "frontend-0   frontend  n                1 alive     0    0   0.0%   0.0%",
    ]
