"""How big a worker's KV pool is, decided without a GPU: kv.device_blocks = 0 (auto)
sizes a CUDA pool from the GPU's free memory and gives a CPU pool a fixed count, so a
node's CPU workers never reserve RAM-sized pools in /dev/shm."""

import pytest
import torch

from kvmesh.config import load_config
from kvmesh.gpu import kv_cache
from kvmesh.gpu.kv_cache import CPU_AUTO_BLOCKS, configured_num_blocks, default_num_blocks
from kvmesh.gpu.model_config import ModelConfig

MiB = 2**20


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    ("device_blocks", "device", "num_blocks"),
    [
        (0, "cpu", CPU_AUTO_BLOCKS),
        (0, "cuda:0", None),
        (0, "cuda:7", None),
        (512, "cpu", 512),
        (512, "cuda:3", 512),
    ],
)
def test_configured_num_blocks(device_blocks, device, num_blocks):
    assert configured_num_blocks(device_blocks, device) == num_blocks


def test_default_cluster_gives_every_cpu_worker_the_fixed_pool():
    cfg = load_config()
    assert cfg.kv.device_blocks == 0
    workers = [a for a in cfg.actors if a.role in ("prefill", "decode")]
    assert [(a.device, configured_num_blocks(cfg.kv.device_blocks, a.device)) for a in workers] == [
        ("cpu", 4096)
    ] * 3


def test_cpu_auto_pool_is_128_mib_of_the_tiny_model(tiny_config):
    block_bytes = tiny_config.kv_bytes_per_block(16, 4)  # float32
    assert CPU_AUTO_BLOCKS * block_bytes == 128 * MiB


def test_cuda_pool_takes_85_percent_of_free_memory(monkeypatch, tiny_config):
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return 1000 * MiB, 80_000 * MiB  # (free, total)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    block_bytes = tiny_config.kv_bytes_per_block(16, 2)  # bfloat16: 16 KiB
    num_blocks = default_num_blocks(tiny_config, 16, torch.bfloat16, "cuda:3", max_tokens=10**9)
    assert num_blocks == int(1000 * MiB * 0.85) // block_bytes == 54400
    assert asked == [torch.device("cuda:3")]


def test_cuda_pool_is_capped_at_what_max_tokens_can_use(monkeypatch, tiny_config):
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 10**12)
    assert default_num_blocks(tiny_config, 16, torch.bfloat16, "cuda:0", max_tokens=1000) == 63


def test_no_room_for_one_block_is_an_error_naming_the_device(monkeypatch, tiny_config):
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 100)
    with pytest.raises(ValueError, match="no memory left on cuda:1 for even one KV block"):
        default_num_blocks(tiny_config, 16, torch.bfloat16, "cuda:1", max_tokens=1000)
