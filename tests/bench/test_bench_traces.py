"""The default benchmark trace ships in the package: it resolves inside kvmesh, the
wheel carries it, make_trace() writes it again byte for byte, it keeps Mooncake's chained
hash ids, and `kvmesh bench index` runs on it with no --trace. Dynamo's n/a line says
how to install it."""

import configparser
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import kvmesh
from kvmesh.bench.router_index import _add_dynamo, index_command
from kvmesh.bench.trace import default_trace_path, load_trace
from kvmesh.bench.traces import make_trace, trace_text

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(kvmesh.__file__).resolve().parent


def setup_cfg() -> configparser.ConfigParser:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    return setup


def test_default_trace_resolves_inside_the_package():
    path = default_trace_path().resolve()
    assert path == PACKAGE / "bench" / "traces" / "mooncake_like.jsonl"
    assert path.is_file()
    assert path.stat().st_size < 300_000  # small: it ships in every wheel


def test_the_wheel_carries_the_trace_and_its_provenance():
    package_data = setup_cfg()["options.package_data"]["kvmesh.bench.traces"]
    patterns = {p.strip() for p in package_data.split(",")}
    assert patterns == {"*.jsonl", "PROVENANCE.txt"}
    provenance = (default_trace_path().parent / "PROVENANCE.txt").read_text()
    assert "Apache-2.0" in provenance
    assert "https://github.com/kvcache-ai/Mooncake/tree/main/FAST25-release/traces" in provenance


def test_make_trace_writes_the_shipped_file_again():
    assert trace_text(make_trace()) == default_trace_path().read_text()


def test_the_trace_reads_as_a_mooncake_trace_with_chained_ids():
    records = load_trace(default_trace_path())
    assert len(records) == 600
    assert [r.timestamp_ms for r in records] == sorted(r.timestamp_ms for r in records)
    parent: dict[int, int | None] = {}  # a chained id always follows the same id
    for r in records:
        assert (len(r.hash_ids) - 1) * 512 < r.input_length <= len(r.hash_ids) * 512
        assert 1 <= r.output_length <= 893
        for before, block in zip((None, *r.hash_ids), r.hash_ids, strict=False):
            assert parent.setdefault(block, before) == before, (block, before)
    blocks = sum(len(r.hash_ids) for r in records)
    repeated = blocks - len(parent)  # blocks an earlier request already had
    assert 0.55 < repeated / blocks < 0.75  # Mooncake's synthetic_trace.jsonl: 0.64


def test_bench_index_runs_on_the_default_trace():
    run = CliRunner().invoke(
        index_command,
        ["--repeats", "1", "--no-dynamo", "--workers", "2", "--capacity-blocks", "256"],
    )
    assert run.exit_code == 0, run.output
    assert f"trace {default_trace_path()}: 600 requests" in run.output
    assert "lookups/s ratio: kvmesh vs naive" in run.output


def test_dynamo_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dynamo.llm", None)  # import raises ImportError
    indexes: dict = {}
    reason = _add_dynamo(indexes, [])
    assert reason.startswith("cannot import dynamo.llm.RadixTree (ModuleNotFoundError: ")
    assert "pip install ai-dynamo-runtime" in reason
    assert "kvmesh[bench]" in reason
    assert indexes == {}


def test_the_bench_extra_installs_dynamo_on_linux():
    extra = setup_cfg()["options.extras_require"]["bench"]
    lines = [line.strip() for line in extra.splitlines() if line.strip()]
    assert 'ai-dynamo-runtime>=1.6; sys_platform == "linux"' in lines


@pytest.mark.parametrize("command", [["index"], ["serve", "routing"]])
def test_help_names_the_packaged_default(command):
    from kvmesh.cli.bench import bench

    run = CliRunner().invoke(bench, [*command, "--help"])
    assert run.exit_code == 0, run.output
    assert "mooncake_like.jsonl" in run.output
    assert "shared/traces" not in run.output
