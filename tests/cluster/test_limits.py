"""A real cluster with model.max_model_len=64 and an API key file: the cap holds at the
frontend (400s naming the numbers), every API call needs a key (the official openai
client passes it), /health stays open, and `kvmesh up` refuses a key file it cannot use."""

import subprocess
import sys

import httpx
import openai
import pytest

from kvmesh.bench.cluster import start_cluster

pytestmark = pytest.mark.cluster

KEY = "sk-cluster-test"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# test keys\n{KEY}\n")
    c = start_cluster(
        tmp_path_factory.mktemp("limits"),
        tiny_model_dir,
        "model.max_model_len=64",
        f"frontend.api_key_file={keys}",
        "nodes.0.actors.2.count=0",
    )
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0)


def test_max_model_len_is_enforced(client):
    model = client.models.list().data[0]
    assert model.max_model_len == 64
    with pytest.raises(
        openai.BadRequestError, match="prompt has 100 tokens; the model's context is 64"
    ):
        client.completions.create(model=model.id, prompt=list(range(16, 116)), max_tokens=4)
    with pytest.raises(
        openai.BadRequestError,
        match="max_tokens is 30, but the prompt has "
        "40 tokens and the model's context is 64: at most 24",
    ):
        client.completions.create(model=model.id, prompt=list(range(16, 56)), max_tokens=30)
    done = client.completions.create(
        model=model.id,
        prompt=list(range(16, 56)),
        max_tokens=24,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert done.usage.completion_tokens == 24


def test_every_api_call_needs_the_key(cluster, client):
    assert httpx.get(f"{cluster.url}/health").status_code == 200
    assert httpx.get(f"{cluster.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert client.models.list().data


def test_up_refuses_a_key_file_that_cannot_serve(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# none yet\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvmesh", "up", "--set", f"frontend.api_key_file={empty}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "holds no key" in proc.stderr
