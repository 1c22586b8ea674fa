"""Fixtures shared by the whole suite."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama (seed 0), built once per test session (about half a second)."""
    from kvmesh.gpu.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny-llama"), seed=0)
