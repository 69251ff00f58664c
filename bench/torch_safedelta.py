"""Reference half of bench/safedelta.py: the official Safe Delta procedure, written in PyTorch on HF transformers.

Run by bench/safedelta.py with the torch venv's python (torch never enters the project venv):

    .venv-torch/bin/python bench/torch_safedelta.py --spec spec.json

`spec.json` (written by safedelta.py) names the aligned HF dir, the fine-tuned HF dir, the calibration token ids
(one unpadded list per sequence: the same ids safetrade batches), s, and where to write the resulting kernels.
Prints one JSON line on stdout, the last line of output.

This is an independent implementation with the *structure* of the released code (ColinLu50/SafeDelta,
`safedelta_runner.py` + `run_safedelta.py`; behaviour as docs/safedelta.md describes it), so that the
benchmark times what a user of the official code would wait for:

  * the aligned model's decoder layers are run one at a time: a stand-in for layer 0 captures every calibration
    sequence's hidden states and layer kwargs (batch 1, no padding, no lm_head), then each layer is run over all
    sequences with forward hooks on its nn.Linear modules accumulating H = (2/N) Σ_n X_nᵀ X_n as a running mean
    (one accumulator per Linear, as the official runner keeps one per Linear: q/k/v and gate/up each build the
    same H again; `--shared-hessians` builds each distinct input once instead);
  * the layer's outputs, which feed the next layer, come from that same forward, before the layer is edited, so
    every layer sees aligned activations;
  * each Linear of the layer then goes through `adjust_delta` (below) and its weight is replaced in place.

Timing: "hessians" is the capture pass plus every layer's hooked forward; "transform" is every adjust_delta call
including the weight write. The two are interleaved layer by layer, so each is a sum of its own intervals (with a
CUDA sync at every switch when running on a GPU); "total" is the wall time of the whole loop. Model loading and
the fine-tuned state dict are outside all three. With --repeats > 1 the aligned weights are restored (untimed)
before each run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears reading the same tensor (used only with --shared-hessians): the first of each group owns the hook.
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


class HessianAccumulator:
    """H = (2/N) Σ_n X_nᵀ X_n kept as a running mean over sequences (N counts sequences, all tokens count)."""

    def __init__(self, d: int, device):
        import torch

        self.h = torch.zeros(d, d, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x):
        batch = x.shape[0] if x.dim() == 3 else 1  # sequences in this call ([B, T, d]; B = 1 here)
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, d]
        # Rescale the mean so far, then add these sequences with weight 2/N_new: the same running mean as the
        # official add_batch, which never holds the unnormalised sum.
        self.h.mul_(self.n / (self.n + batch))
        self.n += batch
        x = x * math.sqrt(2.0 / self.n)
        self.h.addmm_(x.t(), x)


def adjust_delta(weight_cur, weight_sft, hessian, s: float, block: int = 2048, damp: float = 0.01,
                 exclude: float = 0.15, group: int = 4, stable: bool = False):
    """The official per-layer rule on W [out, in] (call under no_grad): returns (new W, selected entry count)."""
    import torch

    w = weight_cur.float().clone()
    w_sft = weight_sft.float()
    rows, cols = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # an input that never fired: unit curvature, so the factorisation exists
    idx = torch.arange(cols, device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    # Upper factor U of H⁻¹ (H⁻¹ = UᵀU) by the official three-step route; d_j = U_jj below.
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(h_inv, upper=True)

    kept = 0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()  # already carries compensation pushed from earlier blocks
        w2 = w_sft[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        d = torch.diag(u1)
        key = (1.0 / d**2).expand(rows, count)  # sort key: small = cheap in safety; constant per column
        loss = ((w2 - w1) ** 2 / d**2).flatten()
        order = torch.argsort(key.flatten(), stable=stable)
        n_drop = int(exclude * key.numel())
        # Python slice semantics on purpose: `order[:-0]` is empty, exactly like the official slice.
        candidates = order[:-n_drop] if n_drop else order[:0]
        budget = key.mean() * (s / 2) * (rows / 4096)  # official s/2 ("4096 / blocksize") for every block
        chosen = candidates[torch.cumsum(loss[candidates], 0) <= budget]
        mask = torch.zeros(rows * count, dtype=torch.bool, device=w.device)
        mask[chosen] = True
        mask = mask.view(rows, count)
        kept += int(chosen.numel())

        q_block = torch.zeros_like(w1)
        err_block = torch.zeros_like(w1)
        for c1 in range(0, count, group):
            c2 = min(c1 + group, count)
            current = w1[:, c1:c2]
            q = torch.where(mask[:, c1:c2], w2[:, c1:c2], current)
            err = (current - q) / d[c1:c2]
            # Push into the block's columns after this group only (no propagation inside the group).
            w1[:, c2:] -= err @ u1[c1:c2, c2:]
            q_block[:, c1:c2] = q
            err_block[:, c1:c2] = err
        w[:, i1:i2] = q_block
        w[:, i2:] -= err_block @ u[i1:i2, i2:]
    return w, kept


class StopForward(Exception):
    """Raised by the layer-0 stand-in once it has what it needs: the rest of the model is never run."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="JSON written by bench/safedelta.py")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = os.cpu_count()")
    ap.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--stable-sort", action="store_true",
                    help="stable argsort in the selection (the official code's is unstable); for diagnosis")
    ap.add_argument("--shared-hessians", action="store_true",
                    help="one H per distinct linear input instead of one per Linear (not the official structure)")
    args = ap.parse_args(argv)

    try:
        import torch
        import transformers
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
    except Exception as exc:  # noqa: BLE001 - the caller reports why torch numbers are missing
        print(json.dumps({"ok": False, "error": f"cannot import torch/transformers: {exc!r}"}))
        return 1

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    # The official code turns TF32 off: the OBS arithmetic is done in full fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = json.loads(Path(args.spec).read_text())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------------------------------------ models

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["aligned_dir"], dtype=torch.float32).to(device).eval()
    finetuned = {}
    for file in sorted(Path(spec["finetuned_dir"]).glob("*.safetensors")):
        finetuned.update(load_file(str(file), device=str(device)))
    layers = model.model.layers
    n_layers = len(layers)
    names = [f"model.layers.{i}.{p}.weight" for i in range(n_layers) for p in PROJECTIONS]
    linears = {f"model.layers.{i}.{p}.weight": layers[i].get_submodule(p) for i in range(n_layers) for p in PROJECTIONS}
    missing = [n for n in names if n not in finetuned]
    if missing:
        raise KeyError(f"fine-tuned checkpoint lacks {missing[:3]}")
    finetuned = {n: finetuned[n].float() for n in names}  # only the projections are edited; drop the rest
    aligned_copy = {n: linear.weight.detach().clone() for n, linear in linears.items()}
    sequences = [torch.tensor([ids], dtype=torch.long, device=device) for ids in spec["calibration"]]
    load_s = time.perf_counter() - t0
    s = float(spec["s"])

    def one_run():
        clock = {"hessians": 0.0, "transform": 0.0}
        kept = {}
        start = time.perf_counter()

        # Capture layer 0's inputs: a stand-in module records hidden states + kwargs, then stops the forward.
        class Capture(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.seen = []

            def forward(self, hidden, **kwargs):
                kwargs.pop("past_key_values", None)
                kwargs["use_cache"] = False
                self.seen.append((hidden, kwargs))
                raise StopForward

        t = time.perf_counter()
        capture = Capture(layers[0])
        layers[0] = capture
        try:
            with torch.no_grad():
                for ids in sequences:
                    try:
                        model(input_ids=ids, use_cache=False)
                    except StopForward:
                        pass
        finally:
            layers[0] = capture.inner
        inputs = [h for h, _ in capture.seen]
        layer_kwargs = [kw for _, kw in capture.seen]
        sync()
        clock["hessians"] += time.perf_counter() - t

        for i in range(n_layers):
            layer = layers[i]
            t = time.perf_counter()
            accumulators, hooks = {}, []
            for p in PROJECTIONS:
                if args.shared_hessians and p in SHARED_INPUT:
                    continue
                linear = linears[f"model.layers.{i}.{p}.weight"]
                acc = accumulators[p] = HessianAccumulator(linear.in_features, device)
                hooks.append(linear.register_forward_hook(lambda _m, inp, _out, acc=acc: acc.add(inp[0].data)))
            outputs = []
            with torch.no_grad():
                for hidden, kwargs in zip(inputs, layer_kwargs):
                    out = layer(hidden, **kwargs)
                    outputs.append(out[0] if isinstance(out, tuple) else out)  # older transformers return tuples
            for hook in hooks:
                hook.remove()
            sync()
            clock["hessians"] += time.perf_counter() - t

            t = time.perf_counter()
            for p in PROJECTIONS:
                name = f"model.layers.{i}.{p}.weight"
                linear = linears[name]
                acc = accumulators[SHARED_INPUT.get(p, p) if args.shared_hessians else p]
                new, n_kept = adjust_delta(linear.weight.data, finetuned[name], acc.h, s, stable=args.stable_sort)
                linear.weight.data = new.to(linear.weight.dtype)
                kept[name] = n_kept / new.numel()
            del accumulators
            sync()
            clock["transform"] += time.perf_counter() - t
            inputs = outputs  # aligned activations: computed before this layer was edited

        clock["total"] = time.perf_counter() - start
        return clock, kept

    runs = []
    kept = {}
    for r in range(max(1, args.repeats)):
        if r:  # back to the aligned weights, untimed
            for n, value in aligned_copy.items():
                linears[n].weight.data = value.clone()
        clock, kept = one_run()
        runs.append(clock)
        print(f"[torch] run {r + 1}: hessians {clock['hessians']:.2f}s, transform {clock['transform']:.2f}s, "
              f"total {clock['total']:.2f}s", file=sys.stderr, flush=True)

    t = time.perf_counter()
    save_file({n: linears[n].weight.detach().float().contiguous().cpu() for n in names}, spec["result_path"])
    save_s = time.perf_counter() - t

    def summary(stage):
        values = [c[stage] for c in runs]
        return {"first": values[0], "steady": statistics.median(values[1:]) if len(values) > 1 else None,
                "runs": values}

    total_entries = sum(finetuned[n].numel() for n in names)
    print(json.dumps({
        "ok": True, "torch": torch.__version__, "transformers": transformers.__version__, "threads": threads,
        "device": str(device), "stable_sort": args.stable_sort, "shared_hessians": args.shared_hessians,
        "load_s": load_s, "save_s": save_s, "n_sequences": len(sequences),
        "timings": {stage: summary(stage) for stage in ("hessians", "transform", "total")},
        "kept": kept, "kept_fraction": sum(kept[n] * finetuned[n].numel() for n in names) / total_entries,
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - always leave one JSON line for the caller
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
