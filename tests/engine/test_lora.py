"""LoRA adapters on the Engine against the reference: PEFT applied to transformers.

Adapters are made with PEFT itself (random A and B: PEFT's default B is zeros, which
would make every adapter the base model) and saved with save_pretrained.
"""

import asyncio
import dataclasses
import json
import shutil

import pytest
import torch

from kvmesh import Engine, SamplingParams
from kvmesh.engine.lora import AdapterBusyError
from kvmesh.gpu.lora import LoraBatch, load_lora, write_random_lora
from kvmesh.kv.block_hash import adapter_salt, hash_blocks, salt_with_adapter
from tests.prompts import random_prompts
from tests.reference import hf_greedy

peft = pytest.importorskip("peft")

# name -> (LoraConfig fields, torch seed)
ADAPTERS = {
    "attn": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]), 1),
    "all": (
        dict(
            r=4,
            lora_alpha=32,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
            + ["down_proj"],
        ),
        2,
    ),
}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def make_peft_adapter(tiny_model_dir, path, fields: dict, seed: int):
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.1, **fields)
    peft.get_peft_model(hf_model(tiny_model_dir), config).save_pretrained(path)
    return path


def make_engine(tiny_model_dir, adapters, **kwargs) -> Engine:
    kwargs = {"num_blocks": 512, "max_num_batched_tokens": 256} | kwargs
    return Engine.from_pretrained(tiny_model_dir, adapters=adapters, **kwargs)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_peft_adapter(tiny_model_dir, root / name, fields, seed)
        for name, (fields, seed) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def peft_models(tiny_model_dir, adapter_dirs):
    """The reference per adapter (None: the base model), each on its own base copy."""
    models = {None: hf_model(tiny_model_dir)}
    for name, path in adapter_dirs.items():
        models[name] = peft.PeftModel.from_pretrained(hf_model(tiny_model_dir), path).eval()
    return models


def test_mixed_batch_equals_peft_and_prefix_hits(tiny_model_dir, adapter_dirs, peft_models):
    # lengths across block and 256-token chunk boundaries; adapters interleaved
    prompts = random_prompts([5, 16, 40, 300, 77, 120, 33, 260, 9], seed=4321)
    names = ["attn", None, "all"] * 3
    expected = [hf_greedy(peft_models[n], p, 12) for p, n in zip(prompts, names, strict=True)]
    engine = make_engine(tiny_model_dir, adapter_dirs)
    outs = engine.generate(prompts, greedy(12), adapters=names)
    assert [o.token_ids for o in outs] == expected
    assert [o.num_cached_tokens for o in outs] == [0] * len(prompts)
    # the adapters change the output: equal lists above are no accident of a no-op
    base = [hf_greedy(peft_models[None], p, 12) for p in prompts[:3]]
    assert base[0] != expected[0] and base[2] != expected[2]
    again = engine.generate(prompts, greedy(12), adapters=names)
    assert [o.token_ids for o in again] == expected
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 16 * 16 for p in prompts]
    assert engine.adapters.loaded() == ["attn", "all"]
    assert engine.adapters.num_loads == 2


def test_same_prompt_under_each_adapter_shares_no_block(tiny_model_dir, adapter_dirs):
    engine = make_engine(tiny_model_dir, adapter_dirs)
    prompt = random_prompts([100], seed=99)[0]
    hashes = {n: engine.prefix_hashes(prompt, greedy(4), n) for n in (None, "attn", "all")}
    assert [len(h) for h in hashes.values()] == [6, 6, 6]
    assert len(set().union(*hashes.values())) == 18
    cached = [engine.generate([prompt], greedy(4), n)[0].num_cached_tokens for n in hashes]
    assert cached == [0, 0, 0]
    cached = [engine.generate([prompt], greedy(4), n)[0].num_cached_tokens for n in hashes]
    assert cached == [96, 96, 96]
    for hits in hashes.values():  # the pool holds exactly what prefix_hashes names
        assert len(engine.pool.match_prefix(hits)) == 6


def test_frontend_salt_equals_engine_hashes(tiny_model_dir, adapter_dirs, tmp_path):
    """What a frontend computes from the adapter's files alone names the engine's blocks;
    the same files at another path (or name) are the same adapter."""
    copy = shutil.copytree(adapter_dirs["attn"], tmp_path / "copy")
    engine = make_engine(tiny_model_dir, {"attn": adapter_dirs["attn"], "other": copy})
    assert adapter_salt(copy) == adapter_salt(adapter_dirs["attn"])
    assert adapter_salt(copy) != adapter_salt(adapter_dirs["all"])
    prompt, params = random_prompts([50], seed=7)[0], greedy(4)
    salt = salt_with_adapter(engine.salt, adapter_salt(copy))
    frontend = hash_blocks(prompt[:48], 16, salt=params.salted(salt))
    assert engine.prefix_hashes(prompt, params, "attn") == frontend
    assert engine.prefix_hashes(prompt, params, "other") == frontend
    assert engine.prefix_hashes(prompt, params) == hash_blocks(prompt[:48], 16, salt=engine.salt)


def test_lru_eviction_keeps_pinned_adapters(tiny_model_dir, tmp_path, engine_config):
    paths = {
        name: write_random_lora(tmp_path / name, engine_config, rank=2, alpha=4.0, seed=i)
        for i, name in enumerate(["a", "b", "c"])
    }
    engine = make_engine(tiny_model_dir, paths, max_loras=2)
    prompt = random_prompts([20], seed=3)[0]
    engine.generate([prompt, prompt], greedy(2), adapters=["a", "b"])
    engine.generate([prompt], greedy(2), adapters="c")
    assert engine.adapters.loaded() == ["b", "c"]
    pinned_b = engine.add_request(prompt, greedy(64), adapter="b")  # outlives the next
    engine.generate([prompt], greedy(2), adapters="a")  # evicts c, the unpinned one
    assert engine.adapters.loaded() == ["b", "a"]
    pinned_c = engine.add_request(prompt, greedy(64), adapter="c")  # evicts a
    assert engine.adapters.loaded() == ["b", "c"]
    with pytest.raises(AdapterBusyError, match=r"max_loras=2 adapters .*\(b, c\): retry") as err:
        engine.add_request(prompt, greedy(2), adapter="a")
    assert err.value.code == "adapters_busy"
    engine.abort_request(pinned_b)
    engine.generate([prompt], greedy(2), adapters="a")  # evicts b, unpinned by the abort
    assert engine.adapters.loaded() == ["c", "a"]
    engine.abort_request(pinned_c)
    assert engine.adapters.num_loads == 6
    assert [r.num_users for r in engine.adapters.resident.values()] == [0, 0]


def test_busy_when_every_slot_is_pinned(tiny_model_dir, tmp_path, engine_config):
    paths = {
        name: write_random_lora(tmp_path / name, engine_config, rank=2, alpha=4.0, seed=i)
        for i, name in enumerate(["a", "b"])
    }
    engine = make_engine(tiny_model_dir, paths, max_loras=1)
    prompt = random_prompts([20], seed=3)[0]
    first = engine.add_request(prompt, greedy(2), adapter="a")
    engine.add_request(prompt, greedy(2), adapter="a")  # a second user of a resident one
    with pytest.raises(AdapterBusyError, match=r"max_loras=1 adapters .*\(a\): retry"):
        engine.add_request(prompt, greedy(2), adapter="b")
    assert engine.requests.keys() == {first, "req-1"}
    while engine.has_unfinished():
        engine.step()
    assert engine.generate([prompt], greedy(2), adapters="b")[0].finish_reason == "length"
    assert engine.adapters.loaded() == ["b"]


@pytest.fixture(scope="module")
def engine_config(tiny_model_dir):
    from kvmesh.gpu.model_config import ModelConfig

    return ModelConfig.from_pretrained(tiny_model_dir)


def test_written_adapter_equals_peft(tiny_model_dir, tmp_path, engine_config):
    """write_random_lora (the benchmark's adapters) is PEFT's format: PEFT loads it."""
    path = write_random_lora(
        tmp_path / "w", engine_config, rank=4, alpha=8.0, targets=("k_proj", "up_proj"), seed=5
    )
    model = peft.PeftModel.from_pretrained(hf_model(tiny_model_dir), path).eval()
    prompt = random_prompts([30], seed=8)[0]
    engine = make_engine(tiny_model_dir, {"w": path})
    out = engine.generate([prompt], greedy(10), adapters="w")[0].token_ids
    assert out == hf_greedy(model, prompt, 10)
    assert out != hf_greedy(hf_model(tiny_model_dir), prompt, 10)


def write_config(path, **fields):
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | fields))


def wrong_shapes(path, tiny_model_dir, tmp_path):
    from kvmesh.gpu.model_config import ModelConfig

    # an adapter trained for a narrower base model
    other = dataclasses.replace(ModelConfig.from_pretrained(tiny_model_dir), hidden_size=128)
    shutil.rmtree(path)
    write_random_lora(path, other, rank=2, alpha=4.0, targets=("v_proj",))


BAD_ADAPTERS = {
    "missing dir": (lambda p, *_: shutil.rmtree(p), r"is not a directory"),
    "no weights": (
        lambda p, *_: (p / "adapter_model.safetensors").unlink(),
        r"has no adapter_model\.safetensors",
    ),
    "dora": (lambda p, *_: write_config(p, use_dora=True), r"use_dora must be false"),
    "rank": (lambda p, *_: write_config(p, r=3), r"layers\.0\.\w+ has rank 8, .* says r=3"),
    "peft type": (lambda p, *_: write_config(p, peft_type="IA3"), r'peft_type must be "LORA"'),
    "wrong shapes": (wrong_shapes, r"v_proj: lora_A \(2, 128\) and lora_B \(64, 2\) do not fit"),
    "bad json": (
        lambda p, *_: (p / "adapter_config.json").write_text("{"),
        r"adapter_config\.json: not readable JSON",
    ),
}


@pytest.mark.parametrize("breakage, message", BAD_ADAPTERS.values(), ids=BAD_ADAPTERS)
def test_bad_adapter_is_refused(tiny_model_dir, adapter_dirs, tmp_path, breakage, message):
    path = shutil.copytree(adapter_dirs["attn"], tmp_path / "bad")
    breakage(path, tiny_model_dir, tmp_path)
    engine = make_engine(tiny_model_dir, None, num_blocks=16)
    with pytest.raises(ValueError, match=message):
        engine.register_adapter("bad", path)
    with pytest.raises(ValueError, match=r"adapter 'bad' is not registered \(registered: none\)"):
        engine.add_request([20, 21], greedy(2), adapter="bad")


def test_unknown_adapter_names_the_registered(tiny_model_dir, adapter_dirs):
    engine = make_engine(tiny_model_dir, adapter_dirs)
    match = r"adapter 'nope' is not registered \(registered: all, attn\)"
    with pytest.raises(ValueError, match=match):
        engine.add_request([20, 21], greedy(2), adapter="nope")
    with pytest.raises(ValueError, match=match):
        engine.prefix_hashes([20, 21], greedy(2), "nope")
    with pytest.raises(ValueError, match=r"adapter name must be a non-empty string without ':'"):
        engine.register_adapter("base:x", adapter_dirs["attn"])
    assert not engine.requests


def test_lora_batch_masks_each_row_to_its_adapter(engine_config, tmp_path):
    a, b = (
        load_lora(
            name,
            write_random_lora(tmp_path / name, engine_config, rank=r, alpha=4.0, targets=targets),
            engine_config,
            "cpu",
            torch.float32,
        )
        for name, r, targets in [("a", 2, ("q_proj", "down_proj")), ("b", 3, ("down_proj",))]
    )
    cpu = torch.device("cpu")
    batch = LoraBatch.of([a, None, b, a], [3, 1, 2, 1], cpu)
    assert batch.row_group.tolist() == [0, 0, 0, -1, 1, 1, 0]
    layer = batch.stack.layers[0]
    assert layer.keys() == {"qkv_proj", "down_proj"}
    assert layer["qkv_proj"][2] == (0, 0)  # b has no q_proj: only a's 2 columns
    assert layer["down_proj"][2] == (0, 0, 1, 1, 1)
    mask = batch.mask(layer["down_proj"][2], torch.zeros(1))
    assert mask.tolist()[2:5] == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]
    # the masked sum equals each row's own adapter's delta
    x = torch.randn(7, engine_config.intermediate_size)
    out = batch.layer(0).add("down_proj", x, torch.zeros(7, engine_config.hidden_size))
    for row, w in enumerate([a, a, a, None, b, b, a]):
        expected = torch.zeros(engine_config.hidden_size)
        if w is not None:
            down_a, down_b = w.modules[0]["down_proj"]
            expected = down_b @ (down_a @ x[row])
        torch.testing.assert_close(out[row], expected)
    same = LoraBatch.of([b, b], [2, 5], cpu, batch.stack)
    assert same.row_group is None and same.stack is not batch.stack
    again = LoraBatch.of([b, a], [1, 1], cpu, batch.stack)
    assert again.stack is not batch.stack  # another order of adapters: another stack
    assert LoraBatch.of([a, b, a], [1, 1, 1], cpu, batch.stack).stack is batch.stack
    assert LoraBatch.of([None, None], [4, 1], cpu) is None


def test_async_engine_streams_through_adapters(tiny_model_dir, adapter_dirs):
    from kvmesh.engine.async_engine import AsyncEngine

    prompts = random_prompts([30, 45], seed=21)
    expected = make_engine(tiny_model_dir, adapter_dirs).generate(
        prompts, greedy(6), adapters=["attn", "all"]
    )

    async def collect(engine, prompt, request_id, adapter):
        return [
            t
            async for out in engine.generate(prompt, greedy(6), request_id, adapter)
            for t in out.new_token_ids
        ]

    async def main():
        engine = AsyncEngine(make_engine(tiny_model_dir, adapter_dirs))
        engine.start()
        results = await asyncio.gather(
            collect(engine, prompts[0], "r0", "attn"), collect(engine, prompts[1], "r1", "all")
        )
        with pytest.raises(ValueError, match=r"adapter 'nope' is not registered"):
            await collect(engine, prompts[0], "r2", "nope")
        hashes = engine.prefetch_hashes(prompts[1], greedy(6), "all")
        await engine.close()
        return results, hashes

    results, hashes = asyncio.run(main())
    assert results == [o.token_ids for o in expected]
    assert hashes == make_engine(tiny_model_dir, adapter_dirs).prefix_hashes(
        prompts[1], greedy(6), "all"
    )


def test_remote_prefill_task_names_its_adapter(tiny_model_dir, adapter_dirs):
    engine = make_engine(tiny_model_dir, adapter_dirs)
    prompt = random_prompts([40], seed=5)[0]
    engine.add_request(prompt, greedy(2), "r-attn", remote_prefill=True, adapter="attn")
    engine.add_request(prompt, greedy(2), "r-base", remote_prefill=True)
    engine.step()
    tasks = engine.take_remote_prefills()
    assert [(t.request_id, t.adapter) for t in tasks] == [("r-attn", "attn"), ("r-base", None)]
