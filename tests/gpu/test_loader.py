"""The loader reads Llama-family HF directories: Llama, Mistral, Qwen2 (qkv bias), GQA,
sharded safetensors, float32/bfloat16/float16 checkpoints; output equals transformers."""

import json
import shutil

import pytest
import torch

from kvmesh import Engine, SamplingParams
from kvmesh.gpu.model_config import ModelConfig
from tests.prompts import random_prompts
from tests.reference import hf_greedy

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def make_checkpoint(
    tmp_path, tiny_model_dir, arch: str, dtype=torch.float32, shard: bool = False, tie: bool = False
):
    """A small random model of `arch` saved by transformers itself, with the tiny tokenizer."""
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in ARCHITECTURES[arch])
    config = config_cls(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = model_cls(config).to(dtype)
    path = tmp_path / f"{arch}-{str(dtype).split('.')[-1]}{'-sharded' if shard else ''}"
    model.save_pretrained(path, max_shard_size="200KB" if shard else "1GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, path / name)
    return path


def hf_greedy_all(path, prompts, max_tokens, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return [hf_greedy(model, prompt, max_tokens) for prompt in prompts]


@pytest.mark.parametrize(
    ("arch", "shard", "tie"),
    [
        ("llama", False, True),
        ("mistral", True, False),
        ("qwen2", False, False),
        ("qwen2", True, True),
    ],
)
def test_engine_equals_transformers(tmp_path, tiny_model_dir, arch, shard, tie):
    path = make_checkpoint(tmp_path, tiny_model_dir, arch, shard=shard, tie=tie)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    prompts = random_prompts([(5, 80)] * 4, seed=len(arch))
    engine = Engine.from_pretrained(path, num_blocks=64, block_size=8)
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    expected = hf_greedy_all(path, prompts, 12)
    assert [o.token_ids for o in outs] == expected
    assert len({t for ids in expected for t in ids}) > 8


def test_qwen2_has_qkv_bias(tmp_path, tiny_model_dir):
    path = make_checkpoint(tmp_path, tiny_model_dir, "qwen2")
    assert ModelConfig.from_pretrained(path).qkv_bias is True
    engine = Engine.from_pretrained(path, num_blocks=16)
    assert engine.runner.model.layers[0].self_attn.qkv_proj.bias is not None


@pytest.mark.parametrize("checkpoint_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_exactly_into_float32(
    tmp_path, tiny_model_dir, checkpoint_dtype
):
    path = make_checkpoint(tmp_path, tiny_model_dir, "llama", dtype=checkpoint_dtype)
    prompts = random_prompts([(5, 80)] * 3, seed=5)
    engine = Engine.from_pretrained(path, dtype="float32", num_blocks=64)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy_all(path, prompts, 8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_tracks_float32_logprobs(tmp_path, tiny_model_dir, dtype):
    path = make_checkpoint(tmp_path, tiny_model_dir, "llama")
    prompt = random_prompts([(5, 80)], seed=9)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    full = Engine.from_pretrained(path, dtype="float32", num_blocks=32).generate([prompt], params)[
        0
    ]
    half = Engine.from_pretrained(path, dtype=dtype, num_blocks=32)
    assert half.kv_caches[0].dtype == getattr(torch, dtype)
    out = half.generate([prompt], params)[0]
    assert out.token_ids[0] == full.token_ids[0]
    first_full = full.logprobs[0][full.token_ids[0]]
    assert out.logprobs[0][out.token_ids[0]] == pytest.approx(first_full, abs=0.1)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            "architectures: 'GPT2LMHeadModel' is not supported",
        ),
        ({"architectures": []}, "architectures: None is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type: 'yarn'"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, tiny_model_dir, edit, message):
    path = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text()) | edit
    config.pop("rope_parameters", None)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_pretrained(path)


def test_missing_files_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="has no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    path = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        Engine.from_pretrained(path)


def test_bad_dtype_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        Engine.from_pretrained(tiny_model_dir, dtype="float8")
