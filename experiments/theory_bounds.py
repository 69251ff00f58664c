"""Case II bounds on a real model: estimated landscape constants against gaps measured in real fine-tuning runs.

    python experiments/theory_bounds.py --aligned runs/align/hf \
        --runs runs/case2/r0.5 runs/case2/r1 runs/case2/r2 runs/case2/r4 --out runs/theory_bounds

Each run is a `safetrade finetune` output dir (OUT_DIR/hf) of the aligned model, typically Case II with several
radii. On fixed batches of held-out rows (--n-rows of the alignment set for L_s, of the capability set for L_f),
with the response-only token-mean loss:
  - measured: r = ‖θ_run − θ_s‖₂ (global, over every parameter), the safety gap G_s = L_s(θ_run) − L_s(θ_s) and
    the capability gain L_f(θ_s) − L_f(θ_run);
  - estimated (theory/landscape.py): ‖∇L_s(θ_s)‖; L_s and L_f = max gradient norm over θ_s, --samples points drawn
    uniformly in the ball B(θ_s, r) and θ_run itself; β = largest |Hessian eigenvalue| of L_s by Lanczos
    (--lanczos-steps, full reorthogonalisation) at θ_s and θ_run.
  - checked (theory/check.py): G_s ≤ L_s·r, G_s ≤ ‖∇L_s(θ_s)‖·r + β r²/2, gain ≤ L_f·r.
The constants are maxima over sampled points, i.e. lower estimates of the true suprema, so a bound built from them
is evidence, not a certificate; a violation is reported as such (wrong estimate or failed assumption).
Writes result.json, bounds.md and bounds.png to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np


def fixed_batch(tokenizer, name: str, n: int, max_len: int, data):
    from safetrade.data import encode_rows, make_batch, take
    from safetrade.train.jobs import held_out, rows_for

    # The alignment job's held-out eval rows (its data section, e.g. 32 rows): never trained on, and the same rows
    # whose losses the training runs log as eval/loss_<name>.
    _, rows = held_out(rows_for(name, data), max(n, data.eval_rows), seed=data.seed)
    examples, _ = encode_rows(tokenizer, take(rows, n, 0), max_len=max_len, policy="truncate", dataset=name)
    return make_batch(examples, max(len(e["input_ids"]) for e in examples), pad_id=tokenizer.pad_token_id or 0)


def main(argv=None) -> None:
    from safetrade.models import io
    from safetrade.tokenizer import load_tokenizer
    from safetrade.train.losses import lm_loss
    from theory import check, landscape

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligned", required=True, help="aligned model (HF dir)")
    p.add_argument("--runs", nargs="+", required=True, help="fine-tuning output dirs (each with hf/)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n-rows", type=int, default=16, help="held-out rows per loss batch")
    p.add_argument("--max-len", type=int, default=256, help="tokens per row")
    p.add_argument("--samples", type=int, default=4, help="random points in each ball for the Lipschitz estimate")
    p.add_argument("--lanczos-steps", type=int, default=8, help="Lanczos steps per smoothness estimate")
    p.add_argument("--align-config", default="experiments/configs/align.yaml",
                   help="the aligned model's job config: its data section defines the alignment set")
    args = p.parse_args(argv)
    from safetrade import config

    data = config.load(config.TrainJob, args.align_config).data
    args.out.mkdir(parents=True, exist_ok=True)

    cfg, aligned = io.load_model(args.aligned)
    tok = load_tokenizer(args.aligned)
    batch_s = fixed_batch(tok, "alignment", args.n_rows, args.max_len, data)
    batch_f = fixed_batch(tok, "capability", args.n_rows, args.max_len, data)

    def loss_s(params):
        return lm_loss(cfg, params, batch_s)

    def loss_f(params):
        return lm_loss(cfg, params, batch_f)

    eval_s, eval_f = jax.jit(loss_s), jax.jit(loss_f)
    base_s, base_f = float(eval_s(aligned)), float(eval_f(aligned))
    grad_norm_s = float(landscape.grad_norm(loss_s, aligned))
    beta_at_aligned = float(landscape.smoothness_along(loss_s, [aligned], method="lanczos",
                                                       num_steps=args.lanczos_steps).max)
    runs = []
    for k, run_dir in enumerate(args.runs):
        _, params = io.load_model(str(Path(run_dir) / "hf"))
        r = float(landscape.tree_norm(landscape.tree_sub(params, aligned)))
        key = jax.random.key(k)
        lip_s = landscape.local_lipschitz(loss_s, aligned, r, args.samples, key, trajectory=[params])
        lip_f = landscape.local_lipschitz(loss_f, aligned, r, args.samples, key, trajectory=[params])
        beta_run = float(landscape.smoothness_along(loss_s, [params], method="lanczos",
                                                    num_steps=args.lanczos_steps).max)
        runs.append({"name": Path(run_dir).name, "strategy": "case2", "distance": r,
                     "safety_gap": float(eval_s(params)) - base_s, "capability_gain": base_f - float(eval_f(params)),
                     "lipschitz_s": float(lip_s.max), "lipschitz_f": float(lip_f.max), "grad_norm_s": grad_norm_s,
                     "smoothness_s": max(beta_at_aligned, beta_run)})
        print(json.dumps(runs[-1]), flush=True)
        del params
    checks = check.check_runs(runs)
    table = check.format_table(checks)
    (args.out / "bounds.md").write_text(table + "\n")
    check.plot(checks, args.out / "bounds.png")
    (args.out / "result.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "runs": runs, "summary": check.summary(checks)}, indent=1))
    print(table)
    print(json.dumps(check.summary(checks), indent=1))
    print("note: constants are sampled maxima (lower estimates); a violation means a wrong estimate or assumption",
          np.sum([c.violated for c in checks]))


if __name__ == "__main__":
    main()
