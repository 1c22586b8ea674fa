"""A real S3-compatible server for the object tier's tests: moto in server mode, its own
process on a free loopback port, reached over HTTP like any object store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CREDENTIALS = {  # moto accepts any unless started with auth (MotoServer(auth=True))
    "AWS_ACCESS_KEY_ID": "kvmesh-test",
    "AWS_SECRET_ACCESS_KEY": "kvmesh-test-secret",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on 127.0.0.1:port; `auth`: IAM checks on, so no
    credentials are valid (every request is denied)."""

    def __init__(self, port: int | None = None, auth: bool = False) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"moto server on port {self.port} did not start") from None
                time.sleep(0.05)

    def create_bucket(self, name: str) -> str:
        """Make a bucket (a plain path-style PUT); its s3:// URL."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.status
        return f"s3://{name}"

    def kill(self) -> None:
        """SIGKILL, as a crashed object store."""
        self.process.kill()
        self.process.wait()


@pytest.fixture
def aws_env(monkeypatch):
    """The standard AWS environment the client reads, pointing at no real account."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return CREDENTIALS
