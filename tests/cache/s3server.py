"""A real S3-compatible server for the object tier's tests: moto in server mode, its own
process on a free loopback port, reached over HTTP like any object store (the bench's
MotoServer), and the AWS environment the client reads."""

from __future__ import annotations

import pytest

from kvmesh.bench.tiers_object import MotoServer

__all__ = ["CREDENTIALS", "MotoServer", "aws_env"]

CREDENTIALS = {  # moto accepts any unless started with auth (MotoServer(auth=True))
    "AWS_ACCESS_KEY_ID": "kvmesh-test",
    "AWS_SECRET_ACCESS_KEY": "kvmesh-test-secret",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture
def aws_env(monkeypatch):
    """The standard AWS environment the client reads, pointing at no real account."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return CREDENTIALS
