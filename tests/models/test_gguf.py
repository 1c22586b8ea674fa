"""`kvmesh model import`: GGUF files made from the tiny model in every supported type
import into directories the Engine loads; F32 gives back the tiny model bit for bit,
every type gives transformers' own GGUF tensors bit for bit and its greedy output token
for token; what cannot be imported is refused, naming why, before anything is written."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kvmesh import Engine, SamplingParams
from kvmesh.cli import cli
from kvmesh.models.gguf import GGUFImportError, import_gguf, unpermute_rope
from tests.models.conftest import hf_from_gguf
from tests.models.tiny_gguf import TYPES, make_weights, permute_rope, write_tiny_gguf
from tests.prompts import random_prompts
from tests.reference import hf_greedy

MAX_TOKENS = 12


def make_import(tmp_path, tiny_model_dir, qtype="F32", **gguf_options):
    """(GGUF file, its imported directory)."""
    file = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", tiny_model_dir, qtype, **gguf_options)
    return file, import_gguf(file, tmp_path / f"tiny-{qtype}-hf")


def greedy(model_dir, prompts) -> list[list[int]]:
    engine = Engine.from_pretrained(model_dir, num_blocks=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in engine.generate(prompts, params)]


def test_unpermute_rope_undoes_the_converters_permutation():
    values = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert np.array_equal(unpermute_rope(permute_rope(values, 4), 4), values)
    bias = np.arange(16, dtype=np.float32)  # head_dim 8: halves [0..3], [4..7] interleaved
    assert permute_rope(bias, 2)[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_f32_import_is_the_tiny_model_bit_for_bit(tmp_path, tiny_model_dir):
    _, imported = make_import(tmp_path, tiny_model_dir, "F32")
    ours, tiny = (load_file(d / "model.safetensors") for d in (imported, tiny_model_dir))
    assert sorted(ours) == sorted(tiny)
    assert all(torch.equal(ours[name], tiny[name]) for name in tiny)
    config = json.loads((imported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["rms_norm_eps"], config["tie_word_embeddings"]) == (1e-5, False)
    prompts = random_prompts([(4, 40)] * 4, seed=int(np.random.SeedSequence().entropy % 10**6))
    assert greedy(imported, prompts) == greedy(tiny_model_dir, prompts)


@pytest.mark.parametrize("qtype", TYPES)
def test_every_type_imports_as_transformers_loads_it(tmp_path, tiny_model_dir, qtype):
    file, imported = make_import(tmp_path, tiny_model_dir, qtype)
    hf = hf_from_gguf(file)
    ours, theirs = load_file(imported / "model.safetensors"), hf.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    seed = int(np.random.SeedSequence().entropy % 10**6)  # fresh prompts every run
    prompts = random_prompts([(4, 40)] * 3, seed=seed)
    expected = [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in prompts]
    assert greedy(imported, prompts) == expected, f"seed {seed}"


def test_tied_embeddings_share_the_embedding_as_head(tmp_path, tiny_model_dir):
    file, imported = make_import(tmp_path, tiny_model_dir, "Q8_0", weights=make_weights(tie=True))
    config = json.loads((imported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(imported / "model.safetensors")
    prompts = random_prompts([(4, 40)] * 2, seed=5)
    hf = hf_from_gguf(file)
    assert greedy(imported, prompts) == [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def test_qwen2_is_not_unpermuted_and_keeps_its_biases(tmp_path, tiny_model_dir):
    weights = make_weights(bias=True)
    file, imported = make_import(tmp_path, tiny_model_dir, "F32", arch="qwen2", weights=weights)
    config = json.loads((imported / "config.json").read_text())
    assert (config["architectures"], config["attention_bias"]) == (["Qwen2ForCausalLM"], True)
    ours = load_file(imported / "model.safetensors")
    assert all(torch.equal(ours[name], torch.from_numpy(w)) for name, w in weights.items())
    prompts = random_prompts([(4, 40)] * 2, seed=6)
    hf = hf_from_gguf(file)
    assert greedy(imported, prompts) == [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def test_a_llama_file_named_mistral_is_mistral(tmp_path, tiny_model_dir):
    _, imported = make_import(tmp_path, tiny_model_dir, "F16", name="Mistral 7B Instruct")
    config = json.loads((imported / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["MistralForCausalLM"], "mistral")


def test_the_tokenizer_and_chat_template_come_from_the_metadata(tmp_path, tiny_model_dir):
    from kvmesh.tokenizer import Tokenizer

    _, imported = make_import(tmp_path, tiny_model_dir, "F32")
    ours, tiny = Tokenizer.from_pretrained(imported), Tokenizer.from_pretrained(tiny_model_dir)
    text = "the cat sat on the mat, and 42 dogs ran! <|end|>"
    assert ours.encode(text) == tiny.encode(text)  # bos added: add_bos_token
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages) == tiny.apply_chat_template(messages)
    assert (ours.bos_token_id, ours.eos_token_ids) == (0, frozenset({1, 5}))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_picks_the_stored_dtype(tmp_path, tiny_model_dir, dtype):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model_dir, "Q4_0")
    imported = import_gguf(file, tmp_path / "hf", dtype)
    weights = load_file(imported / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {getattr(torch, dtype)}
    assert json.loads((imported / "config.json").read_text())["torch_dtype"] == dtype


def refused(file, tmp_path) -> str:
    """import_gguf's error for `file`; nothing may have been written."""
    with pytest.raises(GGUFImportError) as error:
        import_gguf(file, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return str(error.value)


def test_a_truncated_file_is_refused(tmp_path, tiny_model_dir):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model_dir, "Q4_1")
    whole = file.read_bytes()
    for cut in (len(whole) - 100, len(whole) // 2, 2000):
        file.write_bytes(whole[:cut])
        assert "truncated" in refused(file, tmp_path)


def write_embedding_only(file, kind: gguf.GGMLQuantizationType):
    """A Llama GGUF of one zero embedding in `kind` and no metadata but its block count."""
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_block_count(1)
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    raw = np.zeros((2048, 256 // block * block_bytes), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def test_an_unsupported_tensor_type_is_refused_by_name(tmp_path):
    file = write_embedding_only(tmp_path / "q2k.gguf", gguf.GGMLQuantizationType.Q2_K)
    message = refused(file, tmp_path)
    assert "'token_embd.weight' has type Q2_K" in message
    assert "supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1" in message


def test_missing_metadata_is_refused_by_key(tmp_path):
    file = write_embedding_only(tmp_path / "bare.gguf", gguf.GGMLQuantizationType.Q8_0)
    assert "metadata key llama.attention.head_count is missing" in refused(file, tmp_path)


def test_an_unsupported_architecture_is_refused_by_name(tmp_path, tiny_model_dir):
    file = write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_model_dir, "F32", arch="gpt2")
    message = refused(file, tmp_path)
    assert "architecture 'gpt2' is not supported; supported: llama, qwen2" in message


def test_not_a_gguf_file_is_refused(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"PK\x03\x04 a zip, not a model")
    assert "not a GGUF file" in refused(file, tmp_path)


def test_the_cli_prints_the_error_without_a_traceback(tmp_path, tiny_model_dir):
    file = write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_model_dir, "F32", arch="gpt2")
    result = CliRunner().invoke(cli, ["model", "import", str(file), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: gpt2.gguf: architecture 'gpt2' is not supported")
    assert "Traceback" not in result.output


def test_the_cli_imports(tmp_path, tiny_model_dir):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model_dir, "Q8_0")
    args = ["model", "import", str(file), str(tmp_path / "out"), "--dtype", "bfloat16"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output == f"{tmp_path / 'out'}  (bfloat16)\n"
    assert Engine.from_pretrained(tmp_path / "out", num_blocks=16).config.num_layers == 4


def test_unsupported_rope_scaling_is_refused_by_name(tmp_path, tiny_model_dir):
    file = tmp_path / "yarn.gguf"
    write_tiny_gguf(file, tiny_model_dir, "F32", rope_scaling="yarn")
    assert "rope scaling 'yarn' is not supported; supported: none, linear" in refused(
        file, tmp_path
    )


def test_linear_rope_scaling_is_kept(tmp_path, tiny_model_dir):
    _, imported = make_import(tmp_path, tiny_model_dir, "F32", rope_scaling="linear")
    config = json.loads((imported / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert Engine.from_pretrained(imported, num_blocks=16).config.rope_scaling["factor"] == 4.0
