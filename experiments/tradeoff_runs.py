"""Shared by experiments/tradeoff_case1.py and tradeoff_case2.py: launch a fine-tune unless its model exists, build
the second (less similar) Case I proxy set, and hand the run dirs to theory/real.py.

Short runs by default, so a sweep fits a 2-core CPU: SHORT_RUN below (20 steps of batch 8 × 128 tokens; 16 held-out
rows per set, which is also the most `safetrade theory` may use per loss since only those rows were never trained
on). Any of it can be overridden with trailing dotted overrides, e.g. `steps=100 data.max_len=256`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """The options both sweeps share; each script adds its dial (--lams/--proxies or --radii)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--aligned", required=True, help="the aligned model (HF dir written by `safetrade align`)")
    p.add_argument("--out", type=Path, required=True, help="output folder (runs and the theory report)")
    p.add_argument("--config", default="experiments/configs/finetune.yaml", help="finetune job config")
    p.add_argument("--align-config", default=None,
                   help="the alignment run's job config (default: config.yaml beside --aligned)")
    p.add_argument("--theory", action="append", default=[], metavar="KEY=VALUE",
                   help="a TheoryJob override; repeat the flag for more (e.g. --theory samples=8)")
    p.add_argument("--no-check", action="store_true", help="only launch the fine-tunes")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every fine-tune, e.g. steps=40")
    return p

SHORT_RUN = ("steps=20", "data.batch_size=8", "data.max_len=128", "data.eval_rows=16", "eval_every=0",
             "save_every=0", "log_every=5")

# The pyrit files carry human-labelled replies of other chat models to harmful prompts; their refusals are short and
# worded unlike the project's templated refusals (safetrade/data/refusals.py) used in the alignment and default proxy
# sets -- the "different teacher" proxy of the trade-off paper's Alpaca vs Alpaca-GPT-4 contrast.
PYRIT_REFUSAL_SETS = ("pyrit_refusal", "pyrit_refusal_extra", "pyrit_mini_refusal")


def write_pyrit_refusal_proxy(path: Path, align_data) -> Path:
    """JSONL of pyrit's refusal-labelled (prompt, reply) rows whose prompt is not in the alignment set (the same
    disjointness the default proxy set keeps). Rewritten only when missing, so re-runs see the same rows."""
    from safetrade.data import load_dataset, normalise_prompt
    from safetrade.data.sets import rows_for

    if path.exists():
        return path
    aligned_prompts = {normalise_prompt(r["prompt"]) for r in rows_for("alignment", align_data)}
    seen, rows = set(), []
    for name in PYRIT_REFUSAL_SETS:
        for r in load_dataset(name):
            key = normalise_prompt(r["prompt"] or "")
            if r.get("category") == "refusal" and r.get("response") and key not in aligned_prompts and key not in seen:
                seen.add(key)
                rows.append({"prompt": r["prompt"], "response": r["response"], "id": r["id"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log.warning("wrote %d pyrit refusal rows to %s", len(rows), path)
    return path


def launch(aligned: str, run_dir: Path, base_config: str, overrides: list[str]) -> Path:
    """`safetrade finetune` of the aligned model into run_dir, skipped when run_dir/hf already holds a model (a
    re-run of the sweep resumes where it stopped; delete the dir to redo a run)."""
    from safetrade import config
    from safetrade.train.jobs import run_train_job

    if (run_dir / "hf" / "config.json").exists():
        print(f"reusing {run_dir} (hf/ exists)", flush=True)
        return run_dir
    job = config.load(config.TrainJob, base_config,
                      [f"model.name={aligned}", f"out_dir={run_dir}", *SHORT_RUN, *overrides])
    knobs = " ".join(f"{k}={v}" for k, v in config.to_dict(job.strategy).items() if k != "name")
    print(f"training {run_dir}: {job.strategy.name} {knobs} proxy={job.data.proxy} steps={job.steps}", flush=True)
    summary = run_train_job(job)
    print(f"  done in {summary['seconds']:.0f} s", flush=True)
    return run_dir


def check(aligned: str, run_dirs: list[Path], out: Path, theory_overrides: list[str]) -> dict:
    """`safetrade theory` on the sweep's run dirs; prints the report."""
    from safetrade import config
    from theory.real import TheoryJob, run_theory_job

    job = config.load(TheoryJob, None, [f"aligned={aligned}", f"runs=[{','.join(map(str, run_dirs))}]",
                                        f"out_dir={out / 'theory'}", "max_len=128", *theory_overrides])
    config.save(job, out / "theory" / "config.yaml")
    result = run_theory_job(job)
    print((out / "theory" / "bounds.md").read_text())
    print(f"{result['violations']} violation(s); wrote {out / 'theory'}", flush=True)
    return result
