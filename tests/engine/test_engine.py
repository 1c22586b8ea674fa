"""Engine against the reference: transformers' greedy output on the same checkpoint."""

import json
import shutil

import pytest
import torch

from kvmesh import Engine, SamplingParams
from tests.prompts import random_prompts
from tests.reference import hf_greedy


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir, num_blocks=512, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def reference(hf_model, engine):
    """Prompts of mixed lengths (several longer than one 256-token prefill chunk) and
    transformers' greedy continuations of them."""
    lengths = [1, 7, 16, 17, 63, 200, 257, 600]
    prompts = random_prompts(lengths, seed=1234, vocab_size=engine.config.vocab_size)
    return prompts, [hf_greedy(hf_model, p, 24) for p in prompts]


@pytest.mark.parametrize("cpu_decode_kernel", [True, False], ids=["numba-decode", "torch-decode"])
def test_greedy_batch_equals_transformers(tiny_model_dir, reference, cpu_decode_kernel):
    prompts, expected = reference
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=512, max_num_batched_tokens=256)
    assert engine.runner.cpu_decode_kernel  # float32 on CPU picks the Numba kernel
    engine.runner.cpu_decode_kernel = cpu_decode_kernel
    outs = engine.generate(prompts, greedy(24))
    assert [o.token_ids for o in outs] == expected
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert len({t for ids in expected for t in ids}) > 40  # the reference is not degenerate


def test_text_prompt_equals_transformers(engine, hf_model):
    prompt = "The quick brown fox jumps over the lazy dog near 42 rivers."
    ids = engine.tokenizer.encode(prompt)
    out = engine.generate([prompt], greedy(16))[0]
    assert out.prompt_token_ids == ids
    assert out.token_ids == hf_greedy(hf_model, ids, 16)
    assert out.text == engine.tokenizer.decode(out.token_ids)


def test_prefix_cache_hit_reports_cached_tokens_and_keeps_output(tiny_model_dir, reference):
    prompts, expected = reference
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=512)
    first = engine.generate([prompts[6]], greedy(24))[0]  # 257 tokens: 16 full blocks
    second = engine.generate([prompts[6]], greedy(24))[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 256
    assert first.token_ids == second.token_ids == expected[6]
    # a prompt sharing only its first 100 tokens hits the 6 full blocks inside them
    branch = prompts[6][:100] + prompts[7][:50]
    out = engine.generate([branch], greedy(4))[0]
    assert out.num_cached_tokens == 96


def test_whole_prompt_cached_still_computes_last_block(tiny_model_dir, reference):
    prompts, _ = reference
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    prompt = prompts[4][:48]  # exactly 3 blocks
    first = engine.generate([prompt], greedy(8))[0]
    second = engine.generate([prompt], greedy(8))[0]
    assert second.num_cached_tokens == 32
    assert second.token_ids == first.token_ids


def test_small_pool_preempts_without_changing_output(tiny_model_dir, reference):
    prompts, expected = reference
    # 80 blocks of 16 = 1280 token slots; the batch needs ~1350 at its peak.
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=80, max_num_batched_tokens=128)
    outs = engine.generate(prompts, greedy(24))
    assert engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected


def test_pool_just_large_enough_for_one_request_serves_it(tiny_model_dir, reference):
    prompts, expected = reference
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=39)  # 624 slots: 600 + 24 fits
    outs = engine.generate([prompts[7], prompts[5]], greedy(24))
    assert [o.token_ids for o in outs] == [expected[7], expected[5]]


def test_streaming_steps_add_up_to_the_final_output(tiny_model_dir, reference):
    prompts, expected = reference
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=256)
    ids = [engine.add_request(p, greedy(24)) for p in prompts[:3]]
    streamed = {i: [] for i in ids}
    texts = {i: "" for i in ids}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
            texts[out.request_id] += out.new_text
            if out.finished:
                finals[out.request_id] = out
    assert [streamed[i] for i in ids] == expected[:3]
    assert [texts[i] for i in ids] == [finals[i].text for i in ids]


def test_abort_frees_every_block(tiny_model_dir, reference):
    prompts, _ = reference
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=128, enable_prefix_caching=False)
    request_id = engine.add_request(prompts[7], greedy(50))
    engine.step()
    assert engine.pool.num_free_blocks < 128
    engine.abort_request(request_id)
    assert engine.pool.num_free_blocks == 128
    assert not engine.has_unfinished()


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, reference, seed):
    prompts, _ = reference
    params = SamplingParams(
        max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True
    )
    alone = engine.generate([prompts[3]], params)[0].token_ids
    crowd = engine.generate(
        [prompts[1], prompts[3], prompts[5]],
        [SamplingParams(max_tokens=5, temperature=1.0), params, params],
    )
    assert crowd[1].token_ids == alone
    other = SamplingParams(
        max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed + 1, ignore_eos=True
    )
    assert engine.generate([prompts[3]], other)[0].token_ids != alone


def test_top_k_1_is_greedy(engine, reference):
    prompts, expected = reference
    out = engine.generate(
        [prompts[2]], SamplingParams(max_tokens=24, temperature=0.8, top_k=1, ignore_eos=True)
    )[0]
    assert out.token_ids == expected[2]


def test_logprobs_match_transformers(engine, hf_model, reference):
    prompts, expected = reference
    out = engine.generate([prompts[3]], greedy(6, logprobs=3))[0]
    assert len(out.logprobs) == 6
    with torch.inference_mode():
        full = torch.tensor([prompts[3] + expected[3][:6]])
        ref = hf_model(full).logits[0, len(prompts[3]) - 1 : -1].log_softmax(-1)
    for step, entry in enumerate(out.logprobs):
        top = ref[step].topk(3)
        assert list(entry)[:1] == [expected[3][step]]
        assert set(entry) == set(top.indices.tolist()) | {expected[3][step]}
        for token, logprob in entry.items():
            assert logprob == pytest.approx(ref[step, token].item(), abs=1e-4)


def test_stop_conditions(engine, reference):
    prompts, expected = reference
    ref = expected[5]
    out = engine.generate([prompts[5]], greedy(24, stop_token_ids=[ref[4]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(ref[4]) + 1]
    eos = next(iter(engine.eos_token_ids))
    params = SamplingParams(max_tokens=24, temperature=0.0)
    assert engine.generate([prompts[5]], params)[0].token_ids == (
        ref[: ref.index(eos) + 1] if eos in ref else ref
    )
    full_text = engine.generate([prompts[5]], greedy(24))[0].text
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    out = engine.generate([prompts[5]], greedy(24, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full_text[: full_text.find(stop)]


def test_max_tokens_is_respected(engine, reference):
    prompts, expected = reference
    out = engine.generate([prompts[0]], greedy(5))[0]
    assert out.token_ids == expected[0][:5] and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", None, "prompt must not be empty"),
        ([], None, "prompt must not be empty"),
        ([1, 99999], None, "token id 99999 is outside the vocabulary"),
        ([1, -3], None, "token id -3 is outside the vocabulary"),
        ([1, "x"], None, "prompt token ids must be integers"),
        (3.5, None, "prompt must be a string or a list"),
        ([1] * 5000, None, "the model's context is 4096"),
    ],
)
def test_bad_prompt_is_refused_naming_the_field(engine, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": "3"}, "max_tokens must be an integer"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 1.5}, "top_p must be <= 1"),
        ({"top_k": -2}, "top_k must be >= -1"),
        ({"top_k": 2**63}, "top_k must be <= 2147483647"),
        ({"logprobs": 50}, "logprobs must be <= 20"),
        ({"stop": "x"}, "stop must be a list"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_sampling_params_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_prompt_larger_than_the_pool_is_refused(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=4)
    with pytest.raises(ValueError, match="num_blocks=4"):
        engine.add_request(list(range(16, 96)))


def test_batch_with_one_bad_prompt_queues_nothing(engine):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.generate([[20, 21], []], greedy(2))
    assert not engine.has_unfinished()


def test_unknown_architecture_is_refused(tiny_model_dir, tmp_path):
    broken = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="architectures: 'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"
    ):
        Engine.from_pretrained(broken)


def test_kv_events_report_stored_blocks(tiny_model_dir, reference):
    prompts, _ = reference
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    engine.generate([prompts[4]], greedy(1))  # 63 prompt tokens + 1 computed: 3 full blocks
    events = engine.take_kv_events()
    stored = [h for e in events if type(e).__name__ == "BlockStored" for h in e.block_hashes]
    from kvmesh.kv.block_hash import hash_blocks, wire_hashes

    salt = engine.salt
    assert stored == wire_hashes(hash_blocks(prompts[4], 16, salt=salt))[:3]  # on the wire
    assert engine.take_kv_events() == []


def test_max_model_len_caps_prompt_and_output(tiny_model_dir):
    """model.max_model_len: a worker's engine enforces the cap itself (the frontend does
    too), so a cluster configured for 64 tokens never runs a 100-token prompt."""
    from kvmesh.gpu.model_config import capped_context

    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64, max_model_len=64)
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match="prompt has 100 tokens; the model's context is 64"):
        engine.add_request(list(range(16, 116)), SamplingParams(max_tokens=4))
    (out,) = engine.generate(
        [list(range(16, 56))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    )
    assert (len(out.token_ids), out.finish_reason) == (24, "length")  # 40 + 24 = 64
    model_len = engine.config.max_model_len
    assert Engine.from_pretrained(tiny_model_dir, num_blocks=8).max_model_len == model_len
    assert (
        Engine.from_pretrained(
            tiny_model_dir, num_blocks=8, max_model_len=10 * model_len
        ).max_model_len
        == model_len
    )
    assert capped_context(model_len, 0) == model_len
    assert capped_context(model_len, 64) == 64
    assert capped_context(model_len, 10 * model_len) == model_len
