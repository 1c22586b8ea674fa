"""MockEngine: exact token streams, KV events, evictions and step times."""

import pytest

from kvmesh.engine.engine import Engine
from kvmesh.engine.mock import MockEngine, MockTiming, mock_reply, mock_token, plain_token_ids
from kvmesh.kv.block_hash import hash_blocks, wire_hashes
from kvmesh.params import SamplingParams
from kvmesh.protocol import BlockRemoved, BlockStored
from kvmesh.tokenizer import Tokenizer

TIMING = MockTiming(prefill_s_per_token=0.001, decode_s_per_step=0.01, decode_s_per_seq=0.002)
KEY = b"k" * 32


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


def make_engine(config, tokenizer, sleeps=None, **kwargs) -> MockEngine:
    settings = {"block_size": 16, "num_blocks": 64, "hash_key": KEY, "timing": TIMING}
    settings.update(kwargs)
    sleep = sleeps.append if sleeps is not None else lambda seconds: None
    return MockEngine(config, tokenizer, sleep=sleep, **settings)


def prompt_of(n: int, start: int = 100) -> list[int]:
    return [start + i for i in range(n)]


@pytest.fixture(scope="module")
def plain(tokenizer, config) -> list[int]:
    return plain_token_ids(tokenizer, config.vocab_size, 0, (1, 5))


def test_plain_tokens_are_past_the_special_ones_and_whole_characters(tokenizer, plain):
    # tiny model: bos 0, eos 1 and 5; ids 100-257 are single bytes of multibyte characters
    assert plain[:3] == [6, 7, 8]
    assert 100 not in plain and 99 in plain
    assert all("\ufffd" not in tokenizer.decode([t]) for t in plain)


def test_mock_token_is_a_plain_token_from_the_one_before_and_its_position(plain):
    assert mock_token(100, 40, plain) == plain[(100 * 7919 + 40 * 104729) % len(plain)]
    t1 = mock_token(101, 2, plain)
    t2 = mock_token(t1, 3, plain)
    assert mock_reply([100, 101], 3, plain) == [t1, t2, mock_token(t2, 4, plain)]


def test_reply_is_mock_reply_of_the_prompt(config, tokenizer, plain):
    engine = make_engine(config, tokenizer)
    prompt = prompt_of(40)
    [out] = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    expected = mock_reply(prompt, 12, plain)
    assert out.token_ids == expected
    assert out.finish_reason == "length"
    assert out.text == tokenizer.decode(expected)


def test_streams_are_equal_on_every_engine_and_batch(config, tokenizer, plain):
    prompts = [prompt_of(20), prompt_of(37, 500), prompt_of(5, 900)]
    params = SamplingParams(max_tokens=9)
    together = make_engine(config, tokenizer).generate(prompts, params)
    alone = [make_engine(config, tokenizer).generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.token_ids for o in together] == [mock_reply(p, 9, plain) for p in prompts]


def test_stop_token_ids_and_logprobs(config, tokenizer, plain):
    engine = make_engine(config, tokenizer)
    prompt = prompt_of(10)
    reply = mock_reply(prompt, 8, plain)
    params = SamplingParams(max_tokens=8, stop_token_ids=[reply[3]], logprobs=0)
    [out] = engine.generate([prompt], params)
    assert out.token_ids == reply[:4]
    assert out.finish_reason == "stop"
    assert out.logprobs == [{t: 0.0} for t in reply[:4]]


def test_kv_events_name_the_prompt_blocks_with_the_real_engines_salt(config, tokenizer):
    engine = make_engine(config, tokenizer)
    prompt = prompt_of(40)
    engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    real_salt = config.kv_salt("float32", 16, KEY)
    assert engine.salt == real_salt
    assert engine.take_kv_events() == [
        BlockStored(block_hashes=wire_hashes(hash_blocks(prompt[:32], 16, salt=real_salt)))
    ]
    assert engine.prefix_hashes(prompt, SamplingParams()) == hash_blocks(
        prompt[:32], 16, salt=real_salt
    )


def test_a_full_pool_evicts_and_says_so(config, tokenizer):
    # 48 prompt tokens + 1 output need 4 blocks; the 3 full ones are cached. The second
    # prompt needs the whole pool: the free block, then the first's two newest blocks.
    engine = make_engine(config, tokenizer, num_blocks=4)
    first, second = prompt_of(48), prompt_of(48, 700)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate([first], params)
    held = wire_hashes(hash_blocks(first, 16, salt=engine.salt))
    assert engine.take_kv_events() == [BlockStored(block_hashes=held)]
    engine.generate([second], params)
    assert engine.take_kv_events() == [
        BlockRemoved(block_hashes=[held[2]]),
        BlockRemoved(block_hashes=[held[1]]),
        BlockStored(block_hashes=wire_hashes(hash_blocks(second, 16, salt=engine.salt))),
    ]


def test_a_cached_prefix_is_reused_and_costs_no_prefill_time(config, tokenizer):
    sleeps: list[float] = []
    engine = make_engine(config, tokenizer, sleeps=sleeps)
    prompt = prompt_of(40)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.generate([prompt], params)
    cold = list(sleeps)
    sleeps.clear()
    [out] = engine.generate([prompt + [7, 8, 9]], params)
    assert out.num_cached_tokens == 32
    # cold: 40 prompt tokens, then two decode steps of one sequence
    assert cold == pytest.approx([0.040, 0.012, 0.012])
    assert sleeps == pytest.approx([0.011, 0.012, 0.012])  # 11 uncached tokens
    assert engine.runner.busy_s == pytest.approx(0.064 + 0.035)


def test_step_time_counts_prefill_tokens_and_decodes_of_one_batch():
    assert TIMING.step_seconds(100, 0) == pytest.approx(0.1)
    assert TIMING.step_seconds(0, 4) == pytest.approx(0.018)
    assert TIMING.step_seconds(10, 2) == pytest.approx(0.024)
    scaled = MockTiming(prefill_s_per_token=0.001, scale=10)
    assert scaled.step_seconds(10, 0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("field", "value"), [("prefill_s_per_token", -1), ("scale", "2"), ("decode_s_per_seq", True)]
)
def test_timing_refuses_what_is_not_a_nonnegative_number(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a number >= 0, got {value!r}"):
        MockTiming(**{field: value})


def test_mock_engine_refuses_a_pool_size_it_cannot_guess(config, tokenizer):
    with pytest.raises(ValueError, match="num_blocks must be given"):
        MockEngine(config, tokenizer, block_size=16)


def test_salt_matches_a_real_engine(tiny_model_dir, config, tokenizer):
    real = Engine.from_pretrained(tiny_model_dir, num_blocks=8, hash_key=KEY)
    mock = make_engine(config, tokenizer)
    assert mock.salt_id == real.salt_id
    assert mock.kv_caches[0].shape == (2, 64, 16, 1, 1)
