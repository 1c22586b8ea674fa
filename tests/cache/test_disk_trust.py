"""The disk tier never serves another model's KV and is this user's alone: blocks stored
under another model fingerprint (config, weights, KV dtype, block size) are deleted when
the tier opens; two processes cannot hold one tier directory; directories are 0700 and
files 0600, a symlinked or foreign directory is refused (ipc_dir too)."""

import os
import shutil
import stat

import pytest

from kvmesh.cache.disk_tier import DiskTier
from kvmesh.config import ConfigError, load_config
from kvmesh.gpu.model_config import ModelConfig
from kvmesh.kv.block_hash import hash_blocks
from kvmesh.transport.private_dir import private_dir

KEY = bytes(32)  # the block-hash key: fixed, so only what the test varies differs

RECORD = 256
CAPACITY = 8 * (RECORD + 64)


def make_tier(path, fingerprint="model-a") -> DiskTier:
    return DiskTier(path, RECORD, CAPACITY, fingerprint=fingerprint)


def record(n: int) -> bytes:
    return bytes([n % 256]) * RECORD


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- another model's blocks ---


def test_blocks_of_another_fingerprint_are_deleted_at_open(tmp_path):
    tier = make_tier(tmp_path / "t")
    tier.write(1, record(1))
    tier.write(2, record(2))
    tier.close()
    same = make_tier(tmp_path / "t")
    assert sorted(same) == [1, 2] and same.read(1) == record(1)
    same.close()
    other = make_tier(tmp_path / "t", fingerprint="model-a-but-bfloat16")
    assert len(other) == 0 and other.read(1) is None
    assert not [p for p in os.listdir(tmp_path / "t") if p.endswith(".kv")]
    other.close()


def test_blocks_without_a_manifest_are_deleted_at_open(tmp_path):
    tier = make_tier(tmp_path / "t")
    tier.write(1, record(1))
    tier.close()
    os.unlink(tmp_path / "t" / "manifest.json")  # e.g. written by a kvmesh before manifests
    again = make_tier(tmp_path / "t")
    assert len(again) == 0
    again.close()


def test_the_fingerprint_tells_dtype_block_size_and_weights_apart(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    base = config.fingerprint("float32", 16)
    assert base == ModelConfig.from_pretrained(model_dir).fingerprint("float32", 16)
    assert base == ModelConfig.from_pretrained(tiny_model_dir).fingerprint("float32", 16)
    assert config.fingerprint("bfloat16", 16) != base
    assert config.fingerprint("float32", 32) != base
    weights = next(model_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # new weights, same shapes, same size, same directory name
    weights.write_bytes(bytes(data))
    assert ModelConfig.from_pretrained(model_dir).fingerprint("float32", 16) != base
    prompt = list(range(16, 48))
    assert hash_blocks(prompt, 16, salt=config.kv_salt("float32", 16, KEY)) != hash_blocks(
        prompt, 16, salt=config.kv_salt("float16", 16, KEY)
    )


def test_the_cache_actor_opens_its_tier_under_the_clusters_fingerprint(tiny_model_dir, tmp_path):
    from kvmesh.actors.roles import build_actor

    def fingerprint(dtype: str) -> str:
        cfg = load_config(
            None,
            [
                f"model.path={tiny_model_dir}",
                f"model.dtype={dtype}",
                "kv.disk_gb=0.001",
                f"kv.disk_path={tmp_path}",
            ],
        )
        return build_actor(cfg, "cache-0").settings.fingerprint

    model = ModelConfig.from_pretrained(tiny_model_dir)
    assert fingerprint("float16") == model.fingerprint("float16", 16)
    assert fingerprint("bfloat16") != fingerprint("float16")


# --- one owner ---


def test_a_second_process_cannot_hold_the_tier(tmp_path):
    first = make_tier(tmp_path / "t")
    with pytest.raises(ValueError, match=rf"in use by another process \(pid {os.getpid()}\)"):
        make_tier(tmp_path / "t")
    first.close()
    make_tier(tmp_path / "t").close()  # free once the holder lets go


# --- permissions ---


def test_tier_directory_is_private_and_files_owner_only(tmp_path):
    tier = make_tier(tmp_path / "t")
    tier.write(1, record(1))
    assert mode_of(tmp_path / "t") == 0o700
    assert mode_of(tier.file_of(1)) == 0o600
    assert mode_of(tmp_path / "t" / "manifest.json") == 0o600
    tier.close()


def test_an_open_directory_is_closed_and_a_symlink_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    make_tier(loose).close()
    assert mode_of(loose) == 0o700
    (tmp_path / "link").symlink_to(loose)
    with pytest.raises(ValueError, match="kv.disk_path: .*link' is a symbolic link"):
        make_tier(tmp_path / "link")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_another_users_directory_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ValueError, match="belongs to uid 65534, not to this user"):
        make_tier(theirs)
    with pytest.raises(ValueError, match="cluster.ipc_dir: .* belongs to uid 65534"):
        private_dir(theirs, "cluster.ipc_dir")


def test_ipc_dir_is_made_private_when_an_actor_starts(tmp_path, tiny_model_dir):
    from kvmesh.actors.roles import build_actor

    ipc = tmp_path / "ipc"
    ipc.mkdir()
    os.chmod(ipc, 0o777)
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"cluster.ipc_dir={ipc}"])
    build_actor(cfg, "router-0")
    assert mode_of(ipc) == 0o700
    (tmp_path / "ipc-link").symlink_to(ipc)
    cfg = load_config(
        None, [f"model.path={tiny_model_dir}", f"cluster.ipc_dir={tmp_path / 'ipc-link'}"]
    )
    with pytest.raises(ConfigError, match="is a symbolic link"):
        build_actor(cfg, "router-0")
