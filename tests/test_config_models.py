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
    ],
    ids=["both", "duplicate", "unknown", "router", "two-caches", "no-decode"],
)
def test_model_mistakes_name_the_key(tmp_path, change, message):
    old, new = change
    assert old in MODELS
    path = write(tmp_path, MODELS.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"
