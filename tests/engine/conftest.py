import pytest

from kvmesh.gpu.model_config import ModelConfig


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_model_dir)
