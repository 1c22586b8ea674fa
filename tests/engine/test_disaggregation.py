"""Disaggregated prefill/decode between two Engines in one process: the decode engine
parks the prompt, the prefill engine computes it, its KV blocks are copied into the
decode engine's blocks, and decoding goes on. Output must equal a single Engine."""

import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.gpu.kv_pack import pack_blocks, unpack_blocks
from kvmesh.params import first_token_params
from tests.prompts import random_prompts


def make_engine(path, num_blocks=256) -> Engine:
    return Engine.from_pretrained(path, num_blocks=num_blocks, max_num_batched_tokens=128)


def serve_disaggregated(prefill: Engine, decode: Engine, prompts, params) -> list:
    """Run every prompt through prefill -> KV copy -> decode; return decode's final outputs."""
    ids = [decode.add_request(p, params, remote_prefill=True) for p in prompts]
    finals = {}
    while decode.has_unfinished():
        for task in decode.take_remote_prefills():
            first = None
            prefill.add_request(
                task.prompt_token_ids,
                first_token_params(task.params),
                request_id=task.request_id,
                hold_blocks=True,
            )
            while prefill.has_unfinished():
                for out in prefill.step():
                    if out.finished:
                        first = out
            src = prefill.held_block_ids(task.request_id)
            start = task.num_cached_tokens // decode.block_size
            packed = pack_blocks(prefill.kv_caches, src[start:])
            unpack_blocks(packed, decode.kv_caches, task.block_ids[start:])
            prefill.release(task.request_id)
            logprobs = first.logprobs[0] if first.logprobs else None
            out = decode.complete_remote_prefill(task.request_id, first.token_ids[0], logprobs)
            if out.finished:
                finals[out.request_id] = out
        for out in decode.step():
            if out.finished:
                finals[out.request_id] = out
    return [finals[i] for i in ids]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    ],
    ids=["greedy", "logprobs", "seeded", "one-token"],
)
def test_disaggregated_equals_single_engine(tiny_model_dir, params):
    prompts = random_prompts([(20, 300)] * 5, seed=21)
    expected = make_engine(tiny_model_dir).generate(prompts, params)
    prefill, decode = make_engine(tiny_model_dir), make_engine(tiny_model_dir)
    outs = serve_disaggregated(prefill, decode, prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert [o.text for o in outs] == [o.text for o in expected]
    if params.logprobs is not None:
        for got, want in zip(outs, expected, strict=True):
            assert [list(d) for d in got.logprobs] == [list(d) for d in want.logprobs]
    assert prefill.pool.num_free_blocks == prefill.num_blocks  # everything released
    assert decode.pool.num_free_blocks == decode.num_blocks


def test_decode_side_prefix_cache_shrinks_the_transfer(tiny_model_dir):
    prompt = random_prompts([(200, 200)], seed=8)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    decode = make_engine(tiny_model_dir)
    decode.generate([prompt[:100]], params)  # decode now caches 6 full blocks of the prefix
    decode.add_request(prompt, params, request_id="r", remote_prefill=True)
    decode.step()
    (task,) = decode.take_remote_prefills()
    assert task.num_cached_tokens == 96
    assert len(task.block_ids) == 13  # ceil(200 / 16): the whole prompt has blocks
    assert decode.pool.num_free_blocks == decode.num_blocks - 13


def test_failed_remote_prefill_falls_back_to_local_compute(tiny_model_dir):
    prompts = random_prompts([(20, 300)] * 2, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = make_engine(tiny_model_dir).generate(prompts, params)
    decode = make_engine(tiny_model_dir)
    ids = [decode.add_request(p, params, remote_prefill=True) for p in prompts]
    decode.step()
    for task in decode.take_remote_prefills():
        decode.fail_remote_prefill(task.request_id)
    finals = {}
    while decode.has_unfinished():
        finals |= {o.request_id: o for o in decode.step() if o.finished}
    assert [finals[i].token_ids for i in ids] == [o.token_ids for o in expected]


def test_abort_while_parked_frees_the_blocks(tiny_model_dir):
    decode = make_engine(tiny_model_dir, num_blocks=64)
    decode.add_request(
        random_prompts([(20, 300)], seed=2)[0],
        SamplingParams(max_tokens=4),
        request_id="r",
        remote_prefill=True,
    )
    decode.step()
    assert decode.take_remote_prefills() and decode.pool.num_free_blocks < 64
    decode.abort_request("r")
    assert decode.pool.num_free_blocks == 64 and not decode.has_unfinished()


def test_pool_full_of_parked_prompts_preempts_instead_of_cutting_short(tiny_model_dir):
    """A running sequence that needs a block while parked prompts (awaiting their remote
    prefill) hold the rest of the pool waits for room: it gets every one of its max_tokens,
    the single Engine's tokens, never a 'length' finish at 17 of 23 (issue 18)."""
    local, parked = random_prompts([(60, 60)] * 2, seed=31)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = make_engine(tiny_model_dir).generate([local, parked], params)
    decode = make_engine(tiny_model_dir, num_blocks=10)  # local needs 7 blocks, parked 4
    decode.add_request(local, params, request_id="local")
    outs = {o.request_id: o for o in decode.step()}
    decode.add_request(parked, params, request_id="parked", remote_prefill=True)
    prefill = make_engine(tiny_model_dir)
    while decode.has_unfinished():
        for out in decode.step():
            outs[out.request_id] = out
        stats = decode.scheduler.stats()
        if stats.num_remote and not stats.num_running:  # local waits for room
            (task,) = decode.take_remote_prefills()
            prefill.add_request(
                task.prompt_token_ids,
                first_token_params(task.params),
                request_id=task.request_id,
                hold_blocks=True,
            )
            first = None
            while prefill.has_unfinished():
                first = next((o for o in prefill.step() if o.finished), first)
            unpack_blocks(
                pack_blocks(prefill.kv_caches, prefill.held_block_ids("parked")),
                decode.kv_caches,
                task.block_ids,
            )
            prefill.release("parked")
            outs["parked"] = decode.complete_remote_prefill("parked", first.token_ids[0])
    assert outs["local"].finish_reason == "length"
    assert outs["local"].token_ids == expected[0].token_ids  # all 40, not cut short
    assert outs["parked"].token_ids == expected[1].token_ids
    assert decode.num_preemptions >= 1
    assert decode.pool.num_free_blocks == decode.num_blocks
