"""`python -m kvmesh.config` prints the default cluster.toml."""

from kvmesh.config import config_to_toml, load_config

print(config_to_toml(load_config()), end="")
