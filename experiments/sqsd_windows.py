"""SQSD window experiment: rank a benign pool, fine-tune the aligned model on each window, measure ASR per window.

    python experiments/sqsd_windows.py --aligned runs/align/hf --out runs/sqsd_windows \
        [--pool capability --pool-size 100 --methods sqsd random gradient --window-steps 8 --filter-k 20]

The defaults (pool 100, 5 windows of 20, adapters of 10 steps, window fine-tunes of 8 LoRA steps of batch 8,
50 evaluation prompts) are sized for ~40 minutes of an idle 2-core CPU (estimate in docs/sqsd.md).

1. Directions: three LoRA adapters on the aligned model, all seven projections (the official setting), trained with
   the training engine: "initial" (--initial-steps on the benign pool's source), "danger" (harmful Q+A attack set),
   "safety" (proxy refusals), --adapter-steps each.
2. Scores: each --methods scorer (sqsd, random, gradient = He et al. bidirectional gradient matching,
   representation = He et al. representation matching, self_inf; safetrade/sqsd/job.py) ranks the same pool;
   --windows equal windows with the official linspace starts, S1 = highest risk.
3. Windows: the aligned model is fine-tuned on each window (--window-mode lora: rank-8 LoRA on all seven
   projections, as the official LLaMA-Factory runs; full: all parameters), --window-steps steps of batch 8 over
   the whole window (no rows held out), and evaluated: keyword ASR and refusal margin on --n-eval held-out harmful
   prompts. The claim: ASR falls from S1 to S5 for SQSD. Reported per method: Spearman correlation of window index
   vs ASR (negative = the ranking predicts the degradation) and S1 − S5.
4. Filtering (--filter-k > 0, needs sqsd among the methods): fine-tune on the pool minus its top-k SQSD samples
   and minus k random samples, same steps; lower ASR for the SQSD-filtered pool = the filter helps.

Writes result.json (rewritten after every method), table.md and windows.png (ASR and refusal margin per window
per method, ρ and S1 − S5 in the legends) to --out. Every sub-run is cached there and reused when its output
exists: adapters and fine-tunes (summary.json), scorings (scores_<method>.jsonl: the windows are rebuilt from the
stored scores, which the ranking is a pure function of), evaluations (eval_*.json). An interrupted study resumes
where it stopped; delete a sub-run's folder or file to redo it. Settings are not part of the cache key: use a new
--out for new settings.
A persistent XLA compilation cache (--out/jax_cache) lets the many same-shaped fine-tunes and evaluations reuse
compiled programs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from scipy.stats import spearmanr

from safetrade import config as config_lib
from safetrade.evaluate.suite import EvalConfig, run_evaluation
from safetrade.sqsd import SQSDConfig, rank_windows
from safetrade.sqsd.job import SQSDJob, pool_rows, run_sqsd_job
from safetrade.train.jobs import run_train_job

LORA_ALL = "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
METHODS = ("sqsd", "random", "gradient", "representation", "self_inf")


def log(message: str) -> None:
    print(f"[sqsd_windows {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train(config: str, out: Path, overrides: list[str]) -> Path:
    """A training-engine run into `out`, skipped when its summary.json exists (the run finished)."""
    if (out / "summary.json").exists():
        log(f"reusing {out}")
    else:
        t = time.perf_counter()
        run_train_job(config_lib.load(config_lib.TrainJob, config, [f"out_dir={out}", *overrides]))
        log(f"trained {out} in {time.perf_counter() - t:.0f}s")
    return out


def asr(model: str, out: Path, n: int) -> dict:
    """Keyword ASR and refusal margin on n held-out harmful prompts; the evaluation JSON at `out` is reused."""
    if out.exists():
        record = json.loads(out.read_text())
    else:
        t = time.perf_counter()
        record = run_evaluation(EvalConfig(model=model, harmful=("heldout",), n_harmful=n, benign=None,
                                           judges=("keyword",), max_new_tokens=48), out=out, progress=False)
        log(f"evaluated {model} in {time.perf_counter() - t:.0f}s")
    return {"asr": record["metrics"]["asr/heldout"], "refusal_margin": record["metrics"]["refusal_margin/heldout"]}


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "response": r["response"], "id": r["id"]}) + "\n")
    return path


def cached_scores(path: Path, rows: list[dict]) -> np.ndarray | None:
    """Per-row scores (pool order, NaN where unscored) from a scoring JSONL written for exactly these rows."""
    if not path.exists():
        return None
    stored = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if [r.get("id") for r in stored] != [str(r["id"]) for r in rows]:
        raise SystemExit(f"{path} was written for a different pool (its row ids differ from --pool/--pool-size/"
                         "--seed now); delete it or use another --out")
    return np.array([np.nan if r.get("score") is None else float(r["score"]) for r in stored], np.float64)


def score_pool(method: str, args, rows: list[dict], adapters: dict[str, Path]) -> np.ndarray:
    """Scores of the pool rows by `method` (cached JSONL), NaN where a row could not be scored."""
    path = args.out / f"scores_{method}.jsonl"
    scores = cached_scores(path, rows)
    if scores is not None:
        log(f"reusing {path}")
        return scores
    t = time.perf_counter()
    scoring = SQSDConfig(batch_size=args.score_batch, max_len=args.max_len)
    job = SQSDJob(model=args.aligned, method=method, pool=args.pool, n=args.pool_size, seed=args.seed,
                  windows=args.windows, out=str(path), sqsd=scoring,
                  **({k: str(v / "adapter") for k, v in adapters.items()} if method == "sqsd" else {}))
    _, result, _ = run_sqsd_job(job, rows=rows)
    log(f"scored {len(rows)} rows with {method} in {time.perf_counter() - t:.0f}s ({result.summary()})")
    by_id = dict(zip(result.ids, result.score))
    return np.array([by_id.get(str(r["id"]), np.nan) for r in rows], np.float64)


def finite_or_none(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def window_trend(per_window: list[dict]) -> dict:
    """Spearman(window index, ASR) (None when ASR is constant) and S1 − S5 ASR; the same for the refusal margin
    (log-likelihood of refusing over complying, continuous, so it moves before a keyword ASR over a few dozen
    prompts does; a *positive* Spearman there is the claim's direction: lower-risk windows stay safer)."""
    def trend(values: list[float]) -> float | None:
        if len(set(values)) < 2:
            return None
        return finite_or_none(spearmanr(range(1, len(values) + 1), values).statistic)

    asrs = [w["asr"] for w in per_window]
    margins = [w["refusal_margin"] for w in per_window]
    return {"spearman_window_vs_asr": trend(asrs), "s1_minus_s5_asr": asrs[0] - asrs[-1],
            "spearman_window_vs_margin": trend(margins), "s1_minus_s5_margin": margins[0] - margins[-1]}


def prompt_margins(eval_path: Path) -> dict[str, float]:
    """Per-prompt refusal margins of one evaluation JSON, by prompt id."""
    samples = json.loads(eval_path.read_text())["samples"]["harmful:heldout"]
    return {s["id"]: float(s["refusal_margin"]) for s in samples}


def paired_margin_difference(a: Path, b: Path, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over the shared prompts of margin(a) − margin(b), with a 95 % paired-bootstrap interval over prompts.

    Both fine-tunes are evaluated on the same prompts, so pairing removes the prompts' own spread. The interval
    covers evaluation noise only: each fine-tune is one run (one seed), so training noise is not in it."""
    ma, mb = prompt_margins(a), prompt_margins(b)
    ids = sorted(set(ma) & set(mb))
    diff = np.array([ma[i] - mb[i] for i in ids])
    boot = np.random.default_rng(seed).choice(diff, size=(n_boot, len(diff))).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)], "n_prompts": len(ids)}


def batch_for(rows: list[dict], batch: int) -> str:
    """The fine-tune's batch-size override: `batch`, or the whole set when it is smaller (a tiny smoke-test window)."""
    return f"data.batch_size={min(batch, len(rows))}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligned", required=True, help="aligned model (HF dir or registered name)")
    p.add_argument("--out", type=Path, required=True, help="output folder (sub-runs are cached there)")
    p.add_argument("--pool", default="capability", help="benign pool: built set, dataset or file")
    p.add_argument("--pool-size", type=int, default=100, help="rows of the pool to rank")
    p.add_argument("--methods", nargs="+", default=["sqsd", "random", "gradient"], choices=METHODS,
                   help="scorers to compare (gradient/representation: He et al. 2024; self_inf: Self-Inf-N)")
    p.add_argument("--windows", type=int, default=5, help="equal windows over each ranking")
    p.add_argument("--initial-steps", type=int, default=10, help="steps of the benign 'initial' adapter")
    p.add_argument("--adapter-steps", type=int, default=10, help="steps of the danger/safety adapters")
    p.add_argument("--window-mode", choices=("lora", "full"), default="lora",
                   help="window fine-tunes: rank-8 LoRA on all projections (official) or full parameters")
    p.add_argument("--window-steps", type=int, default=8, help="fine-tuning steps per window")
    p.add_argument("--window-batch", type=int, default=8, help="batch of the window fine-tunes (at most the window)")
    p.add_argument("--window-lr", type=float, default=None, help="default 2e-4 (lora) / 5e-5 (full)")
    p.add_argument("--n-eval", type=int, default=50, help="held-out harmful prompts per evaluation")
    p.add_argument("--filter-k", type=int, default=0, help="filtering study: remove the top-k (0 skips)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample for scoring and fine-tuning")
    p.add_argument("--score-batch", type=int, default=4, help="scoring batch (vmapped per-example gradients)")
    p.add_argument("--seed", type=int, default=0, help="pool subset and random-baseline seed")
    p.add_argument("--train-seed", type=int, default=0,
                   help="seed of the window / filtering fine-tunes (LoRA init, batch order): repeat a study with "
                        "another value, same scores, to see run-to-run noise")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    args = p.parse_args(argv)
    if args.filter_k and "sqsd" not in args.methods:
        p.error("--filter-k needs sqsd among --methods")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.no_compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    model = [f"model.name={args.aligned}", f"data.max_len={args.max_len}"]
    lora = ["lora.enabled=true", LORA_ALL]
    # No held-out loss evaluations inside the sub-runs: on a CPU they cost more than a short run's training.
    quiet = ["data.eval_sets=[]", "eval_every=0", "save_every=0"]
    adapters = {}
    if "sqsd" in args.methods:
        adapters = {
            "initial": train("experiments/configs/benign.yaml", out / "adapters" / "initial",
                             [*model, *lora, *quiet, f"steps={args.initial_steps}", "optim.lr=2e-4"]),
            "danger": train("experiments/configs/finetune.yaml", out / "adapters" / "danger",
                            [*model, *lora, *quiet, f"steps={args.adapter_steps}", "data.train=attack",
                             "optim.lr=2e-4"]),
            "safety": train("experiments/configs/finetune.yaml", out / "adapters" / "safety",
                            [*model, *lora, *quiet, f"steps={args.adapter_steps}", "data.train=proxy",
                             "optim.lr=2e-4"]),
        }
    # The window fine-tunes train on every row they are given and evaluate nothing themselves (the ASR evaluation
    # follows): data.eval_rows=0 stops the engine from holding 20 % of a small window out.
    lr = args.window_lr or (2e-4 if args.window_mode == "lora" else 5e-5)
    finetune = [*model, *quiet, f"steps={args.window_steps}", f"optim.lr={lr}", "data.eval_rows=0",
                f"seed={args.train_seed}", f"data.seed={args.train_seed}",
                *(lora if args.window_mode == "lora" else [])]

    rows = pool_rows(args.pool, args.pool_size, args.seed)
    result = {"args": {k: str(v) for k, v in vars(args).items()},
              "aligned": asr(args.aligned, out / "eval_aligned.json", args.n_eval), "methods": {}}
    for method in args.methods:
        scores = score_pool(method, args, rows, adapters)
        windows = rank_windows(scores, n_windows=args.windows)
        per_window = []
        for w, members in enumerate(windows, start=1):
            data = write_rows([rows[i] for i in members], out / method / f"window{w}.jsonl")
            run = train("experiments/configs/benign.yaml", out / method / f"ft_window{w}",
                        [*finetune, f"data.train={data}", batch_for(members, args.window_batch)])
            per_window.append({"window": w, "size": len(members), "mean_score": float(np.mean(scores[members])),
                               **asr(str(run / "hf"), out / method / f"eval_window{w}.json", args.n_eval)})
        result["methods"][method] = {
            "windows": per_window, **window_trend(per_window), "n_scored": int(np.isfinite(scores).sum()),
            "s1_minus_s5_margin_paired": paired_margin_difference(out / method / "eval_window1.json",
                                                                  out / method / f"eval_window{args.windows}.json")}
        if method == "sqsd" and args.filter_k:
            order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
            rng = np.random.default_rng(args.seed)
            keep = {"minus_top_sqsd": [rows[i] for i in sorted(order[args.filter_k:])],
                    "minus_random": [rows[i] for i in sorted(rng.permutation(len(rows))[args.filter_k:])]}
            result["filtering"] = {"k": args.filter_k, "pool": len(rows)}
            for name, kept in keep.items():
                data = write_rows(kept, out / "filter" / f"{name}.jsonl")
                run = train("experiments/configs/benign.yaml", out / "filter" / name,
                            [*finetune, f"data.train={data}", batch_for(kept, args.window_batch)])
                result["filtering"][name] = asr(str(run / "hf"), out / "filter" / f"eval_{name}.json", args.n_eval)
            # > 0: the SQSD-filtered fine-tune refuses more confidently than the randomly filtered one
            result["filtering"]["margin_difference_paired"] = paired_margin_difference(
                out / "filter" / "eval_minus_top_sqsd.json", out / "filter" / "eval_minus_random.json")
        result["seconds_this_invocation"] = time.perf_counter() - started  # cached sub-runs cost ~0
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "windows.png")
    (out / "table.md").write_text(markdown_table(result))
    log(f"done in {time.perf_counter() - started:.0f}s; wrote result.json, windows.png and table.md to {out}")
    print(json.dumps({"aligned_asr": result["aligned"]["asr"],
                      **{m: {k: v for k, v in r.items() if k != "windows"} | {"asr": [w["asr"] for w in r["windows"]]}
                         for m, r in result["methods"].items()},
                      **({"filtering": result["filtering"]} if "filtering" in result else {})}, indent=1))


def markdown_table(result: dict) -> str:
    """The study as Markdown: per method ASR / refusal margin per window, the trends, and the filtering rows."""
    def pct(x: float) -> str:
        return f"{100 * x:.0f} %"

    def interval(d: dict) -> str:
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"

    methods = result["methods"]
    n = max(len(r["windows"]) for r in methods.values())
    aligned = result["aligned"]
    lines = [f"aligned, not fine-tuned: ASR {pct(aligned['asr'])}, refusal margin {aligned['refusal_margin']:+.2f}", "",
             "| method | " + " | ".join(f"S{w}" for w in range(1, n + 1))
             + " | ρ(window, ASR) | S1−S5 ASR | ρ(window, margin) | S1−S5 margin [95 % CI over prompts] |",
             "|---|" + "---:|" * (n + 4)]
    for method, r in methods.items():
        cells = [f"{pct(w['asr'])} / {w['refusal_margin']:+.2f}" for w in r["windows"]]
        rho_a, rho_m = r["spearman_window_vs_asr"], r["spearman_window_vs_margin"]
        lines.append(f"| {method} | " + " | ".join(cells)
                     + f" | {'n/a' if rho_a is None else f'{rho_a:+.2f}'} | {100 * r['s1_minus_s5_asr']:+.0f} pts"
                     + f" | {'n/a' if rho_m is None else f'{rho_m:+.2f}'}"
                     + f" | {interval(r['s1_minus_s5_margin_paired'])} |")
    if "filtering" in result:
        f = result["filtering"]
        lines += ["", f"filtering (k = {f['k']} of {f['pool']}):", "",
                  "| fine-tuned on | ASR | refusal margin |", "|---|---:|---:|"]
        for name, label in (("minus_top_sqsd", "pool minus its top-k SQSD"), ("minus_random", "pool minus k random")):
            lines.append(f"| {label} | {pct(f[name]['asr'])} | {f[name]['refusal_margin']:+.2f} |")
        lines += ["", "margin(minus top-k SQSD) − margin(minus k random): " + interval(f["margin_difference_paired"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """ASR (left) and refusal margin (right) per window and method; the aligned model as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    n_windows = 0
    for method, r in result["methods"].items():
        xs = [w["window"] for w in r["windows"]]
        n_windows = max(n_windows, len(xs))
        for ax, key, trend in ((axes[0], "asr", "asr"), (axes[1], "refusal_margin", "margin")):
            rho = r[f"spearman_window_vs_{trend}"]
            ax.plot(xs, [w[key] for w in r["windows"]], "o-",
                    label=f"{method} (ρ = {'n/a' if rho is None else f'{rho:.2f}'}, "
                          f"S1−S{len(xs)} = {r[f's1_minus_s5_{trend}']:+.2f})")
    for ax, key, ylabel in ((axes[0], "asr", "keyword ASR after fine-tuning on the window"),
                            (axes[1], "refusal_margin", "refusal margin (higher = safer)")):
        ax.axhline(result["aligned"][key], color="k", ls=":", label="aligned, not fine-tuned")
        ax.set_xlabel("window (1 = highest predicted risk)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(1, n_windows + 1))
        ax.legend(fontsize=7)
    if "filtering" in result:
        f = result["filtering"]
        fig.suptitle(f"filtering k={f['k']} of {f['pool']}: ASR / margin minus top-k SQSD "
                     f"{f['minus_top_sqsd']['asr']:.2f} / {f['minus_top_sqsd']['refusal_margin']:.2f}, "
                     f"minus k random {f['minus_random']['asr']:.2f} / {f['minus_random']['refusal_margin']:.2f}",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
