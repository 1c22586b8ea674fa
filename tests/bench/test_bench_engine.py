"""`kvmesh bench engine` end to end on a small workload: runs, writes JSON, and its
Engine outputs equal transformers' (the benchmark doubles as a correctness check).
The vLLM side's JSON protocol (kvmesh/bench/vllm_peer.py) is checked on both ends;
the real vLLM peer runs in a `slow` test where /opt/vllm has it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from kvmesh.bench.engine import PEER_SCRIPT, check_peer_result

VLLM_PYTHON = Path("/opt/vllm/bin/python")


def run_bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "kvmesh", "--log-level", "warning", "bench", "engine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def peer_request(model_dir, **overrides) -> dict:
    request = {
        "model": str(model_dir),
        "dtype": "float32",
        "threads": 1,
        "max_model_len": 64,
        "workload": [[[5, 6, 7], 4], [[8, 9], 2]],
    }
    request.update(overrides)
    return request


def run_peer(tmp_path, request, python=sys.executable):
    request_file, result_file = tmp_path / "request.json", tmp_path / "result.json"
    request_file.write_text(json.dumps(request))
    proc = subprocess.run(
        [python, str(PEER_SCRIPT), str(request_file), str(result_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, result_file


def test_bench_engine_small_workload(tmp_path, tiny_model_dir):
    out_file = tmp_path / "engine.json"
    proc = run_bench(
        "--model", str(tiny_model_dir), "--requests", "3", "--threads", "1", "--json", str(out_file)
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio Engine / transformers:" in proc.stdout
    result = json.loads(out_file.read_text())
    assert result["requests"] == 3
    assert result["dtype"] == "float32"
    assert result["prompt_lens"] == [32, 768] and result["output_lens"] == [16, 160]
    assert result["greedy_outputs_equal_hf"] == 3
    assert result["greedy_outputs_equal_cold_vs_cached"] == 3
    assert result["engine_prefix_cached"]["cached_prompt_fraction"] > 0.9
    assert result["ratio_engine_vs_hf"] > 0
    assert result["engine"]["load_seconds"] > 0 and result["hf_generate"]["load_seconds"] > 0
    if result["vllm"] is None:  # vllm is not importable by the test's interpreter
        assert "vLLM: not run" in proc.stdout


def test_bench_engine_bfloat16_reports_agreement_as_a_count(tmp_path, tiny_model_dir):
    out_file = tmp_path / "engine.json"
    proc = run_bench(
        "--model", str(tiny_model_dir), "--requests", "2", "--threads", "1", "--dtype", "bfloat16",
        "--json", str(out_file),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out_file.read_text())
    assert result["dtype"] == "bfloat16"
    assert result["greedy_outputs_equal_hf"] in (0, 1, 2)
    assert "dtype bfloat16" in proc.stdout


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["--dtype", "float16"], "--dtype"),
        (["--peer-python", "/nonexistent/python"], "--peer-python"),
        (["--requests", "0"], "--requests"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_options_are_refused_naming_them(args, hint):
    proc = run_bench(*args, timeout=60)
    assert proc.returncode == 2
    assert hint in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dtype": "float16"}, "dtype"),
        ({"threads": 0}, "threads"),
        ({"threads": True}, "threads"),
        ({"max_model_len": "64"}, "max_model_len"),
        ({"model": "/nonexistent"}, "model"),
        ({"workload": []}, "workload"),
        ({"workload": [[[5, 6], 0]]}, "workload[0]"),
        ({"workload": [[[5], 2], [[], 2]]}, "workload[1]"),
    ],
)
def test_peer_refuses_a_bad_request_naming_the_field(tmp_path, tiny_model_dir, overrides, field):
    proc, result_file = run_peer(tmp_path, peer_request(tiny_model_dir, **overrides))
    assert proc.returncode == 2
    assert f"bad request: {field}:" in proc.stderr
    assert not result_file.exists()


def test_peer_without_vllm_says_so(tmp_path, tiny_model_dir):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vllm")
    proc, result_file = run_peer(tmp_path, peer_request(tiny_model_dir))
    assert proc.returncode == 3
    assert "vllm is not importable" in proc.stderr
    assert not result_file.exists()


def peer_result(outputs) -> dict:
    return {"vllm_version": "0", "load_seconds": 1.0, "seconds": 2.0, "outputs": outputs}


def test_peer_result_with_every_requested_token_is_accepted():
    result = peer_result([[1, 2, 3], [4]])
    assert check_peer_result(result, [([9], 3), ([9], 1)]) is result


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (peer_result([[1, 2, 3]]), "outputs has 1 entries for 2 requests"),
        (peer_result([[1, 2, 3], []]), "outputs[1] has 0 tokens, 1 were asked for"),
        (peer_result([[1, 2], [4]]), "outputs[0] has 2 tokens, 3 were asked for"),
        ({"vllm_version": "0", "seconds": 1.0, "outputs": []}, "load_seconds is missing"),
        ({**peer_result([[1, 2, 3], [4]]), "seconds": 0}, "seconds must be > 0"),
        ([], "must be a JSON object"),
    ],
)
def test_peer_result_that_is_short_or_malformed_fails(result, message):
    with pytest.raises(click.ClickException, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_peer_result(result, [([9], 3), ([9], 1)])


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM interpreter at {VLLM_PYTHON}")
def test_real_vllm_peer_agrees_with_the_engine_on_smollm2(tmp_path):
    out_file = tmp_path / "engine.json"
    proc = run_bench(
        "--model", "smollm2", "--requests", "4", "--threads", "2",
        "--peer-python", str(VLLM_PYTHON), "--json", str(out_file),
        timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out_file.read_text())
    assert result["vllm"]["version"].startswith("0.")
    assert result["greedy_outputs_equal_hf"] == 4
    assert result["greedy_outputs_equal_vllm"] == 4
    assert result["ratio_engine_vs_vllm"] > 0
