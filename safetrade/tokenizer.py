"""Tokenizers and chat prompts, without torch.

transformers can read a tokenizer out of a GGUF file, but that path imports torch. Here the tokenizer
is built straight from the GGUF metadata with the `tokenizers` library and wrapped as a
`transformers.PreTrainedTokenizerFast`, so everything downstream (chat templates, padding,
`save_pretrained`) is the ordinary transformers API.

Supported GGUF vocabularies: `tokenizer.ggml.model == "gpt2"` (byte-level BPE) with the pre-tokenizer
families in `_PRE_TOKENIZERS`. SentencePiece files ("llama") are not supported yet; convert such a model
to a Hugging Face directory with a tokenizer.json instead.

On `tokenizer.ggml.pre == "smollm"`: the split follows llama.cpp and SmolLM2's own tokenizer.json --
digits are isolated first, then the GPT-2 regex runs. transformers 5.23's GGUF reader omits the digit
step; the two agree except where a run of spaces precedes a digit ("in  2024"), where ours matches
the model's training tokenizer.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from safetrade.errors import SafetradeError
from safetrade.hub import resolve_model

__all__ = [
    "CHATML_TEMPLATE",
    "chat_prompt",
    "encode_chat",
    "encode_user_prompts",
    "load_tokenizer",
    "tokenizer_from_gguf",
]

# SmolLM2's format, used when a tokenizer brings no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp's token types (gguf.TokenType): only these two become added tokens.
_CONTROL = 3
_USER_DEFINED = 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2_pre():
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()]
    )


def _split_pre(pattern: str):
    def build():
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    return build


# `tokenizer.ggml.pre` -> pre-tokenizer, grouped as llama.cpp groups them (llama-vocab.cpp).
_PRE_TOKENIZERS = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "mpt", "olmo", "jais"], _gpt2_pre),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _digits_then_gpt2_pre
    ),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], _split_pre(_LLAMA3_SPLIT)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _split_pre(_QWEN2_SPLIT)),
}


# ---------------------------------------------------------------------------------------------
# GGUF -> tokenizer


def tokenizer_from_gguf(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer built from a GGUF file's tokenizer metadata (no torch)."""
    from safetrade.models.gguf_meta import read_gguf  # imports gguf, absent where only HF directories are used

    path = Path(path)
    _, meta = read_gguf(path)
    backend = _backend_from_meta(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    special = {
        name: _token_at(tokens, meta.get(f"tokenizer.ggml.{key}"))
        for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]
    }
    options = {name: token for name, token in special.items() if token is not None}
    context_length = meta.get(f"{meta.get('general.architecture')}.context_length")
    if context_length:
        options["model_max_length"] = context_length
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        # Decoding must give back the exact text that was encoded.
        clean_up_tokenization_spaces=False,
        **options,
    )


def _backend_from_meta(meta: dict[str, Any], path: Path) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SafetradeError(
            f"{path}: tokenizer type {kind!r} is not supported (supported: 'gpt2', byte-level BPE). "
            "Use a Hugging Face model directory with a tokenizer.json for this model."
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise SafetradeError(
            f"{path}: pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(_PRE_TOKENIZERS))}. "
            "Use a Hugging Face model directory with a tokenizer.json for this model."
        )
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(BPE(vocab=_byte_level_vocab(tokens, types), merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    _add_marked_tokens(backend, tokens, types)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise SafetradeError(
            f"{path}: rebuilt vocabulary has {backend.get_vocab_size(with_added_tokens=True)} tokens, "
            f"the file lists {len(tokens)} (duplicate token strings?)"
        )
    return backend


def _byte_level_vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    """token -> id, with any plain token not spelled in the byte alphabet respelled into it.

    Control and user-defined tokens keep their spelling: they are matched whole in the text, so
    the added-token lookup must find them under that spelling.
    """
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[token] = index
    return vocab


def _add_marked_tokens(backend: Tokenizer, tokens: list[str], types: list[int]) -> None:
    # Without this, "<|im_start|>" in a prompt is cut into "<", "|", "im", ... instead of one id.
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # The rest (control bytes, space, ...) are moved up past 255 in byte order.
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


def _token_at(tokens: list[str], index: int | None) -> str | None:
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


# ---------------------------------------------------------------------------------------------
# Loading by path or name


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer of a model: a .gguf file, a Hugging Face directory, or a name `hub.resolve_model` knows."""
    path = resolve_model(path)
    if path.is_file():
        return tokenizer_from_gguf(path)
    if (path / "tokenizer.json").is_file():
        return _from_hf_dir(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return tokenizer_from_gguf(ggufs[0])
    raise SafetradeError(
        f"no tokenizer in {path}: expected a tokenizer.json (Hugging Face format) or exactly one .gguf file"
        + (f", found {len(ggufs)} .gguf files" if ggufs else "")
    )


def _from_hf_dir(path: Path) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many types for a malformed directory
        raise SafetradeError(f"cannot load the tokenizer in {path}: {type(err).__name__}: {err}") from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise SafetradeError(f"{path}: expected a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Chat


Messages = str | list[dict[str, str]]


def chat_prompt(tokenizer: PreTrainedTokenizerFast, messages: Messages, add_generation_prompt: bool = True,
                **template_kwargs: Any) -> str:
    """The prompt text for `messages` in the model's own chat template (ChatML if it has none).

    A plain string is one user message.
    """
    return tokenizer.apply_chat_template(
        _as_messages(messages),
        chat_template=tokenizer.chat_template or CHATML_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **template_kwargs,
    )


def encode_chat(tokenizer: PreTrainedTokenizerFast, messages: Messages, add_generation_prompt: bool = True,
                **template_kwargs: Any) -> list[int]:
    """Token ids of `chat_prompt(...)`.

    The template already writes every special token it wants, so none are added on top (no second BOS).
    """
    text = chat_prompt(tokenizer, messages, add_generation_prompt, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_user_prompts(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str],
                        system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt as one user turn (after a `system` turn when given), ending with the assistant
    header: what a model is asked to continue in generation, evaluation and the refusal margin."""
    prefix = [{"role": "system", "content": system}] if system else []
    return [encode_chat(tokenizer, prefix + [{"role": "user", "content": p}]) for p in prompts]


def _as_messages(messages: Messages) -> list[dict[str, str]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return list(messages)


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, ...]:
    """Token ids that end an assistant turn: eos and, for ChatML models, <|im_end|> (sorted, unknown ids dropped)."""
    candidates = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return tuple(sorted(t for t in candidates if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id))
