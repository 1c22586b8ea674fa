"""The README's Planner section shows every [planner] key with its default."""

import tomllib

import msgspec

from kvmesh.config.schema import PlannerConfig
from tests.test_readme import fenced, section


def test_readme_planner_table_is_the_default():
    (example,) = fenced(section("Planner"), "toml")
    table = tomllib.loads(example)
    assert table["nodes"]["actors"] == [{"role": "planner"}]
    assert table["planner"] == msgspec.structs.asdict(PlannerConfig())
