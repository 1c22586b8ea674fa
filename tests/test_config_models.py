"""[[models]] in cluster.toml: the address book gives each model actor its model, and
every mistake is a ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.actors.roles import node_cache
from kvmesh.config import ConfigError, config_to_toml, load_config

MODELS = """
[[models]]
name = "alpha"
path = "/m/alpha"
block_size = 16

[[models]]
name = "beta"
path = "/m/beta"
block_size = 32
dtype = "bfloat16"

[[nodes]]
name = "a"
address = "127.0.0.1"
[[nodes.actors]]
role = "frontend"
[[nodes.actors]]
role = "router"
[[nodes.actors]]
role = "decode"
count = 2
[[nodes.actors]]
role = "cache"
[[nodes.actors]]
role = "decode"
model = "beta"
[[nodes.actors]]
role = "cache"
model = "beta"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_each_model_actor_gets_its_model_the_first_by_default(tmp_path):
    cfg = load_config(write(tmp_path, MODELS))
    assert [m.served_name for m in cfg.served_models] == ["alpha", "beta"]
    assert [(s.actor_id, s.model) for s in cfg.actors] == [
        ("frontend-0", ""),
        ("router-0", ""),
        ("decode-0", "alpha"),
        ("decode-1", "alpha"),
        ("cache-0", "alpha"),
        ("decode-2", "beta"),
        ("cache-1", "beta"),
    ]
    assert cfg.model_of(cfg.actors[5]).block_size == 32
    assert node_cache(cfg, "a", "beta").actor_id == "cache-1"
    assert node_cache(cfg, "a", "alpha").actor_id == "cache-0"


def test_models_round_trip_through_toml(tmp_path):
    cfg = load_config(write(tmp_path, MODELS))
    again = load_config(write(tmp_path, config_to_toml(cfg)))
    assert again == cfg


def test_without_models_the_model_table_is_the_one_model():
    cfg = load_config()
    assert cfg.served_models == (cfg.model,)
    assert {s.model for s in cfg.actors if s.role in ("prefill", "decode", "cache")} == {
        cfg.model.served_name
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ('[[models]]\nname = "alpha"', '[model]\nname = "x"\n\n[[models]]\nname = "alpha"'),
            "model: set [model] or [[models]], not both; expected the keys in [[models]]",
        ),
        (
            ('name = "beta"', 'name = "alpha"'),
            'models.1.name: duplicate served name "alpha" (also models.0); expected a name '
            "unique in the cluster (set name = ...)",
        ),
        (
            ('role = "decode"\nmodel = "beta"', 'role = "decode"\nmodel = "betta"'),
            'nodes.0.actors.4.model: no model is served as "betta" (did you mean "beta"?); '
            'served: "alpha", "beta"',
        ),
        (
            ('role = "router"', 'role = "router"\nmodel = "beta"'),
            'nodes.0.actors.1.model: a router serves every model; expected "", got "beta"',
        ),
        (
            ('role = "cache"\nmodel = "beta"', 'role = "cache"\nmodel = "alpha"'),
            'nodes.0.actors: 2 cache actors of model "alpha" on node "a"; expected at most '
            "one per node and model",
        ),
        (
            ('role = "decode"\nmodel = "beta"', 'role = "decode"\ncount = 0\nmodel = "beta"'),
            'nodes: no decode actor serves model "beta" (models.1); expected a '
            '[[nodes.actors]] entry with role = "decode", count >= 1 and model = "beta"',
        ),
        (
            ('role = "router"', 'role = "router"\n[[nodes.actors]]\nrole = "planner"'),
            "nodes.0.actors.2: a planner balances one model's prefill and decode workers, and "
            "this cluster serves 2; expected no planner with [[models]] (yet)",
        ),
    ],
    ids=["both", "duplicate", "unknown", "router", "two-caches", "no-decode", "planner"],
)
def test_model_mistakes_name_the_key(tmp_path, change, message):
    old, new = change
    assert old in MODELS
    path = write(tmp_path, MODELS.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


POOLS = """
[[pools]]
name = "short"

[[pools]]
name = "long"
min_prompt_tokens = 512

[[nodes]]
name = "a"
address = "127.0.0.1"
[[nodes.actors]]
role = "frontend"
[[nodes.actors]]
role = "router"
[[nodes.actors]]
role = "decode"
pool = "short"
[[nodes.actors]]
role = "prefill"
pool = "long"
[[nodes.actors]]
role = "decode"
pool = "long"
"""


def test_pool_members_are_in_the_book_and_the_routers_rule(tmp_path):
    from kvmesh.actors.roles import build_actor

    cfg = load_config(write(tmp_path, POOLS))
    assert [(s.actor_id, s.pool) for s in cfg.actors] == [
        ("frontend-0", ""),
        ("router-0", ""),
        ("decode-0", "short"),
        ("prefill-0", "long"),
        ("decode-1", "long"),
    ]
    router = build_actor(cfg, "router-0")
    assert router.settings.pools == {"tiny-llama": ((512, "long"), (0, "short"))}
    assert [router.models.pool_for("tiny-llama", n) for n in (0, 511, 512, 9000)] == [
        "short",
        "short",
        "long",
        "long",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ('name = "long"', 'name = "short"'),
            'pools.1.name: duplicate pool name "short" (also pools.0.name)',
        ),
        (
            ('role = "decode"\npool = "short"', 'role = "decode"\npool = "shrt"'),
            'nodes.0.actors.2.pool: no [[pools]] entry is named "shrt"; pools: "short", "long"',
        ),
        (
            ('role = "router"', 'role = "router"\npool = "long"'),
            'nodes.0.actors.1.pool: a router is in no pool; expected "", got "long"',
        ),
        (
            ('role = "decode"\npool = "short"', 'role = "decode"'),
            'nodes.0.actors.2.pool: model "tiny-llama" has pools, so each of its prefill and '
            'decode workers needs one; expected one of "short", "long"',
        ),
        (
            ("min_prompt_tokens = 512", "min_prompt_tokens = 0"),
            'pools.0.min_prompt_tokens: two pools of model "tiny-llama" start at 0 tokens; '
            "expected different minimums",
        ),
        (
            ('name = "short"\n', 'name = "short"\nmin_prompt_tokens = 8\n'),
            'pools.0.min_prompt_tokens: no pool of model "tiny-llama" takes prompts from 0 '
            "tokens; expected one pool with min_prompt_tokens = 0",
        ),
        (
            ('role = "decode"\npool = "long"', 'role = "prefill"\npool = "long"'),
            'pools.1: pool "long" has no decode actor; expected a [[nodes.actors]] entry with '
            'role = "decode", count >= 1 and pool = "long"',
        ),
        (
            ('name = "long"\n', 'name = "long"\nmodel = "other"\n'),
            'pools.1.model: no model is served as "other"; served: "tiny-llama"',
        ),
    ],
    ids=[
        "duplicate",
        "unknown",
        "router",
        "unpooled",
        "same-start",
        "no-zero",
        "no-decode",
        "model",
    ],
)
def test_pool_mistakes_name_the_key(tmp_path, change, message):
    old, new = change
    assert old in POOLS
    path = write(tmp_path, POOLS.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"
