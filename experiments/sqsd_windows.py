"""SQSD window experiment: rank a benign pool, fine-tune the aligned model on each window, measure ASR per window.

    python experiments/sqsd_windows.py --aligned runs/align/hf --out runs/sqsd_windows \
        [--pool capability --pool-size 100 --methods sqsd random gradient --window-steps 8 --filter-k 20]

The defaults (pool 100, 5 windows of 20, adapters of 10 steps, window fine-tunes of 8 LoRA steps of batch 8,
50 evaluation prompts) are sized for ~40 minutes of an idle 2-core CPU (estimate in docs/sqsd.md). At power:

    python experiments/sqsd_windows.py --aligned runs/align/hf --out runs/sqsd_power --pool gsm8k+sharegpt \
        --pool-size 500 --methods sqsd random gradient representation --train-seeds 0 1 --n-eval 200 --filter-k 50

--pool gsm8k+sharegpt: half GSM8K worked answers, half ShareGPT replies the alignment run did not train on, with
equal numbers of each source in every decile of the pooled answer length (answer length is controlled by
matching, and each method's Spearman(score, answer length) is reported).

1. Directions: three LoRA adapters on the aligned model, all seven projections (the official setting), trained with
   the training engine: "initial" (--initial-steps on the benign pool's source), "danger" (harmful Q+A attack set),
   "safety" (proxy refusals), --adapter-steps each.
2. Scores: each --methods scorer (sqsd, random, gradient = He et al. bidirectional gradient matching,
   representation = He et al. representation matching, self_inf; safetrade/sqsd/job.py) ranks the same pool;
   --windows equal windows with the official linspace starts, S1 = highest risk.
3. Windows: the aligned model is fine-tuned on each window (--window-mode lora: rank-8 LoRA on all seven
   projections, as the official LLaMA-Factory runs; full: all parameters), --window-steps steps of batch 8 over
   the whole window (no rows held out), and evaluated: keyword ASR and refusal margin on --n-eval held-out harmful
   prompts, once per --train-seeds seed. The claim: ASR falls from S1 to S5 for SQSD. Reported per method:
   Spearman correlation of window index vs ASR (negative = the ranking predicts the degradation) and S1 − S5, for
   ASR and refusal margin, each with a 95 % bootstrap interval over the evaluation prompts (window_bootstrap) and
   the per-seed values.
4. Filtering (--filter-k > 0, needs sqsd among the methods): fine-tune on the pool minus its top-k SQSD samples
   and minus k random samples, same steps and seeds; lower ASR for the SQSD-filtered pool = the filter helps,
   tested by exact McNemar on the same prompts (per seed and pooled) and a paired margin bootstrap.

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
from safetrade.data import write_rows
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


def paired_margin_difference(a: Path, b: Path, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over the shared prompts of margin(a) − margin(b), with a 95 % paired-bootstrap interval over prompts.

    Both fine-tunes are evaluated on the same prompts, so pairing removes the prompts' own spread. The interval
    covers evaluation noise only: each fine-tune is one run (one seed), so training noise is not in it."""
    ma, mb = _outcomes(a, "refusal_margin"), _outcomes(b, "refusal_margin")
    ids = sorted(set(ma) & set(mb))
    diff = np.array([ma[i] - mb[i] for i in ids])
    boot = np.random.default_rng(seed).choice(diff, size=(n_boot, len(diff))).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)], "n_prompts": len(ids)}


def batch_for(rows: list[dict], batch: int) -> str:
    """The fine-tune's batch-size override: `batch`, or the whole set when it is smaller (a tiny smoke-test window)."""
    return f"data.batch_size={min(batch, len(rows))}"


MIXED_POOL = "gsm8k+sharegpt"


def mixed_pool(n: int, seed: int, align_config: Path) -> tuple[list[dict], dict]:
    """The length-matched GSM8K + ShareGPT pool (data.alignment.build_benign_mix) without the ShareGPT rows the
    alignment run trained on; returns (rows, a record of the per-source length quantiles)."""
    from safetrade.data import normalise_prompt
    from safetrade.data.alignment import build_benign_mix
    from safetrade.data.sets import rows_for

    if not align_config.exists():
        raise SystemExit(f"{align_config} not found: --pool {MIXED_POOL} leaves out the alignment run's own rows, "
                         "which its job config defines; pass --align-config")
    trained = {normalise_prompt(r["prompt"]) for r in rows_for("alignment", config_lib.load(
        config_lib.TrainJob, align_config).data) if r.get("prompt")}
    rows = build_benign_mix(n, seed, trained)
    lengths = {name: np.percentile([len(r["response"]) for r in rows if r["source"] == name], [10, 50, 90]).tolist()
               for name in ("gsm8k", "sharegpt")}
    return rows, {"pool": MIXED_POOL, "rows": len(rows),
                  "length_control": "equal rows per source in each pooled answer-length decile (characters)",
                  "response_chars_p10_p50_p90": lengths}


def length_correlation(scores: np.ndarray, rows: list[dict]) -> float | None:
    """Spearman(score, answer length in characters) over the scored rows: how much of a ranking is length."""
    ok = np.isfinite(scores)
    if ok.sum() < 3:
        return None
    return finite_or_none(spearmanr(scores[ok], [len(r["response"]) for r, k in zip(rows, ok) if k]).statistic)


def _outcomes(path: Path, question: str) -> dict[str, float]:
    """Per-prompt attack success (0/1) or refusal margin of one evaluation JSON, by prompt id (failed: left out)."""
    from safetrade.evaluate.report import sample_values

    got = sample_values(json.loads(path.read_text()), "harmful:heldout", question)
    return {i: float(v) for i, v in zip(got["ids"], got["values"]) if v is not None}


def window_bootstrap(eval_paths: list[list[Path]], n_boot: int = 2000, seed: int = 0) -> dict:
    """95 % intervals of Spearman(window, ASR), Spearman(window, margin), S1 − S5 ASR and S1 − S5 margin, by a
    bootstrap over the evaluation prompts (the same resample for every window and seed: they share the prompts).

    eval_paths[w][k]: the evaluation of window w's fine-tune with training seed k. A window's value is the mean
    over seeds and prompts. The interval covers prompt sampling; training noise shows as the per-seed spread
    ("per_seed": the point estimates of each seed alone), which two seeds cannot turn into an interval."""
    out = {"n_boot": n_boot, "seeds": len(eval_paths[0])}
    for question, name in (("attack_success", "asr"), ("refusal_margin", "margin")):
        per = [[_outcomes(path, question) for path in seeds] for seeds in eval_paths]
        ids = sorted(set.intersection(*(set(d) for seeds in per for d in seeds)))
        values = np.array([[[d[i] for i in ids] for d in seeds] for seeds in per])  # [window, seed, prompt]
        rng = np.random.default_rng(seed)
        windows = np.arange(1, values.shape[0] + 1)

        def stats_of(v):  # v: [window, seed, prompt] -> (ρ, S1 − S_last)
            means = v.mean(axis=(1, 2))
            rho = spearmanr(windows, means).statistic if np.ptp(means) > 0 else np.nan
            return rho, means[0] - means[-1]

        rho, gap = stats_of(values)
        boot = np.array([stats_of(values[:, :, rng.integers(0, len(ids), len(ids))]) for _ in range(n_boot)])
        out[name] = {"spearman": finite_or_none(rho), "s1_minus_s5": float(gap), "n_prompts": len(ids),
                     "spearman_ci95": [finite_or_none(x) for x in np.nanpercentile(boot[:, 0], [2.5, 97.5])]
                     if np.isfinite(boot[:, 0]).any() else [None, None],
                     "s1_minus_s5_ci95": np.percentile(boot[:, 1], [2.5, 97.5]).tolist(),
                     "spearman_undefined_share": float(np.mean(~np.isfinite(boot[:, 0]))),
                     "per_seed": [dict(zip(("spearman", "s1_minus_s5"), map(finite_or_none, stats_of(values[:, [k]]))))
                                  for k in range(values.shape[1])]}
    return out


def filter_tests(top: list[Path], rand: list[Path]) -> dict:
    """Top-k SQSD removed vs k random removed, on the same prompts: exact McNemar on attack success per seed and
    over (prompt, seed) pairs pooled, and the paired margin difference per seed."""
    from safetrade.evaluate import stats

    out = {"per_seed": []}
    pooled_a, pooled_b = [], []
    for a, b in zip(top, rand):
        oa, ob = _outcomes(a, "attack_success"), _outcomes(b, "attack_success")
        ids = sorted(set(oa) & set(ob))
        xa, xb = [bool(oa[i]) for i in ids], [bool(ob[i]) for i in ids]
        pooled_a += xa
        pooled_b += xb
        out["per_seed"].append({"asr_minus_top_sqsd": float(np.mean(xa)), "asr_minus_random": float(np.mean(xb)),
                                "mcnemar": stats.mcnemar_exact(xa, xb), "margin_difference_paired":
                                paired_margin_difference(a, b)})
    out["pooled_mcnemar"] = stats.mcnemar_exact(pooled_a, pooled_b)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligned", required=True, help="aligned model (HF dir or registered name)")
    p.add_argument("--out", type=Path, required=True, help="output folder (sub-runs are cached there)")
    p.add_argument("--pool", default="capability",
                   help=f"benign pool: built set, dataset, file, or {MIXED_POOL!r} (GSM8K + ShareGPT, length-matched)")
    p.add_argument("--align-config", type=Path, default=None,
                   help=f"the alignment run's job config, for --pool {MIXED_POOL} (default: config.yaml beside "
                        "--aligned)")
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
    p.add_argument("--train-seeds", "--train-seed", type=int, nargs="+", default=[0],
                   help="seeds of the window / filtering fine-tunes (LoRA init, batch order): each window is "
                        "fine-tuned once per seed on the same scores (the first seed's runs keep the old paths)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the window intervals")
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
    if args.pool == MIXED_POOL:
        rows, pool_record = mixed_pool(args.pool_size, args.seed,
                                       args.align_config or Path(args.aligned).parent / "config.yaml")
        initial_data = [f"data.train={write_rows(rows, out / 'pool.jsonl')}"]  # "initial" learns the pool itself
    else:
        rows = pool_rows(args.pool, args.pool_size, args.seed)
        pool_record, initial_data = {"pool": args.pool, "rows": len(rows)}, []
    adapters = {}
    if "sqsd" in args.methods:
        adapters = {
            "initial": train("experiments/configs/benign.yaml", out / "adapters" / "initial",
                             [*model, *lora, *quiet, f"steps={args.initial_steps}", "optim.lr=2e-4",
                              *initial_data]),
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

    def finetune(seed: int) -> list[str]:
        return [*model, *quiet, f"steps={args.window_steps}", f"optim.lr={lr}", "data.eval_rows=0", f"seed={seed}",
                f"data.seed={seed}", *(lora if args.window_mode == "lora" else [])]

    def seeded(name: str, seed: int) -> str:  # the first seed keeps the single-seed study's paths (its cache)
        return name if seed == args.train_seeds[0] else f"{name}_seed{seed}"

    result = {"args": {k: str(v) for k, v in vars(args).items()}, "pool": pool_record,
              "aligned": asr(args.aligned, out / "eval_aligned.json", args.n_eval), "methods": {}}
    for method in args.methods:
        scores = score_pool(method, args, rows, adapters)
        windows = rank_windows(scores, n_windows=args.windows)
        per_window, eval_paths = [], []
        for w, members in enumerate(windows, start=1):
            data = write_rows([rows[i] for i in members], out / method / f"window{w}.jsonl")
            by_seed, eval_paths = [], [*eval_paths, []]
            for seed in args.train_seeds:
                run = train("experiments/configs/benign.yaml", out / method / seeded(f"ft_window{w}", seed),
                            [*finetune(seed), f"data.train={data}", batch_for(members, args.window_batch)])
                eval_paths[-1].append(out / method / f"{seeded(f'eval_window{w}', seed)}.json")
                by_seed.append(asr(str(run / "hf"), eval_paths[-1][-1], args.n_eval))
            per_window.append({"window": w, "size": len(members), "mean_score": float(np.mean(scores[members])),
                               "asr": float(np.mean([b["asr"] for b in by_seed])),
                               "refusal_margin": float(np.mean([b["refusal_margin"] for b in by_seed])),
                               "per_seed": by_seed})
        result["methods"][method] = {
            "windows": per_window, **window_trend(per_window), "n_scored": int(np.isfinite(scores).sum()),
            "spearman_score_vs_length": length_correlation(scores, rows),
            "bootstrap": window_bootstrap(eval_paths, args.n_boot, args.seed),
            "s1_minus_s5_margin_paired": paired_margin_difference(eval_paths[0][0], eval_paths[-1][0])}
        if method == "sqsd" and args.filter_k:
            order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
            rng = np.random.default_rng(args.seed)
            keep = {"minus_top_sqsd": [rows[i] for i in sorted(order[args.filter_k:])],
                    "minus_random": [rows[i] for i in sorted(rng.permutation(len(rows))[args.filter_k:])]}
            result["filtering"] = {"k": args.filter_k, "pool": len(rows)}
            paths = {}
            for name, kept in keep.items():
                data = write_rows(kept, out / "filter" / f"{name}.jsonl")
                per_seed = []
                for seed in args.train_seeds:
                    run = train("experiments/configs/benign.yaml", out / "filter" / seeded(name, seed),
                                [*finetune(seed), f"data.train={data}", batch_for(kept, args.window_batch)])
                    paths.setdefault(name, []).append(out / "filter" / f"{seeded(f'eval_{name}', seed)}.json")
                    per_seed.append(asr(str(run / "hf"), paths[name][-1], args.n_eval))
                result["filtering"][name] = {"asr": float(np.mean([r["asr"] for r in per_seed])),
                                             "refusal_margin": float(np.mean([r["refusal_margin"] for r in per_seed])),
                                             "per_seed": per_seed}
            # > 0: the SQSD-filtered fine-tune refuses more confidently than the randomly filtered one
            result["filtering"]["margin_difference_paired"] = paired_margin_difference(
                paths["minus_top_sqsd"][0], paths["minus_random"][0])
            result["filtering"]["tests"] = filter_tests(paths["minus_top_sqsd"], paths["minus_random"])
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
    boot = {m: r["bootstrap"] for m, r in methods.items() if "bootstrap" in r}
    if boot:
        def ci(x) -> str:
            return "n/a" if x[0] is None else f"[{x[0]:+.2f}, {x[1]:+.2f}]"

        def opt(x) -> str:
            return "n/a" if x is None else f"{x:+.2f}"

        first = next(iter(boot.values()))
        lines += ["", f"Intervals (95 %, bootstrap over the {first['asr']['n_prompts']} evaluation prompts, "
                  f"{first['n_boot']} resamples; windows averaged over {first['seeds']} training seed(s); "
                  "per-seed values show the training noise the interval leaves out):", "",
                  "| method | ρ(window, ASR) [95 %] | S1−S5 ASR [95 %] | ρ(window, margin) [95 %] | "
                  "S1−S5 margin [95 %] | per seed ρ(ASR) | ρ(score, answer length) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for method, b in boot.items():
            a, m = b["asr"], b["margin"]
            seeds = ", ".join(opt(x["spearman"]) for x in a["per_seed"])
            lines.append(f"| {method} | {opt(a['spearman'])} {ci(a['spearman_ci95'])} | "
                         f"{100 * a['s1_minus_s5']:+.1f} pts [{100 * a['s1_minus_s5_ci95'][0]:+.1f}, "
                         f"{100 * a['s1_minus_s5_ci95'][1]:+.1f}] | {opt(m['spearman'])} {ci(m['spearman_ci95'])} | "
                         f"{m['s1_minus_s5']:+.2f} {ci(m['s1_minus_s5_ci95'])} | {seeds} | "
                         f"{opt(methods[method].get('spearman_score_vs_length'))} |")
    if "filtering" in result:
        f = result["filtering"]
        lines += ["", f"filtering (k = {f['k']} of {f['pool']}):", "",
                  "| fine-tuned on | ASR | refusal margin |", "|---|---:|---:|"]
        for name, label in (("minus_top_sqsd", "pool minus its top-k SQSD"), ("minus_random", "pool minus k random")):
            lines.append(f"| {label} | {pct(f[name]['asr'])} | {f[name]['refusal_margin']:+.2f} |")
        lines += ["", "margin(minus top-k SQSD) − margin(minus k random): " + interval(f["margin_difference_paired"])]
        if "tests" in f:
            t = f["tests"]
            for k, seed in enumerate(t["per_seed"]):
                mc = seed["mcnemar"]
                lines.append(f"- seed {k + 1}: ASR {pct(seed['asr_minus_top_sqsd'])} vs {pct(seed['asr_minus_random'])}"
                             f", exact McNemar p = {mc['p_value']:.3g} ({mc['n_a_only']} vs {mc['n_b_only']} discordant "
                             f"prompts); margin difference {interval(seed['margin_difference_paired'])}")
            mc = t["pooled_mcnemar"]
            lines.append(f"- pooled over seeds ({mc['n']} prompt-seed pairs): exact McNemar p = {mc['p_value']:.3g}")
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
