"""kvmesh nodes on the namespace hosts: a cluster.toml with one [[nodes]] entry per host
at its address, CurveZMQ keys for its actors, and `kvmesh up --node NAME` run on each
host (its namespace, its own /dev/shm), stdout and stderr in files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multihost.netns import NetnsHosts
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("client.py")


def write_config(
    path: Path, hosts: NetnsHosts, model_dir: Path, base: int, roles: dict, extra: str = ""
) -> Path:
    """roles: host name -> its actor roles, e.g. {"a": ["frontend", "router"], ...};
    extra: more tables (TOML) before the nodes."""
    text = (
        f'[cluster]\nhost = "0.0.0.0"\nbase_port = {base}\nheartbeat_interval = 0.5\n'
        f'[model]\npath = "{model_dir}"\n'
        f"[kv]\ndevice_blocks = 256\nhost_gb = 0.02\n"
        f"[frontend]\nhttp_port = {base + 30}\n"
        f'[security]\nkey_dir = "{path.parent / "keys"}"\n{extra}'
    )
    for name, actors in roles.items():
        text += f'[[nodes]]\nname = "{name}"\naddress = "{hosts.host(name).address}"\n'
        text += "".join(f'[[nodes.actors]]\nrole = "{role}"\n' for role in actors)
    path.write_text(text)
    keys = subprocess.run(
        [sys.executable, "-m", "kvmesh", "keys", "generate", str(path.parent / "keys")]
        + ["--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert keys.returncode == 0, keys.stderr
    return path


class Node:
    """One `kvmesh up --node NAME` on host NAME, listening on the host's address."""

    def __init__(self, hosts: NetnsHosts, tmp_path: Path, config: Path, name: str) -> None:
        self.name = name
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        self.log = tmp_path / f"{name}.log"
        command = [sys.executable, "-m", "kvmesh", "--log-file", str(self.log), "up"]
        command += ["--config", str(config), "--node", name, "--timeout", "300"]
        command += ["--set", f"cluster.host={hosts.host(name).address}"]
        self.process = subprocess.Popen(
            hosts.argv(name, command),
            stdout=self.out.open("w"),
            stderr=self.err.open("w"),
            env=os.environ | {"PYTHONPATH": pythonpath()},
        )

    def said(self, text: str) -> bool:
        return text in self.out.read_text() + self.err.read_text()

    def wait_said(self, text: str, timeout: float = 240) -> None:
        def check():
            if self.process.poll() is not None and not self.said(text):
                pytest.fail(f"node {self.name} exited {self.process.returncode}:\n{self.output()}")
            return self.said(text)

        wait_until(check, f"node {self.name} says {text!r}", timeout)

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-4000:]}"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=90)
        return self.process.returncode


def pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def ask(hosts: NetnsHosts, name: str, job: dict, timeout: float = 240) -> list[dict]:
    """Run the openai client (client.py) on host `name` with `job`; its result lines."""
    done = subprocess.run(
        hosts.argv(name, [sys.executable, str(CLIENT)]),
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"PYTHONPATH": pythonpath()},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if '"id"' in line]
