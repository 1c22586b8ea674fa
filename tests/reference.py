"""The reference every engine test compares with: transformers' greedy generate."""

import torch


def hf_greedy(hf_model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: exactly max_tokens tokens, EOS or not."""
    ids = torch.tensor([prompt])
    # an explicit mask: left to itself, generate would mask every token equal to pad_token_id
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
