"""`safetrade defend`: a post-hoc weight defense on checkpoints -> defended params, an HF dir and a report.

    job = DefendJob(method="safe_lora", aligned="runs/align/hf", unaligned="smollm2-135m-instruct",
                    finetuned="runs/attack/hf", out_dir="runs/defend/safe_lora",
                    safe_lora=SafeLoraConfig(num_layers=10))
    report = run_defend_job(job)

`method` picks the transform ("safe_lora" or "resta"); its knobs live in the section of the same name, so YAML and
dotted overrides reach all of them (`safe_lora.num_layers=20`, `resta.gamma=0.5`), and a bare knob of the chosen
method works too (`num_layers=20`). The three checkpoints must share one architecture: `unaligned` is the model
before alignment (for the embedded demo: the SmolLM2-135M-Instruct GGUF the alignment started from; for users, the
base of a base/chat pair). `finetuned` is an HF directory / model name, or a PEFT adapter directory trained on
`aligned`: Safe LoRA then works on the adapters themselves (its LoRA form) and the result is merged; Resta works
on the merged model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax

from safetrade.defenses.resta import RestaConfig
from safetrade.defenses.safe_lora import SafeLoraConfig
from safetrade.errors import SafetradeError
from safetrade.models import io, lora
from safetrade.safedelta.job import load_finetuned

METHODS = ("safe_lora", "resta")


@dataclasses.dataclass(frozen=True)
class DefendJob:
    method: str = "safe_lora"  # "safe_lora" | "resta"
    aligned: str = "runs/align/hf"
    unaligned: str = "smollm2-135m-instruct"  # the model `aligned` was aligned from
    finetuned: str = "runs/attack/hf"  # HF dir / model name, or a PEFT adapter dir trained on `aligned`
    out_dir: str = "runs/defend"
    safe_lora: SafeLoraConfig = SafeLoraConfig()
    resta: RestaConfig = RestaConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise SafetradeError(f"method={self.method!r}; choose one of {', '.join(METHODS)}")


def nest_method_overrides(overrides, method: str | None = None) -> list[str]:
    """Bare KEY=VALUE overrides naming a knob of the chosen method (and no job field) move under `<method>.`."""
    chosen = method
    for o in overrides:
        if o.startswith("method="):
            chosen = o.split("=", 1)[1].strip()
    chosen = chosen or DefendJob.method
    if chosen not in METHODS:
        return list(overrides)
    section = {"safe_lora": SafeLoraConfig, "resta": RestaConfig}[chosen]
    knobs = {f.name for f in dataclasses.fields(section)}
    job_fields = {f.name for f in dataclasses.fields(DefendJob)}
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        out.append(f"{chosen}.{o}" if "." not in key and key in knobs and key not in job_fields else o)
    return out


def _load(path: str, what: str):
    try:
        return io.load_model(path, dtype="float32")
    except SafetradeError as e:
        raise SafetradeError(f"{what} checkpoint {path}: {e}") from e


def _tokenizer_or_none(path: str):
    from safetrade.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except SafetradeError:
        return None


def run_defend_job(job: DefendJob) -> dict:
    """Load the three checkpoints, apply the method, write out_dir/hf and out_dir/report.json; return the report."""
    timings, start = {}, time.perf_counter()
    cfg, aligned = _load(job.aligned, "aligned")
    cfg_u, unaligned = _load(job.unaligned, "unaligned")
    if (cfg_u.num_layers, cfg_u.hidden_size, cfg_u.vocab_size) != (cfg.num_layers, cfg.hidden_size, cfg.vocab_size):
        raise SafetradeError(f"unaligned checkpoint {job.unaligned} has another architecture than aligned "
                             f"{job.aligned} ({cfg_u.num_layers} layers x {cfg_u.hidden_size}, vocab "
                             f"{cfg_u.vocab_size} vs {cfg.num_layers} x {cfg.hidden_size}, {cfg.vocab_size})")
    adapter = (Path(job.finetuned) / lora.CONFIG_NAME).exists()
    lora_form = adapter and job.method == "safe_lora"  # Safe LoRA projects the adapters themselves, then merges
    if lora_form:
        lora_cfg, finetuned = lora.load_peft(job.finetuned, cfg, aligned)
    else:  # an adapter dir is merged onto `aligned` on load, as `safetrade safedelta` does
        try:
            _, finetuned = load_finetuned(job.finetuned, cfg, aligned)
        except SafetradeError as e:
            raise SafetradeError(f"finetuned checkpoint {job.finetuned}: {e}") from e
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    method = job.safe_lora if job.method == "safe_lora" else job.resta
    params, report = method.run(aligned, unaligned, finetuned)
    if lora_form:
        params = lora.merge(lora_cfg, params)[1]
    params = jax.block_until_ready(params)
    timings["transform"] = time.perf_counter() - start

    start = time.perf_counter()
    out = Path(job.out_dir)
    io.save_hf(out / "hf", cfg.replace(lora=None), params, tokenizer=_tokenizer_or_none(job.aligned))
    timings["export"] = time.perf_counter() - start
    summary = {"job": dataclasses.asdict(job), "finetuned_is_adapter": adapter, "timings": timings,
               "report": report}
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    return summary
