"""kvmesh.tokenizer against transformers' AutoTokenizer on the same directories."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvmesh
from kvmesh.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "",
    "Hello world",
    "The router sends the request to a decode worker.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "café naïve über señor",
    "日本語のテキストと中文",
    "emoji 😀🚀👍🏽 and a family 👨‍👩‍👧 🦀",
    "e\u0301 combining accent, \u200b zero width, \u00a0nbsp",
    "שלום مرحبا",
    "control \x00\x01\x7f chars",
    "<s>inline</s> specials <|user|>hi<|end|><|assistant|>",
    "def total(items):\n    return sum(items) ** 2  # 3.14159\n",
    "2024-01-01 at 12:30, $19.99 (50%)",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a KV cache?"},
    ],
    [
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello! café"},
        {"role": "user", "content": "  spaces\nand lines  "},
    ],
    [{"role": "user", "content": "x", "name": None}],  # None-valued keys are dropped
]


def make_messages(*contents: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Push `ids` in random chunks of 1-3, then flush; return every piece returned."""
    pieces, start = [], 0
    while start < len(ids):
        size = rng.randint(1, 3)
        pieces.append(detokenizer.push(ids[start : start + size]))
        start += size
    pieces.append(detokenizer.flush())
    return pieces


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text, add_special_tokens):
    expected = hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected


def test_encode_prepends_bos_only_with_special_tokens(tokenizer):
    assert tokenizer.encode("Hello")[0] == tokenizer.bos_token_id == 0
    assert tokenizer.encode("Hello") == [0] + tokenizer.encode("Hello", add_special_tokens=False)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tokenizer, hf_tokenizer, text, skip_special_tokens):
    ids = hf_tokenizer.encode(text)
    expected = hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip_is_lossless(tokenizer, text):
    assert (
        tokenizer.decode(
            tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False
        )
        == text
    )


def test_decode_of_random_ids_matches_transformers(tokenizer, hf_tokenizer):
    # Random ids cut multi-byte characters anywhere: both sides must agree on U+FFFD.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(
    tokenizer, hf_tokenizer, messages, add_generation_prompt
):
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert (
        tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        == expected
    )


def test_chat_prompt_renders_the_turns(tokenizer, hf_tokenizer):
    text = tokenizer.apply_chat_template(make_messages("Hi", "Yo"))
    assert text == "<s><|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n<|assistant|>\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    hf_ids = hf_tokenizer.apply_chat_template(make_messages("Hi", "Yo"), add_generation_prompt=True)
    assert ids == hf_ids["input_ids"]
    assert ids[:2] == [0, 3]  # <s> <|user|>, each one token


def test_special_token_ids_match_transformers(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 2048
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        hf_tokenizer.bos_token_id,
        hf_tokenizer.eos_token_id,
    )
    assert tokenizer.eos_token_ids == frozenset({1, 5})  # </s> and generation_config's <|end|>


def test_incremental_text_equals_full_decode_for_random_ids(tokenizer):
    rng = random.Random(1)
    prompt_ids = tokenizer.encode("A prompt")
    for _ in range(100):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
            pieces = stream(detokenizer, ids, rng)
            assert (
                "".join(pieces)
                == detokenizer.text
                == tokenizer.decode(ids, skip_special_tokens=skip)
            ), ids
            assert not any(piece.endswith("\ufffd") for piece in pieces[:-1]), (ids, pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_pieces_are_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(
        tokenizer, tokenizer.encode("Q:"), skip_special_tokens=False
    )
    pieces = [detokenizer.push([i]) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == detokenizer.text == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_holds_back_a_cut_character(tokenizer):
    ids = tokenizer.encode("𝄞", add_special_tokens=False)  # not in the training text: byte tokens
    assert len(ids) == 4
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.push([i]) for i in ids] == ["", "", "", "𝄞"]
    assert detokenizer.flush() == ""


def test_incremental_flush_emits_an_unfinished_character_as_replacement(tokenizer):
    ok, cut_crab = tokenizer.encode("ok", False), tokenizer.encode("🦀", False)[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.push(ok), detokenizer.push(cut_crab)] == ["ok", ""]
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == tokenizer.decode(ok + cut_crab) == "ok\ufffd"


def test_incremental_window_stays_short(tokenizer):
    ids = tokenizer.encode("the cache " * 400, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Q:"))
    for i in ids:
        detokenizer.push([i])
        assert len(detokenizer.ids) <= 2  # O(new tokens) per push, not O(sequence)
    assert detokenizer.text == "the cache " * 400


def test_missing_tokenizer_json_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: t.encode(b"bytes"), "text must be a str, got bytes"),
        (lambda t: t.encode(None), "text must be a str, got NoneType"),
        (lambda t: t.decode("abc"), "ids must be a sequence of ints, got str"),
        (lambda t: t.decode([1, 2.5]), "ids must be a sequence of ints"),
        (lambda t: t.decode([-1]), "ids must be non-negative, got -1"),
        (lambda t: t.apply_chat_template([]), "messages must be a non-empty list"),
        (lambda t: t.apply_chat_template(["hi"]), "messages: every message must be a dict"),
        (
            lambda t: t.apply_chat_template([{"role": "tool", "content": "x"}]),
            "role must be system, user or",
        ),
        (lambda t: IncrementalDetokenizer(t, []).push(["x"]), "ids must be a sequence of ints"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(tokenizer, call, match):
    with pytest.raises(ValueError, match=match):
        call(tokenizer)


def test_no_chat_template_is_a_value_error(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path)
    with pytest.raises(ValueError, match="chat_template: this tokenizer has none"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(make_messages("hi"))


def test_loads_a_llama_style_directory_like_transformers(tiny_model_dir, tmp_path):
    # Another layout: specials from special_tokens_map.json, the template (with a
    # {% generation %} tag) from chat_template.jinja, no generation_config, and
    # add_bos/add_eos flags that transformers 5 ignores when tokenizer.json exists
    # (its post-processor still prepends <s>).
    from transformers import AutoTokenizer

    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": "<|system|>", "eos_token": {"content": "<|end|>", "special": True}}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}\n"
        "[{{ m.role }}] {% generation %}{{ m.content | tojson }}{% endgeneration %}"
        "{{ eos_token }}\n"
        "{% endfor %}"
    )
    ours, theirs = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.encode("") == [0]
    messages = make_messages("Hi é", "<b>x</b>")
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False
    )
    assert (ours.bos_token_id, ours.eos_token_ids) == (2, frozenset({5}))


def test_import_needs_neither_torch_nor_transformers():
    check = (
        "import sys, kvmesh.tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    root = Path(kvmesh.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout == "[]\n"
