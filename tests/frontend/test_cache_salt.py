"""Prefix-cache isolation: a request's cache_salt (or, with frontend.salt_by_api_key, its
API key) enters every block hash, so requests of other salts never hit its blocks, and
cached_tokens cannot be used to learn whether someone else sent a prefix. Outputs do not
change. The Engine, and the HTTP server over a real LocalBackend."""

import httpx
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.frontend.app import create_app
from kvmesh.frontend.backend import LocalBackend
from kvmesh.frontend.limits import HTTPLimits
from tests.frontend import running_server
from tests.prompts import random_prompt

KEYS = ("sk-tenant-a", "sk-tenant-b")


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, **kwargs)


def test_engine_shares_blocks_only_within_a_salt(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=256)
    prompt = random_prompt(80, seed=5)
    (first,) = engine.generate([prompt], greedy(cache_salt="tenant-a"))
    (other,) = engine.generate([prompt], greedy(cache_salt="tenant-b"))
    (unsalted,) = engine.generate([prompt], greedy())
    (same,) = engine.generate([prompt], greedy(cache_salt="tenant-a"))
    assert (other.num_cached_tokens, unsalted.num_cached_tokens) == (0, 0)
    assert same.num_cached_tokens == 64  # the 4 full blocks before the last token's
    assert first.token_ids == other.token_ids == unsalted.token_ids == same.token_ids


@pytest.mark.parametrize("salt", ["", "x" * 257, 7])
def test_a_bad_cache_salt_is_refused_naming_it(salt):
    with pytest.raises(ValueError, match="cache_salt must be a string of 1 to 256"):
        SamplingParams(cache_salt=salt)


@pytest.fixture
def backend(tiny_model_dir):
    """One per server: the app closes its backend when the server stops."""
    return LocalBackend.from_pretrained(tiny_model_dir, num_blocks=512, model_name="tiny")


def cached(url: str, prompt: list[int], key: str | None = None, **fields) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.post(
        f"{url}/v1/completions",
        headers=headers,
        timeout=60,
        json={"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, **fields},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_the_http_cache_salt_field_isolates_requests(backend):
    with running_server(create_app(backend)) as url:
        prompt = random_prompt(80, seed=11)
        assert cached(url, prompt, cache_salt="a") == 0
        assert cached(url, prompt, cache_salt="b") == 0  # a's blocks are not b's
        assert cached(url, prompt) == 0
        assert cached(url, prompt, cache_salt="a") == 64
        refused = httpx.post(
            f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "cache_salt": ""}
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"


def test_salt_by_api_key_keeps_tenants_apart(backend):
    limits = HTTPLimits(api_keys=frozenset(KEYS), salt_by_api_key=True)
    with running_server(create_app(backend, limits)) as url:
        prompt = random_prompt(80, seed=12)
        assert cached(url, prompt, KEYS[0]) == 0
        assert cached(url, prompt, KEYS[1]) == 0  # tenant b learns nothing of a's prompt
        assert cached(url, prompt, KEYS[1], cache_salt="x") == 0
        assert cached(url, prompt, KEYS[0]) == 64
