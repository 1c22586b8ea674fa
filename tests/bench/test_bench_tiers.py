"""`kvmesh bench tiers` on a small workload (seconds): runs, writes JSON, and holds the
invariants of the tiers (never a changed output; host and disk hits where they must be).
No wall time or speed ratio is asserted."""

import json

import pytest
from click.testing import CliRunner

from kvmesh.cli.bench import bench

# 4 chats x 3 turns: prompts of 96, 96+4+32 = 132 and 132+4+32 = 168 tokens. The pool (16
# blocks) holds about one chat, so device only loses every prefix before its chat's next
# turn; the host tier of host_disk (16 blocks) pushes most of them on to disk. small and
# object: host 16 + disk 8 blocks, less than the working set (44); object adds a bucket on
# a moto server process, 5 ms injected per request. Crossover: a prompt of 200 tokens.
SMALL = [
    "--conversations",
    "4",
    "--turns",
    "3",
    "--first-tokens",
    "96",
    "--user-tokens",
    "32",
    "--output-tokens",
    "4",
    "--pool-blocks",
    "16",
    "--small-disk-blocks",
    "8",
    "--object-latency-ms",
    "5",
    "--crossover-tokens",
    "200",
]
NUM_REQUESTS = 12
PROMPT_TOKENS = 4 * (96 + 132 + 168)
# What the previous turn computed, in full blocks: 99 tokens (prompt + 3 of its 4 output
# tokens; the last one is sampled, never computed) -> 6 blocks; 135 -> 8 blocks.
WHOLE_PREFIX_CACHED = 4 * (6 + 8) * 16


def run_bench(tiny_model_dir, tmp_path, *args) -> tuple:
    out_file = tmp_path / "tiers.json"
    result = CliRunner().invoke(
        bench, ["tiers", "--model", str(tiny_model_dir), "--json", str(out_file), *args]
    )
    return result, out_file


@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench-tiers")
    result, out_file = run_bench(
        tiny_model_dir, tmp_path, *SMALL, "--repeats", "2", "--disk-dir", str(tmp_path / "disk")
    )
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out_file.read_text()), tmp_path


def test_prints_table_and_ratio(small_run):
    output, _, _ = small_run
    assert "ratio TTFT mean host+disk / device only:" in output
    for name in ("device", "host", "host_disk"):
        assert f"\n{name} " in output


def test_json_structure(small_run):
    _, result, _ = small_run
    assert result["requests"] == NUM_REQUESTS
    assert result["repeats"] == 2
    assert result["workload"] == {
        "conversations": 4,
        "turns": 3,
        "first_tokens": 96,
        "user_tokens": 32,
        "output_tokens": 4,
    }
    assert result["working_set_blocks"] == 4 * 11  # 96 + 2 * 32 + 3 * 4 = 172 tokens
    assert set(result["configs"]) == {"device", "host", "host_disk", "small", "object"}
    assert set(result["ttft_mean_vs_device"]) == {"host", "host_disk", "small", "object"}
    for config in result["configs"].values():
        assert config["prompt_tokens"] == PROMPT_TOKENS
        assert len(config["ttft_s"]) == NUM_REQUESTS
        assert 0 < config["ttft_p50_s"] <= config["ttft_p90_s"]
        assert config["preemptions"] == 0
    assert result["configs"]["device"]["onboarded"] == {}
    assert result["configs"]["host"]["host_blocks"] == 44 + 16
    assert result["configs"]["host_disk"]["host_blocks"] == 16
    assert result["configs"]["host_disk"]["disk_blocks"] == 44 + 16
    assert result["configs"]["object"]["disk_blocks"] == 8
    assert result["object"]["working_set_vs_host_disk"] == 44 / (16 + 8)
    assert [row["prompt_tokens"] for row in result["object"]["crossover"]] == [200]


def test_tiers_never_change_outputs(small_run):
    _, result, _ = small_run
    assert result["greedy_outputs_equal_device"] == {
        "host": NUM_REQUESTS,
        "host_disk": NUM_REQUESTS,
        "small": NUM_REQUESTS,
        "object": NUM_REQUESTS,
    }
    assert [row["outputs_equal"] for row in result["object"]["crossover"]] == [True]
    assert result["greedy_outputs_all_equal"] is True


def test_tiers_serve_the_prefixes_device_lost(small_run):
    _, result, _ = small_run
    device, host, host_disk = (result["configs"][name] for name in ("device", "host", "host_disk"))
    assert device["cached_tokens"] < WHOLE_PREFIX_CACHED
    assert device["hit_rate"] < host["hit_rate"]
    # Tiers large enough for a step's run plus its evictions: every prefix comes back.
    assert host["cached_tokens"] == host_disk["cached_tokens"] == WHOLE_PREFIX_CACHED
    assert host["onboarded"]["host"] > 0
    assert host["onboarded"]["disk"] == 0
    assert host_disk["onboarded"]["disk"] > 0
    for config in (host, host_disk):
        assert all(counters["failed"] == 0 for counters in config["tiers"].values())


def test_the_object_tier_serves_what_fell_out_of_host_and_disk(small_run):
    _, result, _ = small_run
    small, objects = result["configs"]["small"], result["configs"]["object"]
    assert small["cached_tokens"] < WHOLE_PREFIX_CACHED  # DRAM + SSD < the working set
    assert small["onboarded"]["object"] == 0
    assert objects["onboarded"]["object"] > 0
    assert objects["tiers"]["object"]["offloaded"] > 0
    assert all(counters["failed"] == 0 for counters in objects["tiers"].values())
    # every full block but the last (the engine computes at least one token) came from
    # the bucket alone
    for row in result["object"]["crossover"]:
        assert row["cached_tokens"] == (row["prompt_tokens"] - 1) // 16 * 16


def test_disk_dir_left_empty(small_run):
    _, _, tmp_path = small_run
    assert list((tmp_path / "disk").iterdir()) == []


def test_pool_too_small_is_a_clear_error(tiny_model_dir, tmp_path):
    result, out_file = run_bench(
        tiny_model_dir, tmp_path, "--first-tokens", "300", "--pool-blocks", "8"
    )
    assert result.exit_code == 2
    assert "--pool-blocks" in result.output
    assert not out_file.exists()


@pytest.mark.cluster
def test_through_clusters_the_cache_actor_serves_the_same_prefixes(tiny_model_dir, tmp_path):
    # The same chats through `kvmesh up` clusters, the tiers held by the cache actor:
    # every reply equals the in-process Engine's, and the cache actor brings back exactly
    # the prefixes the in-process tiers did.
    result, out_file = run_bench(
        tiny_model_dir,
        tmp_path,
        *SMALL,
        "--repeats",
        "1",
        "--disk-dir",
        str(tmp_path / "disk"),
        "--cluster",
    )
    assert result.exit_code == 0, result.output
    assert "through clusters" in result.output
    clusters = json.loads(out_file.read_text())["cluster"]
    device, host, host_disk = (
        clusters["configs"][name] for name in ("device", "host", "host_disk")
    )
    for config in (device, host, host_disk):
        assert config["outputs_equal_engine"] == NUM_REQUESTS
        assert config["prompt_tokens"] == PROMPT_TOKENS
    assert device["cached_tokens"] < WHOLE_PREFIX_CACHED
    assert host["cached_tokens"] == host_disk["cached_tokens"] == WHOLE_PREFIX_CACHED
    assert "nodes.0.actors.4.count=0" in device["overrides"]
    assert any(o.startswith("kv.disk_gb=") for o in host_disk["overrides"])
    assert list((tmp_path / "disk").iterdir()) == []
