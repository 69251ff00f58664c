"""Refusal rates and benign loss of one or more models on held-out sets; JSON result + PNG bar chart.

    python experiments/safety_eval.py --model smollm2-135m-instruct --model runs/align/hf --out runs/align_eval

For each model: keyword refusal rate on held-out harmful prompts (StrongREJECT + HarmBench-eval, never used for
alignment), refusal rate on held-out benign prompts (GSM8K-eval + ShareGPT-eval: over-refusal), the token-mean
loss on held-out benign responses (GSM8K-eval worked answers) and the refusal margin. Greedy decoding, 48 new
tokens. A thin layer over `safetrade evaluate` (safetrade/evaluate/suite.py): the same numbers as
`safetrade evaluate harmful=[heldout] benign=heldout loss_sets=[gsm8k_eval] judges=[keyword] max_new_tokens=48`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def evaluate_model(model: str, n_harmful: int, n_benign: int, max_new_tokens: int, batch_size: int, seed: int,
                   out: Path | None = None) -> dict:
    """The suite (safetrade.evaluate.suite) with this study's settings; returns its headline numbers + record.

    An existing `out` written for the same config and the same model weights (fingerprint) is reused, so the
    studies that call this can be re-run to add settings without re-evaluating what is already there.
    """
    import dataclasses

    from safetrade.evaluate.suite import EvalConfig, params_fingerprint, run_evaluation
    from safetrade.models import io

    config = EvalConfig(
        model=model, harmful=("heldout",), n_harmful=n_harmful, benign="heldout", n_benign=n_benign,
        loss_sets=("gsm8k_eval",), loss_rows=n_benign, max_len=384, judges=("keyword",),
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    record, loaded = None, None
    if out is not None and Path(out).exists():
        try:
            previous = json.loads(Path(out).read_text())
        except ValueError:  # a run killed while writing: evaluate again
            previous = {}
        if previous.get("config") == json.loads(json.dumps(dataclasses.asdict(config))):
            loaded = io.load_model(model)
            if previous.get("model", {}).get("fingerprint") == params_fingerprint(loaded[1]):
                record = previous
                print(f"{out}: reusing the evaluation of the same model and config", flush=True)
    if record is None:
        # The weights loaded for the fingerprint are the ones evaluated: no second load.
        from safetrade.tokenizer import load_tokenizer

        record = run_evaluation(config, out=out,
                                model=None if loaded is None else (*loaded, load_tokenizer(model)))
    m = record["metrics"]
    return {
        "model": model,
        "harmful_refusal_rate": 1.0 - m["asr/heldout"],
        "benign_refusal_rate": m["over_refusal/heldout"],
        "benign_answer_rate": 1.0 - m["over_refusal/heldout"],
        "benign_loss": m["loss/gsm8k_eval"],
        "refusal_margin": m["refusal_margin/heldout"],
        "n_harmful": m["detail/harmful/heldout"]["n"], "n_benign": m["detail/benign/heldout"]["n"],
        "n_benign_loss_rows": m["detail/loss/gsm8k_eval"]["n"],
        "model_fingerprint": record["model"]["fingerprint"],
        "samples": {"harmful": record["samples"]["harmful:heldout"][:20],
                    "benign": record["samples"]["benign:heldout"][:20]},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.get("label") or (Path(r["model"]).parent.name if "/" in r["model"] else r["model"]) for r in results]
    metrics = [("harmful_refusal_rate", "refusal on held-out harmful"), ("benign_answer_rate", "answers benign")]
    x = np.arange(len(results))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k, (key, label) in enumerate(metrics):
        ax.bar(x + (k - 0.5) * 0.35, [r[key] for r in results], 0.35, label=label)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("rate (keyword judge)")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    ax2.bar(x, [r["benign_loss"] for r in results], color="gray")
    ax2.set_xticks(x, names, rotation=15)
    ax2.set_ylabel("loss on held-out benign answers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model to evaluate (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for result.json and result.png")
    parser.add_argument("--n-harmful", type=int, default=100, help="held-out harmful prompts (default 100)")
    parser.add_argument("--n-benign", type=int, default=100, help="held-out benign prompts (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per reply (default 48)")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [evaluate_model(m, args.n_harmful, args.n_benign, args.max_new_tokens, args.batch_size, args.seed,
                              out=args.out / f"eval_{k}.json") for k, m in enumerate(args.model)]
    report(results, args.out, {"args": {k: str(v) for k, v in vars(args).items()}})


def report(results: list[dict], out: Path, extra: dict) -> None:
    """result.json (+ `extra`), result.png, and one printed line per model."""
    (out / "result.json").write_text(json.dumps({**extra, "results": results}, indent=2, default=str) + "\n")
    plot(results, out / "result.png")
    for r in results:
        print(f"{r.get('label') or r['model']}: harmful refusal {r['harmful_refusal_rate']:.1%}, benign answered "
              f"{r['benign_answer_rate']:.1%}, benign loss {r['benign_loss']:.4f}")


if __name__ == "__main__":
    main()
