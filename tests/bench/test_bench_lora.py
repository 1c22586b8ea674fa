"""`kvmesh bench lora` end to end on a small workload, and its output check."""

import json
import subprocess
import sys

import click
import pytest

from kvmesh.bench.lora import ADAPTER_COUNTS, check_setting


def test_bench_lora_small_workload(tmp_path, tiny_model_dir):
    out_file = tmp_path / "lora.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvmesh", "--log-level", "warning", "bench", "lora"]
        + ["--model", str(tiny_model_dir), "--requests", "4", "--threads", "1", "--repeats", "2"]
        + ["--json", str(out_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "outputs checked: 4 requests per setting" in proc.stdout
    result = json.loads(out_file.read_text())
    assert [s["adapters"] for s in result["settings"]] == list(ADAPTER_COUNTS)
    assert [s["adapter_loads"] for s in result["settings"]] == [0, 1, 4]
    assert result["settings"][0]["ratio_vs_base"] == 1.0
    assert all(s["tokens_per_s"] > 0 for s in result["settings"])
    assert [len(s["seconds"]) for s in result["settings"]] == [2, 2, 2]
    assert result["requests"] == 4 and result["threads"] == 1


def make_setting(outputs, count=4):
    return {"adapters": count, "outputs": outputs, "row_adapters": ["lora0", "lora1"]}


@pytest.mark.parametrize(
    "outputs, alone, base, message",
    [
        ([[1, 2], [3, 4]], [[1, 2], [3, 5]], [[7], [8]], r"request 1 \(adapter lora1\) gave other"),
        ([[1, 2], [3, 4]], [[1, 2], [3, 4]], [[7], [3, 4]], r"request 1 .* changed nothing"),
    ],
)
def test_check_setting_fails_loudly(outputs, alone, base, message):
    with pytest.raises(click.ClickException, match=message):
        check_setting(make_setting(outputs), alone, base)
    check_setting(make_setting(alone), alone, [[7], [8]])  # agreeing outputs pass
