"""safetrade.tokenizer: GGUF -> tokenizers without torch, checked against transformers' own ids.

The reference is tests/golden/data/tokenizer_ids.json, written by tests/golden/make_golden.py from
transformers' GGUF tokenizer (which needs torch). Fast tests use a tiny GGUF written here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer

from safetrade.errors import MissingPathError, SafetradeError
from safetrade.models.gguf_meta import read_gguf
from safetrade.tokenizer import (
    CHATML_TEMPLATE,
    _byte_alphabet,
    chat_prompt,
    encode_chat,
    load_tokenizer,
    tokenizer_from_gguf,
)

GOLDEN = Path(__file__).parent / "golden" / "data" / "tokenizer_ids.json"

TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "Ġ Ġ"]


def write_tiny_gguf(path: Path, model: str = "gpt2", pre: str | None = "smollm", chat_template: str | None = None):
    """A metadata-only GGUF: 3 control tokens, 1 user-defined, the 256 byte tokens and a few merges."""
    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    tokens += [_byte_alphabet()[b] for b in range(256)] + [m.replace(" ", "") for m in TINY_MERGES]
    writer.add_context_length(64)
    writer.add_tokenizer_model(model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, 4] + [1] * (len(tokens) - 4))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tokenizer_from_gguf(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


@pytest.fixture(scope="session")
def golden():
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: run `make golden` (tests/golden/make_golden.py) to create it"
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="session")
def smol(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


# ---- fast: a tiny synthetic GGUF ---------------------------------------------------------------


def test_tiny_bpe_merges_and_special_tokens(tiny):
    ids = tiny.encode("hello world")
    assert tiny.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    ids = tiny.encode("<|im_start|>hi<think><|im_end|>")
    assert tiny.convert_ids_to_tokens(ids) == ["<|im_start|>", "h", "i", "<think>", "<|im_end|>"]
    assert (tiny.bos_token, tiny.eos_token, tiny.pad_token, tiny.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert "<|im_end|>" in tiny.all_special_tokens and "<think>" not in tiny.all_special_tokens
    assert len(tiny) == 4 + 256 + len(TINY_MERGES)
    assert tiny.model_max_length == 64


@pytest.mark.parametrize("text", ["hello world", "日本語 🤖", "  x\n\n\ty  ", "", "<|im_start|>a<think>b"])
def test_tiny_roundtrip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_smollm_pre_tokenizer_isolates_digits(tiny):
    # llama.cpp's "smollm" split (and SmolLM2's tokenizer.json): digits first, then the GPT-2 regex,
    # so a run of spaces before a number stays one piece.
    pieces = [p for p, _ in tiny.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in  2024")]
    assert pieces == ["in", "ĠĠ", "2", "0", "2", "4"]


def test_chatml_fallback_and_plain_string(tiny):
    assert tiny.chat_template is None
    text = chat_prompt(tiny, "hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(tiny, [{"role": "user", "content": "hello"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhello<|im_end|>\n")
    ids = encode_chat(tiny, "hello")
    assert ids[0] == tiny.bos_token_id and ids.count(tiny.bos_token_id) == 2
    assert tiny.decode(ids) == text


def test_template_from_gguf_is_used(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    tok = tokenizer_from_gguf(write_tiny_gguf(tmp_path / "t.gguf", chat_template=template))
    assert tok.chat_template == template
    assert chat_prompt(tok, "hi", add_generation_prompt=False) == "[user]hi"
    assert CHATML_TEMPLATE != template


def test_unsupported_tokenizer_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "spm.gguf", model="llama", pre=None)
    with pytest.raises(SafetradeError) as info:
        tokenizer_from_gguf(path)
    assert str(path) in str(info.value) and "'llama'" in str(info.value) and "gpt2" in str(info.value)


def test_unknown_pre_tokenizer(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", pre="something-new")
    with pytest.raises(SafetradeError, match="something-new"):
        tokenizer_from_gguf(path)


def test_not_a_gguf_and_missing(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(SafetradeError, match="bogus.gguf.*not a GGUF"):
        read_gguf(bogus)
    with pytest.raises(MissingPathError, match="absent.gguf"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(MissingPathError):
        load_tokenizer(tmp_path / "absent.gguf")


def test_read_gguf_gives_plain_values(tmp_path):
    _, meta = read_gguf(write_tiny_gguf(tmp_path / "t.gguf"))
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["llama.context_length"] == 64 and type(meta["llama.context_length"]) is int
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.merges"] == TINY_MERGES
    assert meta["tokenizer.ggml.token_type"][:5] == [3, 3, 3, 4, 1]


def test_load_tokenizer_dispatch(tmp_path, tiny):
    gguf_dir = tmp_path / "gguf_dir"
    gguf_dir.mkdir()
    write_tiny_gguf(gguf_dir / "m.gguf")
    assert load_tokenizer(gguf_dir / "m.gguf").encode("hello") == tiny.encode("hello")
    assert load_tokenizer(gguf_dir).encode("hello") == tiny.encode("hello")  # the one .gguf inside

    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(SafetradeError, match="empty_model.*tokenizer.json"):
        load_tokenizer(empty)


def test_save_and_reload_tiny(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    for text in ["hello world", "<|im_start|>hi<think>  12"]:
        assert again.encode(text) == tiny.encode(text)
    assert "torch" not in sys.modules


# ---- slow: the real SmolLM2 GGUF against transformers' golden ids -----------------------------


@pytest.mark.slow
def test_ids_match_transformers(smol, golden):
    assert len(golden["strings"]) == len(golden["ids"]) > 0
    for text, ids in zip(golden["strings"], golden["ids"]):
        assert smol.encode(text, add_special_tokens=False) == ids, text


@pytest.mark.slow
def test_decode_roundtrip(smol, golden):
    for text in golden["strings"]:
        assert smol.decode(smol.encode(text)) == text


@pytest.mark.slow
def test_special_tokens_match(smol, golden):
    for name, (token, token_id) in golden["special_tokens"].items():
        assert (getattr(smol, f"{name}_token"), getattr(smol, f"{name}_token_id")) == (token, token_id)
    assert len(smol) == 49152


@pytest.mark.slow
def test_chat_matches_transformers(smol, golden):
    assert golden["chat"]
    for case in golden["chat"]:
        assert chat_prompt(smol, case["messages"], case["add_generation_prompt"]) == case["rendered"]
        assert encode_chat(smol, case["messages"], case["add_generation_prompt"]) == case["ids"]


@pytest.mark.slow
def test_no_torch_imported(smol):
    assert "torch" not in sys.modules


@pytest.mark.slow
def test_save_pretrained_reloads_identically(smol, golden, tmp_path):
    smol.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == smol.chat_template
    for text, ids in zip(golden["strings"], golden["ids"]):
        assert reloaded.encode(text, add_special_tokens=False) == ids, text
    for case in golden["chat"]:
        assert encode_chat(reloaded, case["messages"], case["add_generation_prompt"]) == case["ids"]
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (smol.bos_token, smol.eos_token,
                                                                            smol.pad_token)
    assert "torch" not in sys.modules


@pytest.mark.slow
def test_load_tokenizer_by_name(smollm2_gguf, golden):
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.encode(golden["strings"][0], add_special_tokens=False) == golden["ids"][0]
