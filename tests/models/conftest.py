"""transformers' own GGUF loading, the reference the imports are held to: its config
and dequantized, un-permuted tensors (transformers.modeling_gguf_pytorch_utils, what
`from_pretrained(..., gguf_file=...)` runs; that entry point also wants `accelerate`,
which nothing else here needs)."""

from __future__ import annotations

from pathlib import Path

import pytest


def hf_from_gguf(file: Path):
    """transformers' model of GGUF `file`, float32, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.for_model(**load_gguf_checkpoint(str(file))["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert (set(missing), unexpected) == (tied, []), (missing, unexpected)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """$KVMESH_CACHE for the whole session (inherited by the `kvmesh up` a test starts):
    imports land here, not in the user's ~/.cache/kvmesh/models."""
    path = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVMESH_CACHE", str(path))
        yield path
