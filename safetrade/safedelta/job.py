"""`safetrade safedelta`: aligned + fine-tuned checkpoints -> Safe Delta params, an HF dir and a report.

    job = SafeDeltaJob(aligned="runs/align/hf", finetuned="runs/attack/hf", out_dir="runs/safedelta",
                       safedelta=SafeDeltaConfig(s=0.1, damp=0.05))
    report = run_safe_delta_job(job)

Every knob of the method lives in the nested `safedelta` section (a `SafeDeltaConfig`), so YAML and dotted
overrides reach all of them: `safedelta.damp=0.05`, or on the command line the bare `damp=0.05`
(`nest_method_overrides` moves a bare key that names a SafeDeltaConfig field, and no job field, under
`safedelta.`). `seed` is the job's calibration-sample seed; the random ablation's seed is `safedelta.seed`.

Stages (each timed in the report): load both models (a PEFT adapter dir as `finetuned` is merged onto the aligned
model first, so LoRA fine-tunes are handled on their merged delta); safety Hessians from the *aligned* model on the
calibration rows (prompt + refusal, chat-formatted), through the generic capture and cached on disk by model +
data fingerprint, so repeated requests skip it; the transform; export. With `safedelta.stream_layers=N` (N > 0)
both models are loaded into host memory and the Hessians and the transform run layer by layer, so a 7-8B request
fits one GPU (docs/safedelta.md, "Memory at 7-8B").

Calibration default: 128 refusal rows of the built alignment set (AdvBench "align" prompts with the project's
refusals) -- the aligned model's own safety data, as in the paper (harmful prompts + safe responses); never an
evaluation prompt. Any built set, registered dataset or file with responses can be named instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from safetrade import hub
from safetrade.config import DataSection
from safetrade.data import take
from safetrade.data.batching import make_batch
from safetrade.data.formatting import encode_rows
from safetrade.data.sets import rows_for
from safetrade.errors import SafetradeError
from safetrade.models import io, lora
from safetrade.safedelta.config import SafeDeltaConfig
from safetrade.safedelta.llama_adapter import KERNELS, collect_llama_hessians
from safetrade.safedelta.tree import safe_delta
from safetrade.tokenizer import load_tokenizer

METHOD_SECTION = "safedelta"


@dataclasses.dataclass(frozen=True)
class SafeDeltaJob:
    aligned: str = "runs/align/hf"
    finetuned: str = "runs/attack/hf"  # an HF dir / model name, or a PEFT adapter dir trained on `aligned`
    out_dir: str = "runs/safedelta"
    safedelta: SafeDeltaConfig = SafeDeltaConfig()
    calibration: str = "alignment_refusals"
    n_calibration: int = 128
    max_len: int = 256
    batch_size: int = 8
    seed: int = 0  # calibration sample
    cache_dir: str | None = None  # default: $SAFETRADE_CACHE/hessians
    export: bool = True


def nest_method_overrides(overrides) -> list[str]:
    """KEY=VALUE overrides with a bare SafeDeltaConfig field (damp=0.05) moved under `safedelta.`; job fields,
    dotted keys and anything else pass through unchanged (config.load reports unknown keys)."""
    job_fields = {f.name for f in dataclasses.fields(SafeDeltaJob)}
    method_fields = {f.name for f in dataclasses.fields(SafeDeltaConfig)}
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        nested = "=" in item and "." not in key and key in method_fields and key not in job_fields
        out.append(f"{METHOD_SECTION}.{item.strip()}" if nested else item)
    return out


def calibration_rows(name: str, n: int, seed: int) -> list[dict]:
    if name == "alignment_refusals":
        rows = [r for r in rows_for("alignment", DataSection(seed=seed)) if r.get("role") == "refusal"]
    else:
        rows = [r for r in rows_for(name, DataSection(seed=seed)) if r.get("response")]
    if len(rows) < n:
        raise SafetradeError(f"calibration set {name!r} has {len(rows)} rows with responses; {n} asked for")
    return take(rows, n, f"calibration-{seed}")


def calibration_batches(tokenizer, rows: list[dict], max_len: int, batch_size: int):
    """(encoded examples, encoding report, right-padded batches of `batch_size`, all padded to the longest)."""
    examples, report = encode_rows(tokenizer, rows, max_len=max_len, policy="truncate", dataset="calibration")
    if not examples:
        raise SafetradeError(f"no calibration row fits max_len={max_len} (the prompt alone is longer); raise it")
    longest = max(len(e["input_ids"]) for e in examples)
    pad = tokenizer.pad_token_id or 0
    batches = [make_batch(examples[i:i + batch_size], longest, batch_size, pad_id=pad)
               for i in range(0, len(examples), batch_size)]
    return examples, report, batches


def load_finetuned(path: str, cfg, aligned_params):
    """(cfg, full params) of a fine-tuned model: an HF dir / name, or a PEFT adapter dir merged onto `aligned`."""
    if (Path(path) / lora.CONFIG_NAME).exists():
        lora_cfg, with_adapters = lora.load_peft(path, cfg, aligned_params)
        return lora.merge(lora_cfg, with_adapters)
    return io.load_model(path)


def finished_report(job: SafeDeltaJob) -> dict | None:
    """The report of an earlier run of exactly this job in job.out_dir, or None.

    report.json is written after the model, so its presence with the same job settings means the output is
    complete; a run killed earlier leaves no report and is redone.
    """
    path = Path(job.out_dir) / "report.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    exported = not job.export or (Path(job.out_dir) / "hf" / "config.json").exists()
    return summary if summary.get("job") == json.loads(json.dumps(dataclasses.asdict(job))) and exported else None


def run_safe_delta_job(job: SafeDeltaJob, *, reuse: bool = False) -> dict:
    if reuse and (summary := finished_report(job)) is not None:
        print(f"{job.out_dir}: reusing the finished Safe Delta run with the same settings", flush=True)
        return summary
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.perf_counter()
    stream = job.safedelta.stream_layers > 0
    # Streaming keeps both models in host memory (the CPU device): only layers travel to the accelerator.
    with jax.default_device(jax.devices("cpu")[0]) if stream else contextlib.nullcontext():
        cfg, aligned = io.load_model(job.aligned)
        ft_cfg, finetuned = load_finetuned(job.finetuned, cfg, aligned)
    tokenizer = load_tokenizer(job.aligned)
    if ft_cfg.replace(lora=None) != cfg.replace(lora=None):
        raise SafetradeError(f"{job.finetuned} is not the same architecture as {job.aligned}")
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rows = calibration_rows(job.calibration, job.n_calibration, job.seed)
    examples, report, batches = calibration_batches(tokenizer, rows, job.max_len, job.batch_size)
    cache_dir = job.cache_dir or os.fspath(hub.cache_dir() / "hessians")
    hessians = collect_llama_hessians(cfg, aligned, batches, cache_dir=cache_dir, stream=stream)
    timings["hessians_s"] = time.perf_counter() - start

    start = time.perf_counter()
    params, sd_report = safe_delta(aligned, finetuned, hessians, job.safedelta, kernels=KERNELS)
    timings["transform_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if job.export:
        io.save_hf(out / "hf", cfg, params, tokenizer=tokenizer)
    timings["export_s"] = time.perf_counter() - start

    summary = {"job": dataclasses.asdict(job), "timings": timings, "calibration": report.summary(),
               "n_calibration_sequences": len(examples), "kept_fraction": sd_report["kept_fraction"],
               "damping_fallbacks": sd_report["damping_fallbacks"], "kernels": sd_report["kernels"]}
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    plot_report(summary, out / "kept_fraction.png")
    return summary


def plot_report(summary: dict, path: Path) -> None:
    """Kept fraction and safety budget spent per layer, one line per kernel."""
    # matplotlib is imported here, not at the top: measured 0.7 s of import, paid only when a report is drawn.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, stats in summary["kernels"].items():
        label = name.split("/")[-2]
        ax1.plot(stats["kept_fraction"], label=label)
        spent, budget = np.asarray(stats["spent"]), np.asarray(stats["budget"])
        ax2.plot(spent / np.maximum(budget, 1e-30), label=label)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("kept fraction of delta entries")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("safety cost spent / budget")
    ax1.legend(fontsize=7, ncol=2)
    cfg = summary["job"][METHOD_SECTION]
    fig.suptitle(f"Safe Delta ({cfg['mode']}, s={cfg['s']}, ablation={cfg['ablation']}): "
                 f"kept {summary['kept_fraction']:.1%} overall", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
