"""The tiny model: files transformers loads, seeded weights, greedy output that varies."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvmesh
from kvmesh.gpu import tiny

# sha256 of model.safetensors for seed 0: changes only if the weight layout, the scales
# or numpy's PCG64/normal stream change, all of which break "same seed, same model".
KVMESH_ROOT = Path(kvmesh.__file__).parents[1]  # cwd of child Pythons, so they import this kvmesh
SEED0_WEIGHTS_SHA256 = "498c88e33138cf5d6556405fb80e2e8028375d1cd12ecc323904ccd2eae0cd31"
PROMPTS = ["Hello", "The cache is full.", "def total(items):", "日本語 😀"]
NUM_NEW_TOKENS = 24


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def read_json(file: Path) -> dict:
    return json.loads(file.read_text(encoding="utf-8"))


def greedy(model, tokenizer, prompt: str):
    """transformers greedy decoding: (new token ids, per-step logits [steps, vocab])."""
    import torch

    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=NUM_NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,  # always NUM_NEW_TOKENS tokens, even through <|end|>
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.cat(out.logits)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_init_tiny_writes_the_hf_files(tiny_model_dir):
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = read_json(tiny_model_dir / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        4,
        256,
        688,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 2)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (2048, 4096)
    assert config["tie_word_embeddings"] is False
    assert read_json(tiny_model_dir / "generation_config.json")["eos_token_id"] == [1, 5]


def test_special_token_ids_agree_across_files(tiny_model_dir, hf_tokenizer):
    config = read_json(tiny_model_dir / "config.json")
    assert hf_tokenizer.convert_tokens_to_ids(["<s>", "</s>", "<|end|>"]) == [0, 1, 5]
    assert (config["bos_token_id"], config["eos_token_id"]) == (hf_tokenizer.bos_token_id, [1, 5])
    assert hf_tokenizer.eos_token_id == 1
    assert len(hf_tokenizer) == config["vocab_size"]


def test_transformers_loads_every_weight(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert (set(info["missing_keys"]), set(info["unexpected_keys"])) == (set(), set())
    num_parameters = sum(p.numel() for p in model.parameters())
    assert num_parameters == tiny.num_parameters() == 3_819_776
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(10000 ** (-2 / 32))


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir, tmp_path):
    tiny.write_weights(tmp_path / "seed0.safetensors", seed=0)
    tiny.write_weights(tmp_path / "seed1.safetensors", seed=1)
    assert sha256(tiny_model_dir / "model.safetensors") == SEED0_WEIGHTS_SHA256
    assert sha256(tmp_path / "seed0.safetensors") == SEED0_WEIGHTS_SHA256
    weights0, weights1 = tiny.make_weights(0), tiny.make_weights(1)
    assert (weights0["lm_head.weight"] != weights1["lm_head.weight"]).all()
    assert (weights0["model.norm.weight"] == weights1["model.norm.weight"]).all()  # all ones


def test_tokenizer_training_is_deterministic_across_processes_and_threads(tiny_model_dir):
    # The tokenizers trainer counts in parallel (rayon); the file must not depend on it.
    script = "import hashlib; from kvmesh.gpu.tiny import tokenizer_json as t; " + (
        "print(hashlib.sha256(t().encode()).hexdigest())"
    )
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    other = subprocess.run(
        [sys.executable, "-c", script],
        cwd=KVMESH_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    in_process = hashlib.sha256(tiny.tokenizer_json().encode()).hexdigest()
    assert other.stdout == in_process + "\n"
    assert in_process == sha256(tiny_model_dir / "tokenizer.json")


def test_greedy_decoding_varies_within_and_across_prompts(hf_model, hf_tokenizer):
    outputs = [greedy(hf_model, hf_tokenizer, prompt) for prompt in PROMPTS]
    continuations = [ids for ids, _ in outputs]
    assert all(len(set(ids)) >= 12 for ids in continuations), continuations
    assert len({ids[0] for ids in continuations}) == len(PROMPTS)
    assert len(set().union(*continuations)) >= 60
    for _, logits in outputs:
        top2 = logits.topk(2, dim=-1).values
        # float32 vs float64 logits differ by ~1e-5 here; ties below 1e-3 would make
        # token-for-token comparisons with the engine flaky.
        assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3
        assert 3.0 < logits.std(dim=-1).mean().item() < 8.0


def test_ensure_tiny_builds_once_when_processes_race(tmp_path):
    target = tmp_path / "cache" / "tiny-llama"
    script = "import sys; from kvmesh.gpu.tiny import ensure_tiny; print(ensure_tiny(sys.argv[1]))"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(target)],
            cwd=KVMESH_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    printed = [racer.communicate()[0].strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    assert printed == [str(target)] * 3
    assert [p.name for p in target.parent.iterdir()] == ["tiny-llama"]  # no temp dir left
    assert sha256(target / "model.safetensors") == SEED0_WEIGHTS_SHA256
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_tiny_refuses_a_dir_that_holds_something_else(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists but holds no model"):
        tiny.ensure_tiny(tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dir left


def test_default_tiny_path_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tiny.default_tiny_path() == tmp_path / "kvmesh" / "tiny-llama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tiny.default_tiny_path() == Path.home() / ".cache" / "kvmesh" / "tiny-llama"


def test_cli_init_tiny_prints_path_and_parameter_count(tmp_path):
    from click.testing import CliRunner

    from kvmesh.cli import cli

    result = CliRunner().invoke(cli, ["model", "init-tiny", str(tmp_path / "m"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{tmp_path / 'm'}  (3,819,776 parameters, seed 1)\n"
    assert sha256(tmp_path / "m" / "model.safetensors") != SEED0_WEIGHTS_SHA256
