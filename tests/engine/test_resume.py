"""Resuming a request on another engine (request migration): given the outputs so far
and how much of their text was streamed, the rest equals an uninterrupted run."""

import pytest

from kvmesh import Engine, SamplingParams
from tests.prompts import random_prompt


def stream(engine: Engine, request_id: str) -> tuple[list, str, object]:
    ids, text, last = [], "", None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                ids += out.new_token_ids
                text += out.new_text
                last = out
    return ids, text, last


PARAMS = [
    SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=0.9, top_k=40, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1),
]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded", "logprobs"])
@pytest.mark.parametrize("cut", [1, 17, 39])
def test_resumed_stream_continues_exactly(tiny_model_dir, params, cut):
    prompt = random_prompt(90, seed=cut)
    first = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    first.add_request(prompt, params, "r")
    ids, text = [], ""
    while len(ids) < cut:  # stream until the worker "dies" after `cut` tokens
        for out in first.step():
            ids += out.new_token_ids
            text += out.new_text
    reference = Engine.from_pretrained(tiny_model_dir, num_blocks=64).generate([prompt], params)[0]
    assert ids[:cut] == reference.token_ids[: len(ids)]
    second = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    second.add_request(prompt, params, "r", resume_from=(ids, len(text)))
    rest_ids, rest_text, final = stream(second, "r")
    assert ids + rest_ids == reference.token_ids
    assert text + rest_text == reference.text
    assert final.prompt_token_ids == prompt and final.finish_reason == "length"


def test_resume_with_a_stop_string_across_the_cut(tiny_model_dir):
    prompt = random_prompt(60, seed=5)
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = Engine.from_pretrained(tiny_model_dir, num_blocks=64).generate([prompt], greedy)[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 4]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    reference = Engine.from_pretrained(tiny_model_dir, num_blocks=64).generate([prompt], params)[0]
    cut = len(reference.token_ids) - 1  # the stop string completes after the cut
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    engine.add_request(prompt, params, "r", resume_from=(reference.token_ids[:cut], 0))
    rest_ids, rest_text, final = stream(engine, "r")
    assert reference.token_ids[:cut] + rest_ids == reference.token_ids
    assert rest_text == reference.text and final.finish_reason == "stop"


def test_resume_needs_room_for_one_more_token(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    with pytest.raises(ValueError, match="resume_from"):
        engine.add_request([20, 21], SamplingParams(max_tokens=2), "r", resume_from=([5, 6], 0))
