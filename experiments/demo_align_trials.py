"""Trials for the demo's alignment stage: how strong an aligned model `make demo` can afford.

Each trial trains the demo's align stage exactly as `safetrade demo` does (safetrade.demo's own job builder, with
the DemoJob fields the trial overrides), then evaluates the aligned model as the demo's eval stage does, on
`--n-eval` held-out harmful and benign prompts. It records the stage's wall time next to ASR and over-refusal
with their 95 % Wilson intervals, so one table shows what each choice buys and costs.

    python experiments/demo_align_trials.py --out runs/demo_align_trials \\
        --trial lora100: \\
        --trial full100:align_rank=0,align_lr=1e-4,align_steps=100

A trial is `NAME:FIELD=VALUE,...` (DemoJob fields; an empty list is the demo's defaults). A trial whose
trial.json holds the same settings is read back, not re-run. Writes OUT/trials.json and OUT/trials.md.
Run one trial at a time on a 2-core machine: the seconds column is the point of the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from safetrade import config
from safetrade.demo import DemoJob, _eval_config, _train_job, align_stage_args, eval_statistics
from safetrade.evaluate.suite import run_evaluation
from safetrade.train.jobs import run_train_job


def parse_trial(text: str) -> tuple[str, dict]:
    name, sep, fields = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--trial {text!r}: expected NAME:FIELD=VALUE,... (an empty field list is allowed)")
    for item in fields.split(","):
        if item.partition("=")[0] in ("out_dir", "n_eval"):  # the script sets both; a trial's would be ignored
            raise SystemExit(f"--trial {text!r}: {item.partition('=')[0]} is set by --out / --n-eval, not per trial")
    try:  # KEY=VALUE as `safetrade demo` reads them: the same names, types and errors
        job = config.load(DemoJob, None, [item for item in fields.split(",") if item])
    except Exception as e:  # noqa: BLE001 - re-raised with the trial named
        raise SystemExit(f"--trial {text!r}: {e}") from e
    return name, dataclasses.asdict(job)


def run_trial(out: Path, name: str, fields: dict, n_eval: int) -> dict:
    trial_dir = out / name
    settings = {**fields, "out_dir": str(trial_dir), "n_eval": n_eval}
    record_path = trial_dir / "trial.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            print(f"[{name}] cached", flush=True)
            return record
    job = DemoJob(**settings)
    print(f"[{name}] align: {job.align_steps} steps, lr {job.align_lr}, "
          f"{'full parameters' if job.align_rank == 0 else f'LoRA rank {job.align_rank}'}", flush=True)
    start = time.perf_counter()
    summary = run_train_job(_train_job(job, "align", **align_stage_args(job)))
    align_s = time.perf_counter() - start
    eval_path = trial_dir / "eval_aligned.json"
    start = time.perf_counter()
    record = run_evaluation(_eval_config(job, str(trial_dir / "align" / "hf")), out=eval_path)
    eval_s = time.perf_counter() - start
    stats = eval_statistics({"aligned": eval_path})["models"]["aligned"]["ci"]
    m = record["metrics"]
    result = {"settings": settings, "align_s": align_s, "eval_s": eval_s, "eval_after": summary["eval_after"],
              "asr": m["asr/heldout"], "asr_ci": stats["asr"],
              "over_refusal": m["over_refusal/heldout"], "over_refusal_ci": stats["over_refusal"],
              "gsm8k_loss": m["loss/gsm8k_eval"]}
    record_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def table(results: dict[str, dict]) -> str:
    def rate(value, ci):
        return f"{100 * value:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    lines = ["| trial | align | steps | lr | max_len | benign ratio | align s | eval s | ASR [95 %] | "
             "over-refusal [95 %] | GSM8K loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        s = r["settings"]
        kind = "full" if s["align_rank"] == 0 else f"LoRA r{s['align_rank']}"
        # records from before align_max_len / align_benign_ratio existed: the align stage used max_len and 3.0
        max_len, ratio = s.get("align_max_len", s["max_len"]), s.get("align_benign_ratio", 3.0)
        lines.append(f"| {name} | {kind} | {s['align_steps']} | {s['align_lr']:g} | {max_len} | {ratio:g} | "
                     f"{r['align_s']:.0f} | {r['eval_s']:.0f} | {rate(r['asr'], r['asr_ci'])} | "
                     f"{rate(r['over_refusal'], r['over_refusal_ci'])} | {r['gsm8k_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo_align_trials"))
    p.add_argument("--trial", action="append", required=True, help="NAME:FIELD=VALUE,... (DemoJob fields)")
    p.add_argument("--n-eval", type=int, default=100, help="held-out harmful and benign prompts (each)")
    args = p.parse_args(argv)
    trials = dict(parse_trial(t) for t in args.trial)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "trials.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, fields in trials.items():
        results[name] = run_trial(args.out, name, fields, args.n_eval)
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        (args.out / "trials.md").write_text(table(results))
        print(table({name: results[name]}), flush=True)
    print(f"wrote {results_path} and {args.out / 'trials.md'}")


if __name__ == "__main__":
    main()
