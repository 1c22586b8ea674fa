"""`kvmesh bench engine` end to end on a small workload: runs, writes JSON, and its
Engine outputs equal transformers' (the benchmark doubles as a correctness check)."""

import json
import subprocess
import sys


def test_bench_engine_small_workload(tmp_path, tiny_model_dir):
    out_file = tmp_path / "engine.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmesh",
            "--log-level",
            "warning",
            "bench",
            "engine",
            "--model",
            str(tiny_model_dir),
            "--requests",
            "3",
            "--json",
            str(out_file),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio Engine / transformers:" in proc.stdout
    result = json.loads(out_file.read_text())
    assert result["requests"] == 3
    assert result["greedy_outputs_equal_hf"] == 3
    assert result["greedy_outputs_equal_cold_vs_cached"] == 3
    assert result["engine_prefix_cached"]["cached_prompt_fraction"] > 0.9
    assert result["ratio_engine_vs_hf"] > 0
