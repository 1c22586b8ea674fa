"""Fixtures shared by the whole suite."""

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when -m names them (`-m slow`), so any other selection, such
    as the fast loop `-m "not cluster"`, leaves them out too (an -m in addopts would be
    replaced by the command line's, not combined with it)."""
    if "slow" in config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory) -> Path:
    """$XDG_STATE_HOME for the whole session, inherited by every `kvmesh up` a test
    starts: their log files go here, not into the user's ~/.local/state."""
    path = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama (seed 0), built once per test session (about half a second)."""
    from kvmesh.gpu.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny-llama"), seed=0)
