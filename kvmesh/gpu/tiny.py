"""The tiny model: a ~4M-parameter Llama checkpoint made locally, with no model hub.

`init_tiny(dir)` writes a Hugging Face directory (config, seeded random weights, a
byte-level BPE tokenizer trained here on generated text, chat template) that
`transformers` loads unchanged, so tests compare the engine with it token for token.

Why the weights are not the usual std-0.02 init: a model that small with that init
emits one token forever under greedy decoding, which would hide KV-cache and position
bugs. Linears get std 1/sqrt(fan_in) (activations keep unit scale through every layer),
embeddings std 1 (each token moves the residual stream as much as a layer does) and
lm_head a std that spreads the logits over several units, so the top-1 token usually
leads by far more than float32 noise and continuations differ from prompt to prompt.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np

NUM_LAYERS = 4
HIDDEN_SIZE = 256
NUM_HEADS = 8
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
INTERMEDIATE_SIZE = 688
VOCAB_SIZE = 2048
MAX_POSITIONS = 4096
EMBED_STD = 1.0
LM_HEAD_STD = 0.3  # logits = rms-normed hidden (norm 16) @ W: std ~4.8 across the vocabulary

BOS, EOS, END = "<s>", "</s>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>", END]
BOS_ID, EOS_ID, END_ID = 0, 1, 5  # the trainer numbers special tokens first, in order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('message role must be system, user or assistant, got '"
    " + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Corpus for the tokenizer: fixed, so every tiny model shares one vocabulary.
CORPUS_SEED = 1234
CORPUS_LINES = 6000
WORDS = """
the a an of to and in is it that for on with as was be by at this from or have not are
but all they one we can there their which will would what out if about up so when more
time people year way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force
education cache block token model layer router worker request memory server network
node cluster message stream batch queue prefix decode prefill engine kernel tensor
good new first last long great little own other old big high different small large next
early young important few public bad same able quick slow bright dark warm cold green
red blue happy quiet simple clear fast strong deep open ready free full hard easy
say make go know take see come think look want give use find tell ask seem feel try
leave call keep let begin help show hear play run move live believe hold bring happen
write provide sit stand lose pay meet include continue set learn lead understand watch
follow stop create speak read allow add spend grow offer remember love consider appear
buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass
sell require report decide pull store route evict allocate schedule compute measure
very also just now only then still even well back here there often never always again
""".split()
UNICODE_WORDS = ["café", "naïve", "über", "señor", "日本語", "こんにちは", "中文", "😀", "🚀", "—"]
NAMES = ["alpha", "beta", "count", "total", "items", "value", "result", "index", "size", "buf"]


def default_tiny_path() -> Path:
    """Where `ensure_tiny()` keeps the shared tiny model: $XDG_CACHE_HOME/kvmesh/tiny-llama."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "kvmesh" / "tiny-llama"


def ensure_tiny(path: str | Path | None = None, seed: int = 0) -> Path:
    """Return the tiny model at `path`, making it (with `seed`) only if absent; safe
    when several processes call it at once (kvmesh.models.resolve.build_once)."""
    from kvmesh.models.resolve import build_once

    path = Path(path) if path is not None else default_tiny_path()
    return build_once(path, lambda tmp: init_tiny(tmp, seed), f"making the tiny model in {path}")


def init_tiny(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Llama checkpoint (weights seeded by `seed`) into directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path)
    write_json(path / "config.json", model_config())
    write_json(path / "generation_config.json", generation_config())
    write_weights(path / "model.safetensors", seed)
    return path


def model_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        # rope_theta for readers of the older layout, rope_parameters for transformers 5
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, END_ID],
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def generation_config() -> dict:
    # <|end|> closes every chat turn, so generation stops there as well as at </s>.
    return {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_ID]}


def weight_shapes() -> dict[str, tuple[tuple[int, ...], float]]:
    """HF Llama parameter name -> (shape, init std; 0 means all ones), in generation order."""
    kv_dim = NUM_KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": ((VOCAB_SIZE, HIDDEN_SIZE), EMBED_STD)}
    for i in range(NUM_LAYERS):
        layer = f"model.layers.{i}"
        linears = {
            "self_attn.q_proj": (HIDDEN_SIZE, HIDDEN_SIZE),
            "self_attn.k_proj": (kv_dim, HIDDEN_SIZE),
            "self_attn.v_proj": (kv_dim, HIDDEN_SIZE),
            "self_attn.o_proj": (HIDDEN_SIZE, HIDDEN_SIZE),
            "mlp.gate_proj": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            "mlp.up_proj": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            "mlp.down_proj": (HIDDEN_SIZE, INTERMEDIATE_SIZE),
        }
        for name, (out_dim, in_dim) in linears.items():
            shapes[f"{layer}.{name}.weight"] = ((out_dim, in_dim), 1 / math.sqrt(in_dim))
        shapes[f"{layer}.input_layernorm.weight"] = ((HIDDEN_SIZE,), 0.0)
        shapes[f"{layer}.post_attention_layernorm.weight"] = ((HIDDEN_SIZE,), 0.0)
    shapes["model.norm.weight"] = ((HIDDEN_SIZE,), 0.0)
    shapes["lm_head.weight"] = ((VOCAB_SIZE, HIDDEN_SIZE), LM_HEAD_STD)
    return shapes


def make_weights(seed: int) -> dict[str, np.ndarray]:
    """Seeded weights, bit-identical everywhere: PCG64 normals in float64, then cast."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (shape, std) in weight_shapes().items():
        values = rng.standard_normal(shape) * std if std else np.ones(shape)
        weights[name] = values.astype(np.float32)
    return weights


def write_weights(file: Path, seed: int) -> None:
    from safetensors.numpy import save

    # save() + write_bytes rather than save_file, which creates the file mode 0600
    file.write_bytes(save(make_weights(seed), metadata={"format": "pt"}))


def num_parameters() -> int:
    return sum(math.prod(shape) for shape, _ in weight_shapes().values())


def write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(path: Path) -> None:
    write_json(path / "tokenizer_config.json", tokenizer_config())
    (path / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")


def tokenizer_json() -> str:
    return train_tokenizer().to_str(pretty=True) + "\n"


def train_tokenizer():
    """Byte-level BPE trained on `corpus()`; the same bytes on every run (see the test)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    assert tokenizer.token_to_id(BOS) == BOS_ID and tokenizer.token_to_id(END) == END_ID
    return tokenizer


def corpus() -> list[str]:
    """Pseudo-English sentences, numbers, a little code and unicode, from a fixed seed."""
    rng = random.Random(CORPUS_SEED)
    makers = [sentence, sentence, sentence, numbers_line, code_line, unicode_line]
    return [rng.choice(makers)(rng) for _ in range(CORPUS_LINES)]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words[rng.randrange(1, len(words))] += ","
    return " ".join(words).capitalize() + rng.choice(".....!?")


def numbers_line(rng: random.Random) -> str:
    forms = [
        lambda: (
            f"There are {rng.randint(0, 999)} {rng.choice(WORDS)}s in {rng.randint(1, 60)} days."
        ),
        lambda: f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(0, 99)}.{rng.randint(0, 99)} + {rng.randint(0, 9999)} = ?",
        lambda: (
            f"At {rng.randint(0, 23)}:{rng.randint(0, 59):02d} the {rng.choice(WORDS)} cost "
            f"${rng.randint(1, 500)}.{rng.randint(0, 99):02d} (about {rng.randint(1, 100)}%)."
        ),
    ]
    return rng.choice(forms)()


def code_line(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    forms = [
        f"def {rng.choice(WORDS)}_{a}({a}, {b}):\n    return {a} + {b} * {rng.randint(0, 9)}\n",
        f"for {a} in range({rng.randint(1, 100)}):\n    {b}[{a}] = {a} ** 2\n",
        f'if {a} == {b}:\n    print("{rng.choice(WORDS)}", {a})\nelse:\n    {a} += 1\n',
        f"{a} = [{', '.join(str(rng.randint(0, 99)) for _ in range(rng.randint(1, 6)))}]",
        f'{{"{a}": {rng.randint(0, 999)}, "{b}": "{rng.choice(WORDS)}"}}',
    ]
    return rng.choice(forms)


def unicode_line(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(UNICODE_WORDS))
    return " ".join(words) + "."
