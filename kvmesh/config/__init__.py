"""cluster.toml: the schema, the loader and KEY=VALUE overrides.

One file configures a whole cluster, and every CLI flag overrides one key. The classes
of schema.py are the single source of truth: their field defaults are the default
cluster and the `doc(...)` beside each field is that key's comment. The repository's
cluster.toml is `python -m kvmesh.config` (a test keeps the two equal), so an installed
package needs no data file and the reference can never drift from the schema.

Loading (loading.py): TOML -> dict -> msgspec.convert (types, ranges, allowed values,
unknown keys) -> overrides, one at a time -> check() (book.py: rules across keys: one
router, ports, nodes). Every mistake is a ConfigError naming the dotted key, spelled as
an override spells it (`nodes.0.actors.1.count`), what was given and what is allowed.

The address book (book.py): actors expand in file order (nodes, each node's
[[nodes.actors]], then count); the k-th actor of a role is "<role>-k" and the i-th actor
overall gets the two ports base_port + 2i (its ROUTER socket) and base_port + 2i + 1
(its PUB socket of KV events and load), so every process derives the same book from the
same config:

    [[nodes]] a:  frontend x1   router x1   decode x2            [[nodes]] b:  decode x1
    i             0             1           2         3                        4
    actor_id      frontend-0    router-0    decode-0  decode-1                 decode-2

    endpoint         tcp://<its node's address>:<base_port + 2i>      ipc://<ipc_dir>/<id>
    events_endpoint  tcp://<its node's address>:<base_port + 2i + 1>  ipc://<ipc_dir>/<id>.events
    bind, events_bind: the same (cluster.host's 0.0.0.0 or :: if set)  the same ipc:// paths
"""

from kvmesh.config.book import expand
from kvmesh.config.loading import config_to_toml, load_config, parse_override
from kvmesh.config.schema import ActorSpec, ClusterConfig, ConfigError

__all__ = [
    "ActorSpec",
    "ClusterConfig",
    "ConfigError",
    "config_to_toml",
    "expand",
    "load_config",
    "parse_override",
]
