"""Tokenizer: a Hugging Face fast-tokenizer directory read with `tokenizers` and jinja2
alone, so the frontend and router start without torch or transformers.

It reproduces what transformers' AutoTokenizer does for a PreTrainedTokenizerFast
directory: tokenizer.json as the backend (its post-processor decides bos/eos), the named
special tokens from tokenizer_config.json (or legacy special_tokens_map.json), the chat
template rendered in the same sandboxed jinja2 environment with those tokens as variables.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

# The named special tokens transformers passes to chat templates (its special_tokens_map).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# transformers' clean_up_tokenization; it skips it for BPE models, so do we.
CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class Tokenizer:
    """Text <-> token ids and chat formatting for one model directory; the same results
    as transformers' AutoTokenizer on that directory, without importing it."""

    def __init__(self, backend: Backend, config: dict, eos_ids: Iterable[int], chat_template):
        self.backend = backend
        self.special_tokens = {
            key: token_content(config[key]) for key in NAMED_SPECIAL_TOKENS if config.get(key)
        }
        self.bos_token_id = self.token_id("bos_token")
        self.eos_token_id = self.token_id("eos_token")
        own_eos = () if self.eos_token_id is None else (self.eos_token_id,)
        self.eos_token_ids = frozenset((*own_eos, *eos_ids))
        self.chat_template = chat_template
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and (
            type(backend.model).__name__ != "BPE"
        )
        self.compiled_template = None  # compiled on first use: jinja2 costs a few ms to import

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json and generation_config.json (if present)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(
                f"tokenizer path {str(path)!r} has no tokenizer.json "
                "(only fast tokenizers are supported)"
            )
        config = read_config(path)
        backend = Backend.from_file(str(path / "tokenizer.json"))
        configure_backend(backend, config)
        generation = read_json(path / "generation_config.json")
        eos = generation.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        return cls(backend, config, eos_ids, read_chat_template(path, config))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"text is not valid Unicode at character {exc.start} "
                f"(a lone surrogate {text[exc.start]!a})"
            ) from None
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(as_token_ids(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in CLEANUPS:
                text = text.replace(before, after)
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` as the prompt text (encode it with add_special_tokens=False:
        templates write the bos token themselves, as with transformers)."""
        if self.chat_template is None:
            raise ValueError("chat_template: this tokenizer has none (tokenizer_config.json)")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        if not all(isinstance(message, dict) for message in messages):
            raise ValueError("messages: every message must be a dict with 'role' and 'content'")
        import jinja2

        if self.compiled_template is None:
            self.compiled_template = compile_chat_template(self.chat_template)
        # transformers drops None values (OpenAI clients send content=None) before rendering.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        try:
            return self.compiled_template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"messages: the chat template refused them: {error}") from error


class IncrementalDetokenizer:
    """Streaming decode of generated ids: text appears only once its UTF-8 bytes are complete.

    Decodes a short window, never the whole sequence, so each push costs O(new tokens):

        ids (window):  [ prefix_offset ... read_offset ... len(ids) )
                         |<- emitted last ->|<- not yet emitted ->|
        new text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

    After each emit the ids before read_offset are dropped, so the window holds only the
    ids emitted last (as context) and those not yet emitted.

    Decoding from prefix_offset rather than read_offset keeps the context that
    sentencepiece-style decoders need (they strip a leading space from what they decode).
    The window starts in the last prompt tokens for the same reason. A decode ending in
    U+FFFD is an incomplete character: wait for more ids. Call `flush()` when the stream
    ends; then `text` equals tokenizer.decode(all generated ids).
    """

    PROMPT_CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-self.PROMPT_CONTEXT :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, new_ids: list[int]) -> str:
        """Add generated ids; return the text they complete ("" while a character is cut)."""
        self.ids.extend(as_token_ids(new_ids))
        return self.emit(final=False)

    def flush(self) -> str:
        """End of stream: return what is held back, an incomplete character as U+FFFD."""
        return self.emit(final=True)

    def emit(self, final: bool) -> str:
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        # Keep only the ids of the text just emitted: they are the next window's context.
        del self.ids[: self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.pieces.append(delta)
        return delta

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def as_token_ids(ids: Iterable[int]) -> list[int]:
    """`ids` as a list of Python ints (numpy and torch integers welcome), or ValueError."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"ids must be a sequence of ints, got {type(ids).__name__}")
    try:
        result = [operator.index(i) for i in ids]
    except TypeError as error:
        raise ValueError(f"ids must be a sequence of ints: {error}") from error
    if any(i < 0 for i in result):
        raise ValueError(f"ids must be non-negative, got {min(result)}")
    return result


def read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON: {error}") from error


def read_config(path: Path) -> dict:
    """tokenizer_config.json, with special_tokens_map.json filling tokens it lacks (legacy)."""
    config = read_json(path / "tokenizer_config.json")
    for key, value in read_json(path / "special_tokens_map.json").items():
        if not config.get(key):
            config[key] = value
    return config


def read_chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers; of a list
    of named templates, the one named "default"."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


def token_content(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def configure_backend(backend: Backend, config: dict) -> None:
    """Apply the tokenizer_config.json settings that transformers applies to the backend.
    (It ignores add_bos_token/add_eos_token when tokenizer.json exists: the post-processor
    there decides.)"""
    for key in NAMED_SPECIAL_TOKENS:
        token = config.get(key) and token_content(config[key])
        if token and backend.token_to_id(token) is None:
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))


def compile_chat_template(template: str):
    """Compile in the sandbox transformers uses: trim/lstrip blocks, loop controls,
    raise_exception, a tojson that does not HTML-escape, strftime_now."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # {% generation %} marks assistant text for training masks; rendering just keeps it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
