#!/usr/bin/env python
"""Golden files for LoRA: does peft load safetrade's PEFT-format adapter and compute the same logits?

Phases (each in its own venv; torch never enters the project venv)
  export  project venv: `python -m tests.golden.make_peft_golden --phase export`
          load data/tiny_gqa_tied with safetrade, add rank-4 adapters on q_proj, v_proj, down_proj (A from
          lora.add_adapters, B redrawn non-zero from a seeded numpy generator, since a fresh B = 0 would hide
          any mistake in B), write data/peft/adapter/ with lora.save_peft and data/peft/export.npz
          (input_ids, safetrade's adapter-forward logits).
  torch   torch venv: `.venv-torch/bin/python tests/golden/make_peft_golden.py --phase torch`
          load data/tiny_gqa_tied with transformers, `PeftModel.from_pretrained(base, data/peft/adapter)`, run the
          input ids, write data/peft/peft_logits.npz and data/peft/report.json; exit non-zero on missing or
          unexpected adapter keys, a tensor that did not land bit-for-bit, a wrong scaling, an adapter with no
          effect, or logits more than PARITY_TOL away from safetrade's.

tests/test_lora.py reads these files with numpy/safetensors/json only. Two runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
BASE_DIR = DATA / "tiny_gqa_tied"
OUT = DATA / "peft"
ADAPTER_DIR = OUT / "adapter"
BASE_NAME = "tests/golden/data/tiny_gqa_tied"  # base_model_name_or_path written into adapter_config.json

SEED = 2024
RANK, ALPHA = 4, 6  # scale 1.5: alpha != 2·rank, so a wrong scaling convention shows
TARGETS = ("q_proj", "v_proj", "down_proj")  # attention (incl. a GQA-narrow output) and MLP, different in/out dims
B_STD = 0.05  # moves the tiny model's logits by ~3 (they span ±7)
PARITY_TOL = 1e-4  # as for the tiny-model parity tests (tests/golden/README.md)
MIN_EFFECT = 0.5  # peft's logits must differ from the base model's by at least this much


# ----------------------------------------------------------------------------------------------------------------
# export phase (project venv)


def export() -> None:
    import jax
    import jax.numpy as jnp

    from safetrade.models import io, llama, lora

    cfg, params = io.load_hf(BASE_DIR)
    lora_cfg, params = lora.add_adapters(cfg, params, llama.LoraConfig(RANK, float(ALPHA), TARGETS),
                                         jax.random.key(SEED))
    base, adapters = lora.split(params)
    rng = np.random.default_rng(SEED)  # drawn in tree order (sorted keys): attn q_proj, v_proj, mlp down_proj

    def redraw_b(path, leaf):
        if path[-1].key != "lora_b":
            return leaf
        return jnp.asarray(rng.normal(0.0, B_STD, leaf.shape).astype(np.float32))

    adapters = jax.tree_util.tree_map_with_path(redraw_b, adapters)
    params = lora.combine(base, adapters)

    expected = np.load(BASE_DIR / "expected.npz")
    input_ids = expected["input_ids"]
    logits, _ = llama.forward(lora_cfg, params, jnp.asarray(input_ids))
    logits = np.asarray(logits, np.float32)
    effect = float(np.abs(logits - expected["logits"]).max())
    assert effect > MIN_EFFECT, f"the adapter moves the logits by only {effect:.3f}"

    OUT.mkdir(parents=True, exist_ok=True)
    for stale in ADAPTER_DIR.glob("*"):
        stale.unlink()
    lora.save_peft(ADAPTER_DIR, lora_cfg, adapters, base_model_name_or_path=BASE_NAME)
    np.savez_compressed(OUT / "export.npz", input_ids=input_ids, safetrade_logits=logits)
    print(f"wrote {ADAPTER_DIR} (rank {RANK}, alpha {ALPHA}, {', '.join(TARGETS)}) and {OUT / 'export.npz'}; "
          f"adapter moves logits by up to {effect:.3f}")


# ----------------------------------------------------------------------------------------------------------------
# torch phase (torch venv)


def torch_phase() -> list[str]:
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(HERE))
    from make_golden import setup_torch, sha256_file, versions  # noqa: E402  (torch-venv helpers, shared)

    setup_torch()
    exported = np.load(OUT / "export.npz")
    base_logits = np.load(BASE_DIR / "expected.npz")["logits"]
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32, attn_implementation="eager").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, ADAPTER_DIR).eval()
    peft_warnings = [str(w.message) for w in caught if "adapter" in str(w.message).lower()]

    # Every tensor in the file must be a LoRA parameter of the model, bit-for-bit, and every LoRA parameter of the
    # model must come from the file (a missing one would keep peft's own init: random A, zero B).
    file_tensors = load_file(str(ADAPTER_DIR / "adapter_model.safetensors"))
    in_model = {
        name.replace(".default.", "."): p for name, p in model.named_parameters() if ".lora_" in name
    }
    missing = sorted(set(in_model) - set(file_tensors))
    unexpected = sorted(set(file_tensors) - set(in_model))
    not_equal = sorted(k for k in set(in_model) & set(file_tensors) if not torch.equal(in_model[k], file_tensors[k]))
    scalings = sorted({float(m.scaling["default"]) for m in model.modules() if hasattr(m, "scaling")
                       and isinstance(m.scaling, dict) and "default" in m.scaling})

    ids = torch.as_tensor(exported["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy().astype(np.float32)
    np.savez_compressed(OUT / "peft_logits.npz", logits=logits)
    diff = float(np.abs(logits - exported["safetrade_logits"]).max())
    effect = float(np.abs(logits - base_logits).max())

    problems = []
    if peft_warnings:
        problems.append(f"peft warned: {peft_warnings}")
    if missing:
        problems.append(f"missing adapter keys (LoRA parameters not in the file): {missing}")
    if unexpected:
        problems.append(f"unexpected adapter keys (file tensors peft did not use): {unexpected}")
    if not_equal:
        problems.append(f"tensors that did not load bit-for-bit: {not_equal}")
    if scalings != [ALPHA / RANK]:
        problems.append(f"peft scalings {scalings} != [{ALPHA / RANK}]")
    if not effect > MIN_EFFECT:
        problems.append(f"peft logits differ from the base model's by only {effect:.3e}: adapter inactive?")
    if not np.isfinite(diff) or diff > PARITY_TOL:
        problems.append(f"max |peft - safetrade| logits {diff:.3e} > {PARITY_TOL}")
    report = {
        "peft_model_class": type(model).__name__,
        "base_model_class": type(model.get_base_model()).__name__,
        "adapter_tensors": len(file_tensors),
        "lora_parameters_in_model": len(in_model),
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "not_bit_equal": not_equal,
        "peft_warnings": peft_warnings,
        "scalings": scalings,
        "max_abs_diff_vs_safetrade": diff,
        "tolerance": PARITY_TOL,
        "max_abs_effect_vs_base": effect,
        "adapter_sha256": {p.name: sha256_file(p) for p in sorted(ADAPTER_DIR.iterdir())},
        "versions": {"peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": versions()["numpy"], "python": versions()["python"]},
        "ok": not problems,
        "problems": problems,
    }
    (OUT / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    status = "OK" if not problems else "FAIL " + "; ".join(problems)
    print(f"  [peft {peft.__version__}] {len(file_tensors)} adapter tensors, scaling {scalings}, "
          f"max|Δlogits| vs safetrade {diff:.3e}, adapter effect {effect:.3f} -> {status}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["export", "torch"], required=True,
                        help="export: project venv, writes data/peft/adapter + export.npz; torch: torch venv, "
                        "loads them with peft and writes peft_logits.npz + report.json")
    args = parser.parse_args(argv)
    if args.phase == "export":
        export()
        return 0
    problems = torch_phase()
    if problems:
        print("PEFT PARITY FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
