"""The code is linted and formatted as pyproject.toml's [tool.ruff] says: CI runs this."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    command = [exe] if exe else [sys.executable, "-m", "ruff"]
    return subprocess.run(
        [*command, *args, "kvmesh", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("args", [("check",), ("format", "--check")], ids=["check", "format"])
def test_ruff(args):
    result = ruff(*args)
    assert result.returncode == 0, (
        f"ruff {' '.join(args)} kvmesh tests:\n{result.stdout}{result.stderr}"
    )
