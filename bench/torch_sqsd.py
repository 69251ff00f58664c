"""Reference half of bench/sqsd.py: the official SQSD scoring loop, written in PyTorch on HF transformers + peft.

Run by bench/sqsd.py with the torch venv's python (torch never enters the project venv):

    .venv-torch/bin/python bench/torch_sqsd.py --spec spec.json

`spec.json` (written by sqsd.py) names the base HF dir, the three PEFT adapter dirs (initial, danger, safety),
the safety scaling override, and the samples as unpadded token-id lists with their loss masks (the ids safetrade
scores). Prints one JSON line on stdout, the last line of output: per-sample P_danger, P_safe, timings, memory.

An independent implementation with the *structure* of the released code (Jason-wx/SQSD,
`projection_grad_vector_check-initial*.py` for the danger side and `projection_grad_vector_scale*.py` for the
safety side; what they compute is described in docs/sqsd.md, "The official procedure"):

  * batch size 1; per sample: zero the adapter gradients, forward with labels (prompt tokens -100), token-mean
    cross-entropy, backward into the active adapter's lora_A / lora_B only;
  * per LoRA-wrapped Linear m, the first-order induced update in torch's layout δW_m = −(∇_B·A + B·∇_A)
    [out, in] is materialised, as the official `compute_task_vector_delta_step` does, and compared by cosine
    with the direction's merged B_d·A_d [out, in] (materialised once per direction, before the loop);
  * P = Σ_m cos(δW_m, D_m) over every (layer, projection) pair;
  * danger: at the "initial" adapter with its own scaling, against the danger adapter's B·A;
    safety: at the safety adapter with its scaling overridden to --safety-scale, against its own B·A.

Deliberate differences from the official scripts, so the two sides compute the same thing: fp32 throughout (they
cast gradients and B·A to bf16), and a sample without response tokens is reported as NaN (it gets 0 there).
torch's cosine_similarity clamps each norm at eps = 1e-8, as the official code relies on.

Timing: "danger" and "safety" are each the wall time of its whole per-sample loop (forward, backward, the update
and the cosines, the host copy of the score); loading the model and adapters and building the directions are
outside (reported as load_s). Peak memory: the process's peak resident set (VmHWM), after loading and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident set (VmHWM) in MiB. Not getrusage's ru_maxrss: that survives fork + exec, so it would report
    the JAX parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lora_modules(model, adapter: str) -> dict:
    """{module name: LoRA-wrapped Linear} of every layer that carries `adapter`, in model order."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})}


def merged_directions(model, adapter: str) -> dict:
    """{module name: B·A [out, in]} of `adapter`: the official direction, scaling left out (cosines ignore it)."""
    import torch

    with torch.no_grad():
        return {name: (m.lora_B[adapter].weight.float() @ m.lora_A[adapter].weight.float()).contiguous()
                for name, m in lora_modules(model, adapter).items()}


def projection_loop(model, adapter: str, directions: dict, samples: list, scale: float | None) -> tuple[list, float]:
    """Σ_m cos(δW_m(z), D_m) for every sample z at `adapter` (scaling overridden when `scale` is given)."""
    import torch
    import torch.nn.functional as F

    model.set_adapter(adapter)
    modules = lora_modules(model, adapter)
    missing = sorted(set(directions) - set(modules))
    if missing:
        raise KeyError(f"adapter {adapter!r} has no LoRA layer at {missing[:3]} (the direction has one there)")
    for m in modules.values():
        if scale is not None:
            m.scaling[adapter] = scale  # the official scaling override ("alpha = scaling_overried/2")
    # Gradients only for the active adapter's factors; the base weights and any other adapter stay frozen.
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.lora_A[adapter].weight.requires_grad_(True)
        m.lora_B[adapter].weight.requires_grad_(True)

    scores = []
    start = time.perf_counter()
    for ids, mask in samples:
        input_ids = torch.tensor([ids], dtype=torch.long)
        labels = torch.where(torch.tensor([mask]) > 0, input_ids, torch.full_like(input_ids, -100))
        if int((labels[0, 1:] != -100).sum()) == 0:
            scores.append(float("nan"))  # no response token: no loss, no update (official: 0, then dropped)
            continue
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        total = 0.0
        with torch.no_grad():
            for name, m in modules.items():
                a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight  # [r, in], [out, r]
                delta = -(b.grad @ a + b @ a.grad)  # [out, in]; the second-order ∇_B·∇_A is dropped
                total += float(F.cosine_similarity(delta.flatten(), directions[name].flatten(), dim=0, eps=1e-8))
        scores.append(total)
    return scores, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="JSON written by bench/sqsd.py")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = os.cpu_count()")
    args = ap.parse_args(argv)

    try:
        import peft
        import torch
        import transformers
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except Exception as exc:  # noqa: BLE001 - the caller reports why torch numbers are missing
        print(json.dumps({"ok": False, "error": f"cannot import torch/transformers/peft: {exc!r}"}))
        return 1

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    spec = json.loads(Path(args.spec).read_text())
    rss_start = peak_rss_mib()

    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(spec["base_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, spec["initial_dir"], adapter_name="initial")
    model.load_adapter(spec["danger_dir"], adapter_name="danger")
    model.load_adapter(spec["safety_dir"], adapter_name="safety")
    model.eval()  # no dropout (the adapters have none either); gradients still flow
    danger_directions = merged_directions(model, "danger")
    safety_directions = merged_directions(model, "safety")
    samples = [(s["input_ids"], s["loss_mask"]) for s in spec["samples"]]
    load_s = time.perf_counter() - t
    rss_loaded = peak_rss_mib()

    p_danger, danger_s = projection_loop(model, "initial", danger_directions, samples, None)
    print(f"[torch] danger projection: {len(samples)} samples in {danger_s:.2f}s", file=sys.stderr, flush=True)
    p_safe, safety_s = projection_loop(model, "safety", safety_directions, samples, float(spec["safety_scale"]))
    print(f"[torch] safety projection: {len(samples)} samples in {safety_s:.2f}s", file=sys.stderr, flush=True)

    def json_number(x):
        return None if x != x else x  # NaN -> null

    print(json.dumps({
        "ok": True, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "threads": threads, "load_s": load_s, "n_samples": len(samples), "n_modules": len(danger_directions),
        "timings": {"danger": danger_s, "safety": safety_s, "total": danger_s + safety_s},
        "p_danger": [json_number(x) for x in p_danger], "p_safe": [json_number(x) for x in p_safe],
        "peak_rss_mib": {"start": rss_start, "after_load": rss_loaded, "end": peak_rss_mib()},
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - always leave one JSON line for the caller
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
