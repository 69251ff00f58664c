"""Case I on the real model at controlled context overlap: does more overlap between the capability data and the
alignment data's contexts give a worse trade-off at equal λ?

    python experiments/context_overlap.py --aligned runs/align/hf --out runs/context_overlap
    python experiments/context_overlap.py --aligned runs/align/hf --out runs/context_overlap --levels 0 0.5 1 \
        --until-descent 160 steps=10

1. Contexts. The alignment data's contexts are the prompts of the alignment run's refusal rows (its job config:
   --align-config, default config.yaml beside --aligned). The candidates are a length-matched GSM8K + ShareGPT
   pool (data.alignment.build_benign_mix, --pool rows) without the rows the alignment run trained on. Every prompt
   is embedded by the aligned model itself: the final hidden state at the last token of the chat-formatted
   prompt (sqsd.llama.LlamaFeatures, unit norm), so "overlap" is overlap as the model sees its contexts.
2. Levels. Candidates are ranked by their largest cosine similarity to any alignment prompt. A level q's
   fine-tuning set (--rows rows) takes round(q·rows) of the most similar candidates and the rest from the least
   similar half, so q = 0 is the far end and q = 1 the near end; the answers are the candidates' own benign
   answers, so on the near rows the capability targets (answer) conflict with the alignment targets (refuse).
3. Overlap, measured with the theory package's quantity (theory/overlap.py): Σ min(p_s, p_f) over k-means cells of
   the pooled features of the alignment prompts and the level's prompts, for each --cells k (the estimate depends
   on k: compare levels at one k), and the mean largest cosine similarity.
4. Runs. Each level is fine-tuned with Case I (case1_penalty, λ = --lam, the default proxy) on
   experiments/configs/finetune.yaml's settings with the sweeps' short-run overrides (tradeoff_runs.SHORT_RUN);
   --until-descent doubles a run's steps until its held-out penalised objective is below the aligned model's.
   `safetrade theory` then measures every run (G_s on the alignment run's held-out rows, the capability gain on
   the level's own held-out rows, the penalty bound and the a-posteriori certificate), and the evaluation suite
   gives keyword ASR on --n-harmful held-out harmful prompts (Wilson intervals, exact McNemar against level 0).
5. The claim held if G_s (and ASR) rise with the measured overlap: Spearman(overlap, G_s) over levels is reported
   with the per-level values; one seed per level, so level-to-level differences include training noise.

Cached like the other studies: features (OUT/features.npz), level data, runs with hf/, evaluations of the same
model, the theory report while it covers the same run dirs (delete OUT/theory to re-measure). Writes OUT/result.json, OUT/table.md and OUT/overlap.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import tradeoff_runs  # noqa: E402


def prompt_examples(tokenizer, prompts: list[str], max_len: int) -> list[dict]:
    """Token rows of chat-formatted prompts (generation prompt added, no answer), cut to their last max_len tokens.
    The loss mask marks the last token only, so a row counts as a scoreable sample; the features ignore it."""
    from safetrade.tokenizer import chat_prompt

    rows = []
    for p in prompts:
        ids = tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"][-max_len:]
        mask = np.zeros(len(ids), np.float32)
        mask[-1] = 1.0
        rows.append({"input_ids": np.asarray(ids, np.int32), "attention_mask": np.ones(len(ids), np.int32),
                     "loss_mask": mask})
    return rows


def embed(aligned: str, prompts: dict[str, list[str]], path: Path, max_len: int, batch_size: int) -> dict:
    """{name: [N, D] unit features} of each prompt list by the aligned model; cached in `path` (npz) together
    with the prompts it was computed for."""
    if path.exists():
        stored = np.load(path, allow_pickle=False)
        if all(f"{k}_prompts" in stored and list(stored[f"{k}_prompts"]) == v for k, v in prompts.items()):
            return {k: stored[k] for k in prompts}
    from safetrade.models import io
    from safetrade.sqsd.baselines import unit_features
    from safetrade.sqsd.llama import LlamaFeatures
    from safetrade.tokenizer import load_tokenizer

    cfg, params = io.load_hf(aligned)
    tokenizer = load_tokenizer(aligned)
    features = {k: unit_features(LlamaFeatures(cfg), params, prompt_examples(tokenizer, v, max_len),
                                 batch_size=batch_size, max_len=None) for k, v in prompts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **features, **{f"{k}_prompts": np.asarray(v) for k, v in prompts.items()})
    return features


def level_rows(candidates: list[dict], similarity: np.ndarray, q: float, n: int) -> list[dict]:
    """round(q·n) of the most similar candidates + the rest from the least similar half (in pool order)."""
    order = np.argsort(-similarity, kind="stable")
    near = round(q * n)
    far_half = sorted(order[len(order) // 2:].tolist())
    if near > len(order) // 2 or n - near > len(far_half):
        raise SystemExit(f"--rows {n} needs a pool of at least {2 * n} candidates (each half holds up to {n}); "
                         f"the pool has {len(order)}")
    chosen = sorted(order[:near].tolist()) + far_half[: n - near]
    return [candidates[i] for i in chosen]


def spearman(x, y) -> float | None:
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligned", required=True, help="the aligned model (HF dir written by `safetrade align`)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--align-config", type=Path, default=None, help="default: config.yaml beside --aligned")
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0], help="near-row shares q")
    p.add_argument("--rows", type=int, default=96, help="fine-tuning rows per level (16 of them held out)")
    p.add_argument("--pool", type=int, default=400, help="candidate rows (length-matched GSM8K + ShareGPT)")
    p.add_argument("--lam", type=float, default=1.0, help="Case I penalty weight, equal for every level")
    p.add_argument("--cells", type=int, nargs="+", default=[8, 16, 32], help="k-means cells of the overlap")
    p.add_argument("--until-descent", type=int, default=0, metavar="MAX_STEPS")
    p.add_argument("--n-harmful", type=int, default=200)
    p.add_argument("--n-benign", type=int, default=100)
    p.add_argument("--max-len", type=int, default=128, help="prompt tokens embedded (last ones kept)")
    p.add_argument("--batch", type=int, default=8, help="embedding batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="experiments/configs/finetune.yaml")
    p.add_argument("--no-check", action="store_true", help="skip `safetrade theory` on the runs")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every fine-tune, e.g. steps=40")
    args = p.parse_intermixed_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    align_config = args.align_config or Path(args.aligned).parent / "config.yaml"
    if not align_config.exists():
        raise SystemExit(f"{align_config} not found: the alignment run's job config defines its contexts; "
                         "pass --align-config")

    from safetrade import config
    from safetrade.data import normalise_prompt, write_rows
    from safetrade.data.alignment import build_benign_mix
    from safetrade.data.sets import rows_for
    from safetrade.evaluate import stats
    from safetrade.evaluate.report import sample_values
    from safetrade.evaluate.suite import EvalConfig, run_evaluation
    from theory import overlap

    alignment = rows_for("alignment", config.load(config.TrainJob, align_config).data)
    safety_prompts = [r["prompt"] for r in alignment if r.get("role") == "refusal"]
    candidates = build_benign_mix(args.pool, args.seed, {normalise_prompt(r["prompt"]) for r in alignment})
    feats = embed(args.aligned, {"safety": safety_prompts, "candidates": [r["prompt"] for r in candidates]},
                  out / "features.npz", args.max_len, args.batch)
    similarity = (feats["candidates"] @ feats["safety"].T).max(axis=1)
    index = {r["id"]: i for i, r in enumerate(candidates)}

    levels, runs = [], []
    for q in args.levels:
        rows = level_rows(candidates, similarity, q, args.rows)
        data = write_rows(rows, out / "data" / f"level{q:g}.jsonl")
        level_feats = feats["candidates"][[index[r["id"]] for r in rows]]
        level = {"q": q, "rows": len(rows), "data": str(data),
                 "mean_max_cosine": float(similarity[[index[r["id"]] for r in rows]].mean()),
                 "overlap": {str(k): overlap.cell_overlap(feats["safety"], level_feats, k, args.seed).overlap
                             for k in args.cells},
                 "sources": {s: sum(r["source"] == s for r in rows) for s in ("gsm8k", "sharegpt")}}
        overrides = ["strategy.name=case1_penalty", f"strategy.lam={args.lam}", f"data.train={data}",
                     *args.overrides]
        run_dir = out / f"level{q:g}"
        if args.until_descent:
            tradeoff_runs.launch_until_descent(args.aligned, run_dir, args.config, overrides, args.until_descent)
        else:
            tradeoff_runs.launch(args.aligned, run_dir, args.config, overrides)
        level["run"] = str(run_dir)
        levels.append(level)
        runs.append(run_dir)

    theory = None
    if not args.no_check:
        stored = out / "theory" / "result.json"  # reused while it measured exactly these run dirs
        if stored.exists() and sorted(r["dir"] for r in json.loads(stored.read_text())["runs"]) == sorted(map(str, runs)):
            theory = json.loads(stored.read_text())
        else:
            theory = tradeoff_runs.check(args.aligned, runs, out, [f"align_config={align_config}", "n_rows=16"])
        measured = {Path(r["dir"]).name: r for r in theory["runs"]}
        for level in levels:
            r = measured[Path(level["run"]).name]
            level.update({k: r.get(k) for k in ("safety_gap", "capability_gain", "distance", "objective_decreased",
                                                 "certificate_s")})

    records = {}
    for level in levels:
        ec = EvalConfig(model=str(Path(level["run"]) / "hf"), harmful=("heldout",), n_harmful=args.n_harmful,
                        benign="heldout", n_benign=args.n_benign, judges=("keyword",), max_new_tokens=32,
                        batch_size=16, seed=args.seed)
        path = out / "eval" / f"level{level['q']:g}.json"
        record = json.loads(path.read_text()) if path.exists() else None
        if record is None or record.get("config", {}).get("model") != ec.model:
            record = run_evaluation(ec, out=path)
        records[level["q"]] = record
        level["asr"] = stats.rate(sample_values(record, "harmful:heldout", "attack_success")["values"])
        level["over_refusal"] = stats.rate(sample_values(record, "benign:heldout", "refused")["values"])
    base = sample_values(records[levels[0]["q"]], "harmful:heldout", "attack_success")["values"]
    for level in levels[1:]:
        level["asr_mcnemar_vs_first"] = stats.mcnemar_exact(
            base, sample_values(records[level["q"]], "harmful:heldout", "attack_success")["values"])

    k_mid = str(args.cells[len(args.cells) // 2])
    xs = [lv["overlap"][k_mid] for lv in levels]
    trend = {"cells": int(k_mid), "spearman_overlap_vs_asr": spearman(xs, [lv["asr"]["rate"] for lv in levels])}
    if theory is not None:
        trend["spearman_overlap_vs_safety_gap"] = spearman(xs, [lv["safety_gap"] for lv in levels])
        trend["spearman_overlap_vs_capability_gain"] = spearman(xs, [lv["capability_gain"] for lv in levels])
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "levels": levels, "trend": trend}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "table.md").write_text(markdown_table(result))
    plot(result, out / "overlap.png")
    print((out / "table.md").read_text())
    return 0


def markdown_table(result: dict) -> str:
    levels = result["levels"]
    cells = list(levels[0]["overlap"])
    head = ("| q (near share) | " + " | ".join(f"overlap, {k} cells" for k in cells)
            + " | mean max cos | G_s | capability gain | F descended | ASR [95 %] | p vs first | over-refusal [95 %] |")
    lines = [head, "|" + "---:|" * (len(cells) + 8)]
    for lv in levels:
        def num(key, fmt="{:.4g}"):
            return "—" if lv.get(key) is None else fmt.format(lv[key])
        a, o = lv["asr"], lv["over_refusal"]
        p = lv.get("asr_mcnemar_vs_first")
        lines.append(f"| {lv['q']:g} | " + " | ".join(f"{lv['overlap'][k]:.3f}" for k in cells)
                     + f" | {lv['mean_max_cosine']:.3f} | {num('safety_gap')} | {num('capability_gain')} | "
                     + ("—" if lv.get("objective_decreased") is None else "yes" if lv["objective_decreased"] else "**no**")
                     + f" | {100 * a['rate']:.1f} % [{100 * a['ci'][0]:.1f}, {100 * a['ci'][1]:.1f}] | "
                     + ("" if p is None else f"{p['p_value']:.3g}")
                     + f" | {100 * o['rate']:.1f} % [{100 * o['ci'][0]:.1f}, {100 * o['ci'][1]:.1f}] |")
    t = result["trend"]

    def r(x):
        return "n/a" if x is None else f"{x:+.2f}"

    lines += ["", f"Spearman over levels, overlap at {t['cells']} cells: vs ASR {r(t['spearman_overlap_vs_asr'])}"
              + (f", vs G_s {r(t['spearman_overlap_vs_safety_gap'])}, vs capability gain "
                 f"{r(t['spearman_overlap_vs_capability_gain'])}" if "spearman_overlap_vs_safety_gap" in t else "")
              + " (one fine-tune per level: differences include training noise)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels, k = result["levels"], str(result["trend"]["cells"])
    xs = [lv["overlap"][k] for lv in levels]
    panels = [("ASR (keyword)", [lv["asr"]["rate"] for lv in levels],
               [[lv["asr"]["rate"] - lv["asr"]["ci"][0] for lv in levels],
                [lv["asr"]["ci"][1] - lv["asr"]["rate"] for lv in levels]])]
    if levels[0].get("safety_gap") is not None:
        panels.append(("safety gap G_s", [lv["safety_gap"] for lv in levels], None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (label, ys, err) in zip(axes[0], panels):
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3)
        for lv, x, y in zip(levels, xs, ys):
            ax.annotate(f"q={lv['q']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"measured context overlap ({k} cells)")
        ax.set_ylabel(label)
        ax.set_title(f"Case I, λ = {result['args']['lam']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
