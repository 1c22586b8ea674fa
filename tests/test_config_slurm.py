"""`kvmesh up --slurm`'s cluster: the allocation from the environment srun gives a task
and scontrol's answers (here a table of them; tests/cluster/test_slurm.py runs the real
Slurm), laid over cluster.toml's [[nodes]] templates; every mistake a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmesh.config import ConfigError, load_config
from kvmesh.config.slurm import Allocation, cluster_for, discover, under_srun

HOSTNAMES = {"n[1-3]": "n1\nn2\nn3\n"}
NODES = (
    "NodeName=n1 Arch=x86_64 NodeAddr=10.0.0.1 NodeHostName=h1 OS=Linux 6.1 #1 SMP\n"
    "NodeName=n2 Arch=x86_64 NodeAddr=10.0.0.2 NodeHostName=h2\n"
    "NodeName=n3 Arch=x86_64 NodeAddr=127.0.0.3 NodeHostName=h3\n"
)


def scontrol(args: list[str]) -> str:
    """scontrol's answers for a job on n1, n2, n3."""
    if args[:2] == ["show", "hostnames"]:
        return HOSTNAMES[args[2]]
    assert args == ["-o", "show", "node", "n1,n2,n3"], args
    return NODES


def make_env(**changes: str | None) -> dict[str, str]:
    """A task's environment under `srun -N3 --ntasks-per-node=1`, on n2."""
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_NODEID": "1",
        "SLURM_LOCALID": "0",
        "SLURMD_NODENAME": "n2",
    }
    env.update(changes)
    return {key: value for key, value in env.items() if value is not None}


def make_allocation(count: int = 3) -> Allocation:
    names = tuple(f"n{i + 1}" for i in range(count))
    return Allocation("42", names, tuple(f"127.0.0.{i + 1}" for i in range(count)), 0)


def test_discover_reads_the_nodes_and_this_node_from_the_job():
    assert discover(make_env(), scontrol) == Allocation(
        "42", ("n1", "n2", "n3"), ("10.0.0.1", "10.0.0.2", "127.0.0.3"), 1
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"SLURM_NODEID": None},
            "--slurm: $SLURM_NODEID is not set; expected `kvmesh up --slurm` to run as a task "
            "of a Slurm job, one per node (srun --ntasks-per-node=1 kvmesh up --slurm)",
        ),
        (
            {"SLURM_NODEID": "3"},
            "--slurm: SLURM_NODEID is '3'; expected an integer from 0 to 2 (the job's nodes: "
            "n1, n2, n3)",
        ),
        (
            {"SLURM_NODEID": "one"},
            "--slurm: SLURM_NODEID is 'one'; expected an integer from 0 to 2 (the job's "
            "nodes: n1, n2, n3)",
        ),
        (
            {"SLURM_LOCALID": "1"},
            "--slurm: SLURM_LOCALID is '1': several kvmesh tasks on one node would start the "
            "same actors twice; expected one task per node (srun --ntasks-per-node=1)",
        ),
        (
            {"SLURMD_NODENAME": "n3"},
            "--slurm: SLURM_NODEID 1 is n2 in the job's node list, but this is n3 "
            "(SLURMD_NODENAME); expected the step to span the whole allocation (srun without "
            "-N/--nodelist narrowing it)",
        ),
        (
            {"SLURM_JOB_ID": None},
            "--slurm: $SLURM_JOB_ID is not set; expected `kvmesh up --slurm` to run as a task "
            "of a Slurm job, one per node (srun --ntasks-per-node=1 kvmesh up --slurm)",
        ),
    ],
    ids=[
        "no-nodeid",
        "nodeid-past-the-end",
        "nodeid-not-a-number",
        "two-tasks",
        "wrong-node",
        "no-job",
    ],
)
def test_discover_refuses_a_task_it_cannot_place(changes, message):
    with pytest.raises(ConfigError) as info:
        discover(make_env(**changes), scontrol)
    assert str(info.value) == message


def test_under_srun_needs_a_job_step():
    assert under_srun(make_env())
    assert not under_srun(make_env(SLURM_STEP_ID=None))  # the batch script itself
    assert not under_srun({})


def test_one_template_gives_the_first_node_everything_and_the_others_its_workers():
    cfg = cluster_for(load_config(), make_allocation(3))
    assert [(a.actor_id, a.node) for a in cfg.actors] == [
        ("frontend-0", "n1"),
        ("router-0", "n1"),
        ("prefill-0", "n1"),
        ("decode-0", "n1"),
        ("decode-1", "n1"),
        ("cache-0", "n1"),
        ("prefill-1", "n2"),
        ("decode-2", "n2"),
        ("decode-3", "n2"),
        ("cache-1", "n2"),
        ("prefill-2", "n3"),
        ("decode-4", "n3"),
        ("decode-5", "n3"),
        ("cache-2", "n3"),
    ]
    assert [(n.name, n.address) for n in cfg.nodes] == [
        ("n1", "127.0.0.1"),
        ("n2", "127.0.0.2"),
        ("n3", "127.0.0.3"),
    ]
    # each node listens on its own address (cluster.host is loopback)
    assert cfg.actors[7].bind == "tcp://127.0.0.2:5614"
    assert cfg.frontend_url == "http://127.0.0.1:8000"


def test_templates_give_node_i_entry_i_and_the_rest_the_last_entry(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[[nodes]]\nname = "first"\naddress = "127.0.0.1"\n'
        '[[nodes.actors]]\nrole = "frontend"\n[[nodes.actors]]\nrole = "router"\n'
        '[[nodes]]\nname = "rest"\naddress = "127.0.0.1"\n'
        '[[nodes.actors]]\nrole = "decode"\ncount = 2\n'
    )
    cfg = cluster_for(load_config(path), make_allocation(3))
    assert [(a.actor_id, a.node) for a in cfg.actors] == [
        ("frontend-0", "n1"),
        ("router-0", "n1"),
        ("decode-0", "n2"),
        ("decode-1", "n2"),
        ("decode-2", "n3"),
        ("decode-3", "n3"),
    ]


def test_a_job_too_small_for_the_templates_is_refused_naming_the_job(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[[nodes]]\nname = "first"\naddress = "127.0.0.1"\n'
        '[[nodes.actors]]\nrole = "frontend"\n[[nodes.actors]]\nrole = "router"\n'
        '[[nodes]]\nname = "rest"\naddress = "127.0.0.1"\n[[nodes.actors]]\nrole = "decode"\n'
    )
    with pytest.raises(ConfigError) as info:
        cluster_for(load_config(path), make_allocation(1))
    assert str(info.value) == (
        "slurm job 42 (1 node): nodes: no decode actor; expected at least one "
        '[[nodes.actors]] with role = "decode" and count >= 1'
    )


def test_up_under_slurm_with_a_node_id_past_cluster_toml_is_an_error(tmp_path):
    """--no-slurm: cluster.toml's own nodes, $SLURM_NODEID's; never silently the first."""
    env = make_env(SLURM_NODEID="2")
    proc = subprocess.run(
        [sys.executable, "-m", "kvmesh", "up", "--no-slurm"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env | {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "Error: SLURM_NODEID is '2', but cluster.toml has 1 [[nodes]]; expected an integer "
        "from 0 to 0, or --node NAME, or --slurm (nodes from the job)"
    )
