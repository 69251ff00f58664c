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


def held_out_objective(aligned: str, run_dir: Path, n_rows: int = 16, max_len: int = 128) -> dict:
    """F = L_f + λ·L_proxy of a Case I run at θ and at θ_s, on the held-out rows `safetrade theory` measures (the
    same HeldOutLosses batches, n_rows and max_len as its check), and whether F decreased: the penalty bound's
    premise F(θ_λ) ≤ F(θ_s)."""
    from safetrade import config
    from safetrade.models import io
    from safetrade.tokenizer import load_tokenizer
    from theory.real import HeldOutLosses

    job = config.load(config.TrainJob, run_dir / "config.yaml")
    lam = float(job.strategy.lam)
    cfg, aligned_params = io.load_hf(aligned)
    _, params = io.load_hf(run_dir / "hf")
    losses = HeldOutLosses(cfg, load_tokenizer(aligned), n_rows, max_len)

    def objective(p):
        return losses.value(job.data.train, job.data, p) + lam * losses.value(job.data.proxy, job.data, p)

    at_run, at_aligned = objective(params), objective(aligned_params)
    return {"steps": job.steps, "objective_at_run": at_run, "objective_at_aligned": at_aligned,
            "decreased": at_run <= at_aligned}


def launch_until_descent(aligned: str, run_dir: Path, base_config: str, overrides: list[str], max_steps: int,
                         n_rows: int = 16, max_len: int = 128) -> Path:
    """`launch`, then keep doubling the run's steps (resuming from its last checkpoint: the batches of step k are a
    pure function of k, so a continued run equals a longer one with a constant learning rate) until the held-out
    penalised objective is below the aligned model's or the next doubling would pass max_steps. Every measurement
    is kept in run_dir/descent.json ({"history": [{steps, objective_at_run, objective_at_aligned, decreased}]}),
    so a re-run resumes and the report can say how many steps each run needed, and which still did not descend."""
    import shutil

    record = run_dir / "descent.json"
    history = json.loads(record.read_text())["history"] if record.exists() else []
    extra: list[str] = [f"steps={history[-1]['steps']}"] if history else []
    while True:
        launch(aligned, run_dir, base_config, [*overrides, *extra])
        measured = held_out_objective(aligned, run_dir, n_rows, max_len)
        if not history or history[-1]["steps"] != measured["steps"]:
            history.append(measured)
            record.write_text(json.dumps({"history": history, "max_steps": max_steps}, indent=1) + "\n")
        steps = measured["steps"]
        if measured["decreased"] or 2 * steps > max_steps:
            verdict = "decreased" if measured["decreased"] else f"did NOT decrease by {steps} steps (max {max_steps})"
            print(f"{run_dir}: held-out F {measured['objective_at_run']:.4f} vs {measured['objective_at_aligned']:.4f} "
                  f"at θ_s: {verdict}", flush=True)
            return run_dir
        print(f"{run_dir}: F did not decrease in {steps} steps; continuing to {2 * steps}", flush=True)
        shutil.rmtree(run_dir / "hf")  # the finished model; the checkpoint at `steps` stays and is resumed
        extra = [f"steps={2 * steps}"]


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
