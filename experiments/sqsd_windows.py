"""SQSD window experiment: rank a benign pool, fine-tune the aligned model on each window, measure ASR per window.

    python experiments/sqsd_windows.py --aligned runs/align/hf --out runs/sqsd_windows \
        [--pool capability --pool-size 500 --methods sqsd random gradient --window-steps 20 --filter-k 50]

1. Directions: three LoRA adapters on the aligned model, all seven projections (the official setting), trained with
   the training engine: "initial" (a few steps on the benign pool's source), "danger" (harmful Q+A attack set),
   "safety" (proxy refusals). Cached: an adapter dir that exists is reused.
2. Scores: each --methods scorer (safetrade/sqsd_job.py) ranks the same pool; 5 equal windows, S1 = highest risk.
3. Windows: the aligned model is fine-tuned (full parameters, plain SFT, --window-steps steps) on each window and
   evaluated: keyword ASR and refusal margin on held-out harmful prompts. The claim: ASR falls from S1 to S5 for
   SQSD. Reported per method: Spearman correlation of window index vs ASR (negative = claim holds) and S1 − S5.
4. Filtering (--filter-k > 0): fine-tune on the pool minus its top-k SQSD samples and minus k random samples.
Writes result.json and windows.png to --out. Every fine-tune and evaluation is a cached sub-run (re-running skips
what exists), so the study can be interrupted and resumed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

LORA_ALL = "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def train(config: str, out: Path, overrides: list[str]) -> Path:
    from safetrade import config as config_lib
    from safetrade.train.jobs import run_train_job

    if not (out / "summary.json").exists():
        run_train_job(config_lib.load(config_lib.TrainJob, config, [f"out_dir={out}", *overrides]))
    return out


def asr(model: str, out: Path, n: int) -> dict:
    from safetrade.evaluate.suite import EvalConfig, run_evaluation

    if out.exists():
        record = json.loads(out.read_text())
    else:
        record = run_evaluation(EvalConfig(model=model, harmful=("heldout",), n_harmful=n, benign=None,
                                           judges=("keyword",), max_new_tokens=48), out=out)
    return {"asr": record["metrics"]["asr/heldout"], "refusal_margin": record["metrics"]["refusal_margin/heldout"]}


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "response": r["response"], "id": r["id"]}) + "\n")
    return path


def main(argv=None) -> None:
    from scipy.stats import spearmanr

    from safetrade.sqsd_job import SQSDJob, pool_rows, run_sqsd_job

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligned", required=True, help="aligned model (HF dir)")
    p.add_argument("--out", type=Path, required=True, help="output folder (sub-runs are cached there)")
    p.add_argument("--pool", default="capability", help="benign pool: built set, dataset or file")
    p.add_argument("--pool-size", type=int, default=500, help="rows of the pool to rank")
    p.add_argument("--methods", nargs="+", default=["sqsd", "random", "gradient"], help="scorers to compare")
    p.add_argument("--adapter-steps", type=int, default=40, help="steps of the danger/safety adapters")
    p.add_argument("--window-steps", type=int, default=20, help="fine-tuning steps per window")
    p.add_argument("--n-eval", type=int, default=100, help="held-out harmful prompts per evaluation")
    p.add_argument("--filter-k", type=int, default=0, help="filtering study: remove the top-k (0 skips)")
    p.add_argument("--seed", type=int, default=0, help="pool subset and random-baseline seed")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = [f"model.name={args.aligned}"]
    lora = ["lora.enabled=true", LORA_ALL]
    adapters = {
        "initial": train("experiments/configs/benign.yaml", out / "adapters" / "initial", [*model, *lora, "steps=10"]),
        "danger": train("experiments/configs/finetune.yaml", out / "adapters" / "danger",
                        [*model, *lora, f"steps={args.adapter_steps}", "data.train=attack", "optim.lr=2e-4"]),
        "safety": train("experiments/configs/finetune.yaml", out / "adapters" / "safety",
                        [*model, *lora, f"steps={args.adapter_steps}", "data.train=proxy", "optim.lr=2e-4"]),
    }
    rows = pool_rows(args.pool, args.pool_size, args.seed)
    result = {"args": {k: str(v) for k, v in vars(args).items()},
              "aligned": asr(args.aligned, out / "eval_aligned.json", args.n_eval), "methods": {}}
    for method in args.methods:
        job = SQSDJob(model=args.aligned, method=method, pool=args.pool, n=args.pool_size, seed=args.seed,
                      out=str(out / f"scores_{method}.jsonl"),
                      **({k: str(v / "adapter") for k, v in adapters.items()} if method == "sqsd" else {}))
        _, scores, windows = run_sqsd_job(job, rows=rows)
        per_window = []
        for w, members in enumerate(windows, start=1):
            data = write_rows([rows[i] for i in members], out / method / f"window{w}.jsonl")
            run = train("experiments/configs/benign.yaml", out / method / f"ft_window{w}",
                        [*model, f"data.train={data}", f"steps={args.window_steps}", "data.eval_sets=[proxy]"])
            per_window.append({"window": w, "size": len(members),
                               "mean_score": float(np.nanmean(np.asarray(scores.score)[members])),
                               **asr(str(run / "hf"), out / method / f"eval_window{w}.json", args.n_eval)})
        rho = spearmanr([r["window"] for r in per_window], [r["asr"] for r in per_window]).statistic
        result["methods"][method] = {"windows": per_window, "spearman_window_vs_asr": float(rho),
                                     "s1_minus_s5_asr": per_window[0]["asr"] - per_window[-1]["asr"]}
        if method == "sqsd" and args.filter_k:
            order = np.argsort(-np.nan_to_num(np.asarray(scores.score), nan=-np.inf))
            rng = np.random.default_rng(args.seed)
            keep = {"minus_top_sqsd": [rows[i] for i in sorted(order[args.filter_k:])],
                    "minus_random": [rows[i] for i in sorted(rng.permutation(len(rows))[args.filter_k:])]}
            result["filtering"] = {}
            for name, kept in keep.items():
                data = write_rows(kept, out / "filter" / f"{name}.jsonl")
                run = train("experiments/configs/benign.yaml", out / "filter" / name,
                            [*model, f"data.train={data}", f"steps={args.window_steps}", "data.eval_sets=[proxy]"])
                result["filtering"][name] = asr(str(run / "hf"), out / "filter" / f"eval_{name}.json", args.n_eval)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "windows.png")
    print(json.dumps({m: {k: v for k, v in r.items() if k != "windows"} for m, r in result["methods"].items()},
                     indent=1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in result["methods"].items():
        ax.plot([w["window"] for w in r["windows"]], [w["asr"] for w in r["windows"]], "o-",
                label=f"{method} (ρ = {r['spearman_window_vs_asr']:.2f})")
    ax.axhline(result["aligned"]["asr"], color="k", ls=":", label="aligned")
    ax.set_xlabel("window (1 = highest predicted risk)")
    ax.set_ylabel("ASR after fine-tuning on the window")
    ax.set_xticks(range(1, 6))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
