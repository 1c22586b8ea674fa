"""The same engine code on CUDA: greedy output equals transformers on CPU (gpu marker)."""

import pytest
import torch

from kvmesh import Engine, SamplingParams
from tests.prompts import random_prompts
from tests.reference import hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_engine_equals_transformers_on_cpu(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompts = random_prompts([(8, 700)] * 6, seed=3)
    engine = Engine.from_pretrained(
        tiny_model_dir, device="cuda", num_blocks=512, max_num_batched_tokens=256
    )
    assert engine.kv_caches[0].is_cuda
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 16)


def test_cuda_bfloat16_engine_runs_with_prefix_cache(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, device="cuda", dtype="bfloat16", num_blocks=256)
    prompt = random_prompts([(8, 700)], seed=4)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = engine.generate([prompt], params)[0]
    second = engine.generate([prompt], params)[0]
    assert second.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert len(second.token_ids) == 8 and first.token_ids[0] == second.token_ids[0]
