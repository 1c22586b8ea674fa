"""`kvmesh bench serve peer`: one chat client for every server, failures loud. End to end
on the tiny model with kvmesh's servers and the Engine (vLLM when this env imports it)."""

import importlib.util
import json
import subprocess
import sys

import click
import pytest

from kvmesh.bench.chat_load import ChatRecord, Workload, check, check_prompts, make_workload

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def record(tokens: int, error: str | None = None, prompt: int = 40) -> ChatRecord:
    usage = {"completion_tokens": tokens, "prompt_tokens": prompt}
    return ChatRecord(sent=1.0, first=1.5, last=2.0, usage=usage, error=error)


def workload(max_tokens: int = 8) -> Workload:
    return Workload(messages=["a b"], prompt_ids=[[1, 2]], max_tokens=max_tokens, concurrency=1)


def test_replies_of_the_asked_length_pass_and_count_their_prompts():
    assert check([record(8), record(8, prompt=41)], workload(), "serve") == 81


def test_a_short_reply_fails_the_run():
    with pytest.raises(
        click.ClickException,
        match=r"up: 1 replies of other than 8 tokens \(request, tokens\): \[\(1, 5\)\]",
    ):
        check([record(8), record(5)], workload(), "up")


def test_an_error_fails_the_run():
    with pytest.raises(click.ClickException, match="vllm: 1/2 requests failed; first: boom"):
        check([record(8), record(0, error="boom")], workload(), "vllm")


def test_servers_that_count_the_prompt_differently_fail_the_run():
    check_prompts({"serve": {"prompt_tokens": 10}, "up": {"prompt_tokens": 10}})
    with pytest.raises(click.ClickException, match="different prompt tokens"):
        check_prompts({"serve": {"prompt_tokens": 10}, "vllm": {"prompt_tokens": 12}})


def test_itl_spreads_first_to_last_over_the_tokens_after_the_first():
    assert record(11).itl == pytest.approx(0.05)


def test_the_workload_is_seeded_chat_of_the_words_asked_for(tiny_model_dir):
    a = make_workload(tiny_model_dir, 3, 20, 8, 2)
    assert a.messages == make_workload(tiny_model_dir, 3, 20, 8, 2).messages
    assert [len(m.split()) for m in a.messages] == [20, 20, 20]
    assert len(set(a.messages)) == 3
    assert all(len(ids) > 20 for ids in a.prompt_ids)  # the template's tokens around them


def test_an_unknown_server_is_a_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "kvmesh", "bench", "serve", "peer", "--servers", "serve,sglang"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown server(s) ['sglang']; allowed: engine, vllm, serve, up" in proc.stderr


@pytest.mark.cluster
def test_every_server_answers_the_same_workload_in_full(tmp_path, tiny_model_dir):
    out = tmp_path / "peer.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmesh",
            "--log-level",
            "warning",
            "bench",
            "serve",
            "peer",
            "--model",
            str(tiny_model_dir),
            "--requests",
            "4",
            "--input-tokens",
            "24",
            "--output-tokens",
            "6",
            "--concurrency",
            "2",
            "--repeat",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    names = ["engine", *(["vllm"] if HAVE_VLLM else []), "serve", "up"]
    assert list(result["servers"]) == names
    if not HAVE_VLLM:
        assert "vllm: not measured" in proc.stderr
    prompts = {r["prompt_tokens"] for r in result["servers"].values()}
    assert len(prompts) == 1 and prompts.pop() > 4 * 24
    for name, r in result["servers"].items():
        assert [x["output_tokens"] for x in r["rounds"]] == [4 * 6, 4 * 6], name
        assert r["output_tokens_per_s"] == max(x["output_tokens_per_s"] for x in r["rounds"])
        assert r["ttft_mean_s"] > 0 and r["itl_mean_s"] > 0 and r["cpu_s"] > 0
        assert r["ready_after_s"] > 0
    up, engine = result["servers"]["up"], result["servers"]["engine"]
    assert result["ratios"]["up_vs_engine"]["output_tokens_per_s"] == pytest.approx(
        up["output_tokens_per_s"] / engine["output_tokens_per_s"]
    )
    assert "ratio up / engine: output tok/s" in proc.stdout


def test_a_server_that_fails_to_start_shows_its_root_cause():
    from kvmesh.bench.servers import first_error

    log = (
        "WARNING found ulimit; failed with error current limit\n"
        "(Worker) ERROR Traceback (most recent call last):\n"
        "(Worker) ERROR ValueError: Available memory on node 0 is less than desired\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert first_error(log).splitlines() == log.splitlines()[2:]
    assert first_error("just\nstarting\n") == "just\nstarting\n"
