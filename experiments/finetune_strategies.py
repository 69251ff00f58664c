"""Harmful fine-tuning of the aligned model under each strategy, at equal steps; refusal rates before and after.

    python experiments/finetune_strategies.py --aligned runs/align/hf --out runs/strategies

Runs `safetrade finetune` (experiments/configs/finetune.yaml: 100 harmful Q+A pairs) once per strategy in
--strategies (default: sft, case1_penalty λ=1, case2_projection r=1), then evaluates every result and the aligned
model with experiments/safety_eval.py. Writes result.json and result.png in --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safety_eval import evaluate_model, report

DEFAULT_STRATEGIES = ("sft", "case1_penalty:lam=1.0", "case2_projection:radius=1.0")


def parse_strategy(text: str) -> tuple[str, list[str]]:
    """'case1_constrained:epsilon=0.1,dual_lr=0.1' -> ('case1_constrained', ['strategy.name=...',
    'strategy.epsilon=0.1', ...]) (each strategy takes only its own knobs: docs/training.md)."""
    name, _, params = text.partition(":")
    overrides = [f"strategy.name={name}"] + [f"strategy.{kv}" for kv in params.split(",") if kv]
    return name + ("-" + params.replace(",", "-").replace("=", "") if params else ""), overrides


def main(argv=None) -> None:
    from safetrade import config
    from safetrade.train.jobs import run_train_job

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--aligned", required=True, help="the aligned model (HF dir written by `safetrade align`)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        help="name[:key=value,...] per run (default: %(default)s)")
    parser.add_argument("--config", default="experiments/configs/finetune.yaml", help="finetune job config")
    parser.add_argument("--n-harmful", type=int, default=100, help="held-out harmful prompts to evaluate")
    parser.add_argument("--n-benign", type=int, default=100, help="held-out benign prompts to evaluate")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run, e.g. steps=40")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    models = [args.aligned]
    trainings = {}
    for text in args.strategies:
        label, overrides = parse_strategy(text)
        job = config.load(config.TrainJob, args.config,
                          [f"model.name={args.aligned}", f"out_dir={args.out / label}", *overrides, *args.overrides])
        trainings[label] = run_train_job(job)
        models.append(str(args.out / label / "hf"))
    results = [evaluate_model(m, args.n_harmful, args.n_benign, 48, 16, 0, out=args.out / f"eval_{k}.json")
               for k, m in enumerate(models)]
    for r, label in zip(results, ["aligned", *trainings]):
        r["label"] = label
    report(results, args.out, {"trainings": trainings})


if __name__ == "__main__":
    main()
