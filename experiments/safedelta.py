"""Safe Delta on attacked and benign fine-tunes: s sweep, ablations, safety-utility curve.

    python experiments/safedelta.py --aligned runs/align/hf --attacked runs/strategies/sft/hf \
        --benign runs/benign/hf --out runs/safedelta_study [--s 0.02 0.05 0.1 0.2 0.5] [--ablations no_compensation]

For each fine-tune (attacked: harmful Q+A; benign: GSM8K capability set) and each s, runs `safetrade safedelta`
(safetrade/safedelta/job.py; the safety Hessians are computed once and reused from the cache), then evaluates the
aligned model, each fine-tune and each Safe Delta result with the evaluation suite: keyword ASR on held-out harmful
prompts, over-refusal on held-out benign prompts, and utility = response loss on held-out GSM8K answers (lower is
better; the benign fine-tune's "utility gain" is the aligned loss minus the fine-tuned loss). Ablations run at the
first s only. Finished Safe Delta runs and evaluations in --out are reused, so a re-run with more s values (or
--mode paper, whose runs are labelled _paper) only does the new ones. Writes result.json and curve.png (ASR and share of the utility gain kept, over s) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safety_eval import evaluate_model  # experiments/safety_eval.py: this script's folder is on sys.path

from safetrade.safedelta import SafeDeltaConfig
from safetrade.safedelta.job import SafeDeltaJob, run_safe_delta_job


def evaluate(model: str, out: Path, n: int, seed: int) -> dict:
    """experiments/safety_eval.py's numbers for one model (the same prompts, judge and decoding as the other studies)."""
    r = evaluate_model(model, n, n, max_new_tokens=48, batch_size=16, seed=seed, out=out)
    return {"model": model, "asr": 1.0 - r["harmful_refusal_rate"], "over_refusal": r["benign_refusal_rate"],
            "gsm8k_loss": r["benign_loss"], "refusal_margin": r["refusal_margin"]}


def plot(results: dict, path: Path) -> None:
    """Left: ASR over s per fine-tune (log s), with the fine-tuned and aligned levels. Right: the share of each
    fine-tune's utility gain (aligned GSM8K-answer loss − model's) that Safe Delta keeps, over s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aligned = results["aligned"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.axhline(aligned["asr"], color="k", ls=":", lw=1, label="aligned")
    for k, (name, runs) in enumerate(results["finetunes"].items()):
        base = runs["finetuned"]
        sweep = sorted(runs["safedelta"], key=lambda r: r["s"])
        s_values = [r["s"] for r in sweep]
        ax.plot(s_values, [r["asr"] for r in sweep], "o-", color=f"C{k}", label=f"{name} + Safe Delta")
        ax.axhline(base["asr"], color=f"C{k}", ls="--", lw=1, label=f"{name} fine-tune")
        gain = aligned["gsm8k_loss"] - base["gsm8k_loss"]
        if gain > 0:
            kept = [100 * (aligned["gsm8k_loss"] - r["gsm8k_loss"]) / gain for r in sweep]
            ax2.plot(s_values, kept, "o-", color=f"C{k}", label=f"{name} + Safe Delta")
        for r in runs["ablations"]:
            ax.plot([r["s"]], [r["asr"]], "s", color=f"C{k}", mfc="none", label=f"{name}: {r['ablation']}")
            if gain > 0:
                ax2.plot([r["s"]], [100 * (aligned["gsm8k_loss"] - r["gsm8k_loss"]) / gain], "s", color=f"C{k}",
                         mfc="none", label=f"{name}: {r['ablation']}")
    ax.set_xscale("log")
    ax.set_xlabel("Safe Delta budget scale s")
    ax.set_ylabel("ASR, held-out harmful prompts (keyword)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax2.axhline(90, color="gray", ls=":", lw=1, label="90 % target")
    ax2.set_xscale("log")
    ax2.set_xlabel("Safe Delta budget scale s")
    ax2.set_ylabel("% of the fine-tune's utility gain kept")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligned", required=True, help="aligned model (HF dir)")
    p.add_argument("--attacked", default=None, help="harmful fine-tune of it (HF dir or PEFT adapter dir)")
    p.add_argument("--benign", default=None, help="benign fine-tune of it (HF dir or PEFT adapter dir)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--s", type=float, nargs="+", default=[0.1], help="budget scales to sweep (default 0.1)")
    p.add_argument("--mode", default="official", choices=["official", "paper"], help="Safe Delta rule")
    p.add_argument("--ablations", nargs="*", default=["no_compensation"],
                   help="ablations run at the first s (default: no_compensation; also random, magnitude)")
    p.add_argument("--n-eval", type=int, default=100, help="held-out harmful and benign prompts (default 100)")
    p.add_argument("--seed", type=int, default=0, help="evaluation subset seed")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    finetunes = {name: path for name, path in (("attacked", args.attacked), ("benign", args.benign)) if path}
    if not finetunes:
        p.error("give --attacked and/or --benign")

    suffix = "_paper" if args.mode == "paper" else ""  # paper-mode results sit beside the official ones
    results = {"args": {k: str(v) for k, v in vars(args).items()},
               "aligned": evaluate(args.aligned, args.out / "eval_aligned.json", args.n_eval, args.seed),
               "finetunes": {}}
    for name, path in finetunes.items():
        runs = {"finetuned": evaluate(path, args.out / f"eval_{name}.json", args.n_eval, args.seed),
                "safedelta": [], "ablations": []}
        settings = [(s, None) for s in args.s] + [(args.s[0], a) for a in args.ablations]
        for s, ablation in settings:
            label = f"{name}_s{s}" + (f"_{ablation}" if ablation else "") + ("_paper" if args.mode == "paper" else "")
            job = SafeDeltaJob(aligned=args.aligned, finetuned=path, out_dir=str(args.out / label),
                               safedelta=SafeDeltaConfig(s=s, mode=args.mode, ablation=ablation))
            summary = run_safe_delta_job(job, reuse=True)
            row = {**evaluate(str(args.out / label / "hf"), args.out / f"eval_{label}.json", args.n_eval, args.seed),
                   "s": s, "ablation": ablation, "kept_fraction": summary["kept_fraction"],
                   "timings": summary["timings"]}
            runs["ablations" if ablation else "safedelta"].append(row)
            print(f"{label}: ASR {row['asr']:.0%}, over-refusal {row['over_refusal']:.0%}, GSM8K loss "
                  f"{row['gsm8k_loss']:.4f}, kept {row['kept_fraction']:.1%}", flush=True)
        results["finetunes"][name] = runs
        (args.out / f"result{suffix}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"curve{suffix}.png")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
