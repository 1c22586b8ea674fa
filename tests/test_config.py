"""kvmesh.config: the default cluster, overrides, every kind of broken file named by its
key, and an address book that is the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest

from kvmesh.config import (
    ActorSpec,
    ClusterConfig,
    ConfigError,
    config_to_toml,
    load_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[1]
ROUTER_KEYS = (
    "policy, device_weight, host_weight, disk_weight, object_weight, load_weight, "
    "adapter_weight, temperature, seed, disagg_min_tokens, prefill_busy_tokens"
)
POLICIES = '"kv", "least_loaded", "random", "round_robin"'  # msgspec sorts them


def node_toml(
    name: str = "local", address: str = "127.0.0.1", device: str = "cpu", **counts: int
) -> str:
    """A [[nodes]] table with one [[nodes.actors]] entry per role=count (device on the
    prefill and decode entries)."""
    lines = ["[[nodes]]", f'name = "{name}"', f'address = "{address}"']
    for role, count in counts.items():
        lines += ["[[nodes.actors]]", f'role = "{role}"', f"count = {count}"]
        if role in ("prefill", "decode"):
            lines.append(f'device = "{device}"')
    return "\n".join(lines) + "\n"


BASIC = node_toml(frontend=1, router=1, prefill=1, decode=2)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def two_nodes(tmp_path: Path) -> Path:
    """Two GPU hosts: a with frontend, router and two decoders on "cuda"; b with a prefill
    worker pinned to cuda:1 and two decoders on "cuda" (so cuda:0 and cuda:2)."""
    a = node_toml("a", "10.0.0.1", "cuda", frontend=1, router=1, decode=2)
    b = (
        '[[nodes]]\nname = "b"\naddress = "10.0.0.2"\n'
        '[[nodes.actors]]\nrole = "prefill"\ndevice = "cuda:1"\n'
        '[[nodes.actors]]\nrole = "decode"\ncount = 2\ndevice = "cuda"\n'
    )
    return write_config(
        tmp_path,
        '[cluster]\nhost = "0.0.0.0"\nbase_port = 7000\n[security]\nkey_dir = "/k"\n' + a + b,
    )


def spec(actor_id: str, node: str, device: str, address: str, port: int) -> ActorSpec:
    """An actor of two_nodes(): it binds 0.0.0.0, peers reach it at its node's address."""
    return ActorSpec(
        actor_id,
        actor_id.rsplit("-", 1)[0],
        node,
        device,
        256,
        2048,
        f"tcp://{address}:{port}",
        f"tcp://{address}:{port + 1}",
        f"tcp://0.0.0.0:{port}",
        f"tcp://0.0.0.0:{port + 1}",
        model="tiny-llama" if actor_id.startswith(("prefill", "decode", "cache")) else "",
    )


# -- the default cluster -------------------------------------------------------------


def test_default_cluster_is_one_cpu_machine_with_the_tiny_model():
    cfg = load_config()
    assert [(a.actor_id, a.node, a.device) for a in cfg.actors] == [
        ("frontend-0", "local", "cpu"),
        ("router-0", "local", "cpu"),
        ("prefill-0", "local", "cpu"),
        ("decode-0", "local", "cpu"),
        ("decode-1", "local", "cpu"),
        ("cache-0", "local", "cpu"),
    ]
    assert cfg.address_book == {
        "frontend-0": "tcp://127.0.0.1:5600",
        "router-0": "tcp://127.0.0.1:5602",
        "prefill-0": "tcp://127.0.0.1:5604",
        "decode-0": "tcp://127.0.0.1:5606",
        "decode-1": "tcp://127.0.0.1:5608",
        "cache-0": "tcp://127.0.0.1:5610",
    }
    assert [a.events_endpoint for a in cfg.actors] == [
        f"tcp://127.0.0.1:{port}" for port in (5601, 5603, 5605, 5607, 5609, 5611)
    ]
    assert [(a.bind, a.events_bind) for a in cfg.actors] == [
        (a.endpoint, a.events_endpoint) for a in cfg.actors
    ]
    assert cfg.cluster.host == "127.0.0.1"
    assert cfg.router_endpoint == "tcp://127.0.0.1:5602"
    assert cfg.frontend_url == "http://127.0.0.1:8000"
    assert cfg.model.path == ""
    assert cfg.model.served_name == "tiny-llama"
    assert cfg.model.resolved_path.parts[-2:] == ("kvmesh", "tiny-llama")
    assert cfg.security.key_path is None
    assert cfg == ClusterConfig()


def test_root_cluster_toml_is_the_default_printed():
    text = (ROOT / "cluster.toml").read_text()
    assert text == config_to_toml(load_config()), (
        "cluster.toml is stale: python -m kvmesh.config > cluster.toml"
    )
    assert load_config(ROOT / "cluster.toml") == load_config()


def test_every_key_has_a_comment():
    def undocumented(info, path):
        for f in info.fields:
            if "description" not in getattr(f.type, "extra_json_schema", {}):
                yield ".".join([*path, f.name])
            inner = getattr(f.type, "type", f.type)
            inner = getattr(inner, "item_type", inner)
            if isinstance(inner, mi.StructType):
                yield from undocumented(inner, [*path, f.name])

    assert list(undocumented(mi.type_info(ClusterConfig), [])) == []


@pytest.mark.parametrize("comments", [True, False])
def test_config_to_toml_reads_back_equal(tmp_path, comments):
    cfg = load_config(
        two_nodes(tmp_path),
        ['model.name="a \\"quoted\\" name"', "router.temperature=0.5", "logging.json=true"],
    )
    path = write_config(tmp_path, config_to_toml(cfg, comments=comments))
    assert load_config(path) == cfg


def test_a_file_sets_only_the_keys_it_names(tmp_path):
    cfg = load_config(write_config(tmp_path, '[router]\npolicy = "random"\n'))
    assert cfg.router.policy == "random"
    assert cfg.router.host_weight == 0.75
    assert cfg.nodes == ClusterConfig().nodes


# -- overrides -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("router.policy=round_robin", ["router", "policy"], "round_robin"),
        ("kv.device_blocks=512", ["kv", "device_blocks"], 512),
        ("router.temperature = 0.5", ["router", "temperature"], 0.5),
        ("logging.json=true", ["logging", "json"], True),
        ('model.name="7"', ["model", "name"], "7"),
        ("model.name='x=y'", ["model", "name"], "x=y"),
        ("model.path=/data/my model", ["model", "path"], "/data/my model"),
        ("model.path=a=b", ["model", "path"], "a=b"),
        ("cluster.ipc_dir=", ["cluster", "ipc_dir"], ""),
        ("model.name=2024-01-01", ["model", "name"], "2024-01-01"),
        ("model.name=[1, 2]", ["model", "name"], "[1, 2]"),
        ("nodes.0.actors.1.count=3", ["nodes", "0", "actors", "1", "count"], 3),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)
    assert type(parse_override(text)[1]) is type(value)


@pytest.mark.parametrize(
    "override, read, value",
    [
        ("router.policy=round_robin", lambda c: c.router.policy, "round_robin"),
        ("kv.device_blocks=512", lambda c: c.kv.device_blocks, 512),
        ("router.load_weight=2", lambda c: c.router.load_weight, 2.0),
        ("logging.json=true", lambda c: c.logging.json, True),
        ("model.path=/models/llama", lambda c: c.model.served_name, "llama"),
        ("nodes.0.actors.3.count=3", lambda c: list(c.address_book)[-2], "decode-2"),
        (
            "nodes.0.actors.2.count=0",
            lambda c: list(c.address_book),
            ["frontend-0", "router-0", "decode-0", "decode-1", "cache-0"],
        ),
        ("cluster.ipc_dir=/tmp/kvm", lambda c: c.router_endpoint, "ipc:///tmp/kvm/router-0"),
    ],
)
def test_override_sets_one_key(override, read, value):
    assert read(load_config(overrides=[override])) == value


def test_overrides_apply_over_the_file_in_order(tmp_path):
    path = write_config(tmp_path, '[router]\npolicy = "random"\n' + BASIC)
    cfg = load_config(path, ["router.policy=least_loaded", "router.policy=kv"])
    assert cfg.router.policy == "kv"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "router.polcy=kv",
            "override router.polcy: unknown key (did you mean router.policy?); "
            f"allowed: {ROUTER_KEYS}",
        ),
        (
            "nodes.0.actors.1.rol=decode",
            "override nodes.0.actors.1.rol: unknown key (did you mean nodes.0.actors.1.role?); "
            "allowed: role, count, device, max_num_seqs, max_num_batched_tokens, model, pool",
        ),
        (
            "router.policy=fastest",
            f'override router.policy: expected one of {POLICIES}, got "fastest"',
        ),
        ("kv.device_blocks=-1", "override kv.device_blocks: expected an integer >= 0, got -1"),
        ("model.block_size=16.5", "override model.block_size: expected an integer >= 1, got 16.5"),
        ("model.name=7", "override model.name: expected a string, got 7"),
        ("router=kv", 'override router: expected a table, got "kv"'),
        ("nodes.3.name=x", "override nodes.3: no such entry; nodes has 1 entry (indices from 0)"),
        (
            "nodes.first.name=x",
            "override nodes.first: no such entry; nodes has 1 entry (indices from 0)",
        ),
        ("router.policy.x=1", "override router.policy.x: router.policy is a value, not a table"),
        (
            "routerpolicy",
            "override 'routerpolicy': expected KEY=VALUE, e.g. router.policy=round_robin",
        ),
        (
            "router..policy=kv",
            "override 'router..policy=kv': expected KEY=VALUE, e.g. router.policy=round_robin",
        ),
        (
            "frontend.http_port=5600",
            "frontend.http_port: 5600 on 127.0.0.1 is also the port of frontend-0 (actors have "
            "ports from cluster.base_port = 5600); expected another port",
        ),
        (
            "nodes.0.actors.1.count=2",
            "nodes.0.actors.1: 2 routers; expected exactly one in the cluster",
        ),
    ],
)
def test_bad_override(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value) == message


# -- broken files --------------------------------------------------------------------


BROKEN = [  # (file text, message after "<path>: ")
    ("[router\npolicy = 1\n", "1:8: invalid TOML: Expected ']' at the end of a table declaration"),
    ('[model]\nname = "x\n', "2:10: invalid TOML: Illegal character '\\n'"),
    ("[model]\nname =", "2: invalid TOML: Invalid value (at end of document)"),
    (
        '[router]\npolcy = "kv"\n',
        f" router.polcy: unknown key (did you mean router.policy?); allowed: {ROUTER_KEYS}",
    ),
    (
        "[routr]\n",
        " routr: unknown key (did you mean router?); allowed: cluster, model, models, pools, kv, "
        "router, frontend, planner, security, logging, nodes",
    ),
    ('[model]\nblock_size = "16"\n', ' model.block_size: expected an integer >= 1, got "16"'),
    ("[logging]\njson = 1\n", " logging.json: expected true or false, got 1"),
    (
        '[router]\npolicy = "fastest"\n',
        f' router.policy: expected one of {POLICIES}, got "fastest"',
    ),
    (
        "[cluster]\nbase_port = -1\n",
        " cluster.base_port: expected an integer from 1 to 65535, got -1",
    ),
    (
        "[cluster]\nheartbeat_interval = 0\n",
        " cluster.heartbeat_interval: expected a number > 0, got 0",
    ),
    (
        "[cluster]\nbase_port = 65533\n",
        " cluster.base_port: 65533 gives the 6 actors ports up to 65544; expected an integer "
        "from 1 to 65524",
    ),
    ('[cluster]\nname = ""\n', ' cluster.name: expected a non-empty string, got ""'),
    ("[nodes]\n", " nodes: expected an array of tables, got a table"),
    ("nodes = []\n", " nodes: expected at least one [[nodes]] table, got none"),
    ('[[nodes]]\naddress = "127.0.0.1"\n', " nodes.0.name: missing; expected a string"),
    (
        BASIC + BASIC.replace("prefill", "cache"),
        ' nodes.1.name: duplicate node name "local" (also nodes.0.name); expected a name '
        "unique in the cluster",
    ),
    (
        node_toml("my node", decode=1),
        " nodes.0.name: expected a name of letters, digits, '.', '_' and '-', got \"my node\"",
    ),
    (
        '[[nodes]]\nname = "a"\naddress = "127.0.0.1"\n',
        " nodes.0.actors: expected at least one [[nodes.actors]] table, got none",
    ),
    (
        node_toml(frontend=1, router=1, prefill=1),
        ' nodes: no decode actor; expected at least one [[nodes.actors]] with role = "decode" '
        "and count >= 1",
    ),
    (
        node_toml(frontend=1, router=1, decode=0),
        ' nodes: no decode actor; expected at least one [[nodes.actors]] with role = "decode" '
        "and count >= 1",
    ),
    (
        node_toml(router=1, decode=1),
        " nodes: no frontend actor; expected at least one [[nodes.actors]] with role = "
        '"frontend" and count >= 1',
    ),
    (
        BASIC + node_toml("b", router=1),
        " nodes.1.actors.0: 2 routers; expected exactly one in the cluster",
    ),
    (
        BASIC + '[[nodes.actors]]\nrole = "decoder"\n',
        ' nodes.0.actors.4.role: expected one of "cache", "decode", "frontend", "planner", '
        '"prefill", "router", got "decoder"',
    ),
    (
        BASIC + '[[nodes.actors]]\nrole = "planner"\ncount = 2\n',
        " nodes.0.actors.4: 2 planners; expected at most one in the cluster",
    ),
    (
        BASIC + "[planner]\nlow = 1.0\nhigh = 1.0\n",
        " planner.low: expected < planner.high (1.0), got 1.0",
    ),
    (
        BASIC + "[planner]\nmin_decode = 3\nmax_decode = 2\n",
        " planner.min_decode: expected <= planner.max_decode (2), got 3",
    ),
    (
        BASIC + '[[nodes.actors]]\nrole = "decode"\ncount = true\n',
        " nodes.0.actors.4.count: expected an integer >= 0, got true",
    ),
    (
        node_toml(device="gpu0", frontend=1, router=1, decode=1),
        ' nodes.0.actors.2.device: expected "cpu", "cuda" or "cuda:N", got "gpu0"',
    ),
    (
        BASIC + '[[nodes.actors]]\nrole = "cache"\ndevice = "cuda:0"\n',
        ' nodes.0.actors.4.device: a cache runs no model; expected "cpu", got "cuda:0"',
    ),
    (
        BASIC + '[[nodes.actors]]\nrole = "cache"\ncount = 2\n',
        ' nodes.0.actors: 2 cache actors on node "local"; expected at most one per node',
    ),
    (
        "[frontend]\nhttp_port = 5605\n" + BASIC,
        " frontend.http_port: 5605 on 127.0.0.1 is also the port of prefill-0 (actors have "
        "ports from cluster.base_port = 5600); expected another port",
    ),
    (
        BASIC + node_toml("b", frontend=1),
        " nodes.1.actors.0: frontend-1 would serve HTTP on 127.0.0.1:8000 like frontend-0; "
        "expected one frontend per node address",
    ),
    (
        BASIC + node_toml("b", "10.0.0.2", decode=1),
        ' cluster.host: "127.0.0.1" accepts connections from this host only, but '
        'nodes.1.address is "10.0.0.2"; expected an address other hosts reach, such as '
        '"0.0.0.0"',
    ),
    (
        '[cluster]\nhost = "0.0.0.0"\nipc_dir = "/tmp/k"\n'
        + BASIC
        + node_toml("b", "10.0.0.2", decode=1),
        " cluster.ipc_dir: ipc:// reaches one host only, but the nodes have addresses "
        '10.0.0.2, 127.0.0.1; expected "" (tcp://) or every node on one address',
    ),
    (
        f'[cluster]\nipc_dir = "/{"d" * 99}"\n',
        f' cluster.ipc_dir: "/{"d" * 99}" makes socket paths of 118 bytes; expected a '
        "directory whose paths fit in 107",
    ),
    (
        "[kv]\nhost_gb = 1\ndisk_gb = 10\n",
        ' kv.disk_path: expected a directory when kv.disk_gb > 0 (it is 10.0), got ""',
    ),
    (
        '[cluster]\nhost = "0.0.0.0"\n',
        ' security.key_dir: cluster.host = "0.0.0.0" opens the actor sockets to other hosts, '
        "and without keys anyone reaching them could join as any actor; expected a key "
        "directory: make one with `kvmesh keys generate DIR --config cluster.toml` and set "
        "security.key_dir = DIR (or, on a network only you can reach, security.insecure = "
        "true)",
    ),
    (
        '[cluster]\nhost = "0.0.0.0"\n' + BASIC + node_toml("b", "10.0.0.2", decode=1),
        ' security.key_dir: cluster.host = "0.0.0.0" opens the actor sockets to other hosts, '
        "and without keys anyone reaching them could join as any actor; expected a key "
        "directory: make one with `kvmesh keys generate DIR --config cluster.toml` and set "
        "security.key_dir = DIR (or, on a network only you can reach, security.insecure = "
        "true)",
    ),
    (
        "[kv]\nhost_gb = 0\n",
        " kv.host_gb: expected > 0 where a cache actor runs (nodes.0.actors.4: its host tier is "
        "where workers offload to, and disk blocks are read back through it), got 0.0",
    ),
]


@pytest.mark.parametrize("text, message", BROKEN)
def test_broken_file_names_the_key(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:{message}"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory"


# -- the address book ----------------------------------------------------------------


def test_actors_on_expands_counts_with_stable_ids_and_distinct_endpoints(tmp_path):
    cfg = load_config(two_nodes(tmp_path))
    assert cfg.actors_on("a") == [
        spec("frontend-0", "a", "cpu", "10.0.0.1", 7000),
        spec("router-0", "a", "cpu", "10.0.0.1", 7002),
        spec("decode-0", "a", "cuda:0", "10.0.0.1", 7004),
        spec("decode-1", "a", "cuda:1", "10.0.0.1", 7006),
    ]
    assert cfg.actors_on("b") == [
        spec("prefill-0", "b", "cuda:1", "10.0.0.2", 7008),
        spec("decode-2", "b", "cuda:0", "10.0.0.2", 7010),
        spec("decode-3", "b", "cuda:2", "10.0.0.2", 7012),
    ]
    assert list(cfg.actors) == cfg.actors_on("a") + cfg.actors_on("b")
    assert cfg.router_endpoint == "tcp://10.0.0.1:7002"
    assert cfg.frontend_url == "http://10.0.0.1:8000"


def test_ipc_endpoints_are_paths_named_by_actor():
    cfg = load_config(overrides=["cluster.ipc_dir=/run/kvm/"])
    decode = cfg.actors[-2]
    assert (decode.endpoint, decode.events_endpoint) == (
        "ipc:///run/kvm/decode-1",
        "ipc:///run/kvm/decode-1.events",
    )
    assert [(a.bind, a.events_bind) for a in cfg.actors] == [
        (a.endpoint, a.events_endpoint) for a in cfg.actors
    ]


def test_ipv6_addresses_are_bracketed():
    cfg = load_config(overrides=["cluster.host=::1", "nodes.0.address=::1"])
    assert cfg.router_endpoint == "tcp://[::1]:5602"
    assert cfg.frontend_url == "http://[::1]:8000"


def test_actors_on_an_unknown_node():
    with pytest.raises(ConfigError) as info:
        load_config().actors_on("locl")
    assert str(info.value) == 'node "locl": no such node (did you mean "local"?); nodes: local'


BOOK_SCRIPT = """
import json, sys, msgspec
from kvmesh.config import load_config
cfg = load_config(sys.argv[1], ["nodes.1.actors.1.count=3"])
print(json.dumps([msgspec.to_builtins(cfg.actors), "torch" in sys.modules]))
"""


def test_every_process_computes_the_same_address_book(tmp_path):
    path = two_nodes(tmp_path)
    books = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", BOOK_SCRIPT, str(path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        books.append(json.loads(out))
    here = msgspec.to_builtins(list(load_config(path, ["nodes.1.actors.1.count=3"]).actors))
    assert books[0] == books[1] == [here, False]  # and kvmesh.config never imports torch
    endpoints = {a[key] for a in here for key in ("endpoint", "events_endpoint")}
    assert len(endpoints) == 2 * len(here) == 16


def test_the_address_book_is_made_once_per_config():
    cfg = load_config(None, ["nodes.0.actors.3.count=1000"])
    other = load_config(None, ["nodes.0.actors.3.count=2"])

    assert cfg.actors is cfg.actors
    assert [len(cfg.actors), len(other.actors)] == [1004, 6]
