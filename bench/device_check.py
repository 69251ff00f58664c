#!/usr/bin/env python3
"""One prepared check of safetrade on one NVIDIA GPU: correctness, then the speed of every hot path, in <= 7 minutes.

    make device-check DEVICE_CHECK_OUT=$OUT            # = python3 bench/device_check.py --out $OUT
    python3 bench/device_check.py --out out --only train,generate --cap train=200
    python3 bench/device_check.py --dry-run --out /tmp/dc      # every section at tiny shapes on the CPU, in seconds

It runs with the image's preinstalled python3 (JAX, flax, optax, orbax, transformers, torch, peft): no venv, no
package index, no model download (every model has random weights of the real shapes). Sections, in this order
(cheap and essential first):

  versions     python and library versions, device kind, memory, CUDA / driver, the bf16 peak used for MFU
               (PEAK_BF16_TFLOPS below), and a measured bf16 matmul for scale
  correctness  the tiny golden models of tests/golden/data (logits and hidden states against transformers', within
               tests/test_llama.py's 1e-4, fp32 with jax_default_matmul_precision=highest) and KV-cache greedy
               decoding == full recompute, on the device
  train        tokens/s and MFU of the project's train step (train/step.py + train/jobs.make_optimizer) on a
               Llama-3.2-1B-shaped model, 2048-token rows, bf16 compute with fp32 masters, full fine-tuning and
               LoRA; then transformers + torch (LlamaForCausalLM from the same config, fp32 masters under bf16
               autocast, bench/torch_train_step.py) on the same GPU, and the ratio
  generate     greedy decode tokens/s at batch 1 and 64 (1B shape, bf16) against transformers' generate in torch
               (bench/forward.py's timing, bench/torch_forward.py)
  sqsd         SQSD scoring samples/s, vmapped per-example gradients vs the same code at batch 1 (score_samples;
               LoRA r = 8 on all projections, 256 tokens, 1B shape)
  safedelta    Safe Delta on a Llama-2-7B-shaped model: Hessian collection (128 x 512 tokens) + the whole-model
               transform, as a first request and as a repeat request that reads the cached Hessians

Every section runs its work in child processes (python3 bench/device_check.py --part NAME), each killed at the
section's cap, so a hang or an out-of-memory loses that section only; the driver itself never imports JAX. As soon
as a section ends, <out>/<section>.json is written (status ok / failed / timed_out / skipped, wall time, every
figure, the goals of the issue with met / not met, and the parts' logs' tails), a block is appended to
<out>/summary.md, and <out>/results.md (the block to paste into bench/RESULTS.md, rebuilt from every JSON in the
folder) is rewritten: a killed run keeps what finished, and a section that was killed keeps the figures its
child had recorded before (train keeps the full-FT row when LoRA is killed, for instance). The folder gets 8
files at most (the device tool returns 8). Logs, the torch models' config.json and the Safe Delta Hessian cache
(about 22 GB at 7B) go to --work-dir (a fresh temp folder by default).

Timing: the JAX numbers exclude compilation (reported separately): each measurement runs after a warm-up call of
the same shapes, and every timed step waits for its results (block_until_ready / torch.cuda.synchronize).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 bench/device_check.py` from a checkout without `pip install`
    sys.path.insert(0, str(REPO))

WHEELS_HELP = """\
missing pure-Python packages (the GPU image has no package index):
  The check itself needs nothing beyond the image (jax, flax, optax, orbax, chex, transformers, torch, peft,
  safetensors, tokenizers, numpy, pyyaml, tqdm, scipy): it never reads GGUF files (gguf) or imports datasets
  or rouge-score. Code that does (a GGUF model, a `datasets` id, ROUGE) can bring them as wheels inside the
  repository (64 MiB travel in all; `.whl/` is already git-ignored). On a machine with pip access, in the repository root:
    python3 -m pip download --no-deps --only-binary=:all: -d .whl gguf==0.19.0   # pure Python (py3-none-any)
    python3 -m pip wheel --no-deps -w .whl rouge_score==0.1.2                    # an sdist only: build the wheel
  (name every missing dependency too; `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` lists them),
  carry `.whl` to the device and start the command with
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site
  A wheel with compiled code needs `--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64`
  (and the other manylinux tags) on the download line; /work/.library/device/README.md has the full recipe.
"""

# Dense (no sparsity) bf16 tensor-core peak per device kind, in TFLOP/s, the denominator of MFU. Sources: NVIDIA's
# datasheets, which quote the 2:4-sparsity figure (H100 SXM / H200: 1,979; H100 PCIe: 1,513; H100 NVL: 1,671;
# A100: 624) whose half is the dense peak. Matched against jax's device_kind in order (first substring wins).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0, "NVIDIA GH200 datasheet: 989 TFLOP/s dense bf16 (H100 SXM-class tensor cores)"),
    ("H200", 989.0, "NVIDIA H200 datasheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense"),
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet: 1,513 TFLOP/s bf16 with sparsity, 756 dense"),
    ("H100 NVL", 835.0, "NVIDIA H100 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity, 835 dense"),
    ("H100", 989.0, "NVIDIA H100 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 624 TFLOP/s bf16 with sparsity, 312 dense"),
)


def peak_for(device_kind: str | None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it comes from), or (None, why MFU is omitted)."""
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if device_kind and key.lower() in device_kind.lower():
            return tflops, source
    return None, (f"MFU omitted: no bf16 peak known for device kind {device_kind!r} "
                  f"(bench/device_check.py PEAK_BF16_TFLOPS knows {', '.join(k for k, _, _ in PEAK_BF16_TFLOPS)})")


# ----------------------------------------------------------------------------------------------------------------
# Sections: their settings (full and --dry-run), caps and goals

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SETTINGS = {
    "versions": {"matmul_n": 8192},
    "correctness": {"atol": 1e-4, "new_tokens": 20, "compare_default_precision": True},
    "train": {"preset": "llama3_2_1b", "seq": 2048, "batches": [4, 2, 1], "steps": 10, "warmup": 3,
              "dtype": "bfloat16", "param_dtype": "float32", "remat": False, "lr": 1e-5,
              "lora_rank": 16, "lora_alpha": 32.0, "lora_targets": ALL_PROJECTIONS, "memory_headroom": 0.95},
    "generate": {"preset": "llama3_2_1b", "dtype": "bfloat16", "batches": [1, 64], "prompt_len": 128,
                 "new_tokens": 64, "repeats": 3},
    "sqsd": {"preset": "llama3_2_1b", "dtype": "float32", "rank": 8, "alpha": 16.0, "b_std": 0.01, "tokens": 256,
             "prompt_tokens": 64, "n": 64, "batch": 16},
    "safedelta": {"preset": "llama2_7b", "dtype": "float32", "sequences": 128, "tokens": 512, "batch": 8,
                  "noise_std": 1e-3, "s": 0.1},
}
DRY_RUN_SETTINGS = {
    "versions": {"matmul_n": 256},
    "correctness": {"new_tokens": 8, "compare_default_precision": False},
    "train": {"preset": "tiny", "seq": 32, "batches": [2], "steps": 2, "warmup": 1},
    "generate": {"preset": "tiny", "batches": [1, 4], "prompt_len": 8, "new_tokens": 8, "repeats": 1},
    "sqsd": {"preset": "tiny", "tokens": 32, "prompt_tokens": 8, "n": 8, "batch": 4},
    "safedelta": {"preset": "tiny", "sequences": 4, "tokens": 16, "batch": 2},
}
SECTIONS = tuple(SETTINGS)
# Seconds per section on the GPU (upper bounds; --budget caps the whole run) and on the CPU at dry-run shapes.
CAPS = {"versions": 30, "correctness": 40, "train": 150, "generate": 90, "sqsd": 90, "safedelta": 180}
DRY_RUN_CAP = 120
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
BUDGET_S = 420  # the issue's 7 minutes
DRY_RUN_BUDGET_S = 900

# The issue's goals (threshold, comparison); checked where the figure exists, "undetermined" where it does not.
GOAL_FULL_MFU, GOAL_LORA_MFU, GOAL_TRAIN_RATIO = 0.45, 0.35, 1.3
GOAL_SD_CACHED_S, GOAL_SD_FIRST_S = 30.0, 60.0
GOAL_SQSD_RATIO = 10.0
GOAL_DECODE_RATIO = 2.0


def settings_for(section: str, dry_run: bool, overrides: dict) -> dict:
    spec = dict(SETTINGS[section])
    if dry_run:
        spec.update(DRY_RUN_SETTINGS.get(section, {}))
    spec.update(overrides.get(section, {}))
    return spec


def _parse_value(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.strip()


def parse_overrides(items: list[str]) -> dict:
    """--set SECTION.KEY=VALUE (VALUE: JSON, or for a list setting a comma list) -> {section: {key: value}}."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SETTINGS:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)}")
        if name not in SETTINGS[section]:
            raise SystemExit(f"--set {item!r}: {section} has no setting {name!r}; it has {', '.join(SETTINGS[section])}")
        value = _parse_value(raw)
        if isinstance(SETTINGS[section][name], list) and not isinstance(value, list):
            value = [_parse_value(x) for x in str(raw).split(",") if x.strip()]
        out.setdefault(section, {})[name] = value
    return out


def parse_caps(items: list[str]) -> dict[str, float]:
    caps = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in SETTINGS:
            raise SystemExit(f"--cap {item!r}: expected SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)}")
        caps[name] = float(raw)
    return caps


# ----------------------------------------------------------------------------------------------------------------
# Driver: child processes with deadlines (stdlib only; JAX is imported in the children)


class PartStopped(Exception):
    """A part that did not finish (timed out or failed): the section stops and keeps what was recorded."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class Interrupted(BaseException):
    pass


_RUNNING: set = set()


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _on_signal(signum, _frame):
    for proc in list(_RUNNING):
        _kill_group(proc)
    raise Interrupted(f"signal {signum}")


def tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def last_json_line(text: str):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def run_process(cmd: list[str], timeout: float, env: dict, log: Path) -> tuple[str, int | None, str, float]:
    """(status ok / failed / timed_out, return code, stdout, wall s). The child gets its own process group (not a
    new session: a session would outlive a killed driver), killed whole at the deadline."""
    start = time.monotonic()
    with open(log, "w") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO,
                                process_group=0)
        _RUNNING.add(proc)
        try:
            out, _ = proc.communicate(timeout=max(timeout, 0.01))
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            status = "timed_out"
        except BaseException:
            _kill_group(proc)
            proc.communicate()
            raise
        finally:
            _RUNNING.discard(proc)
    return status, proc.returncode, out or "", time.monotonic() - start


@dataclasses.dataclass
class Context:
    """One section's run: its settings, deadline, parts so far and the run-wide options."""

    section: str
    spec: dict
    deadline: float
    run: "Run"
    parts: dict = dataclasses.field(default_factory=dict)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left < 0.05:
            raise PartStopped("timed_out", f"{self.section}: no time left under its cap for the next part")
        return left

    def jax_part(self, name: str, extra: dict | None = None) -> dict:
        """Run PARTS[name] in a child python (this script with --part); returns its result or raises PartStopped
        (the figures it recorded before stopping stay in self.parts[name]["result"])."""
        work = self.run.work_dir
        spec = {**self.spec, **(extra or {}), "work_dir": str(work), "dry_run": self.run.dry_run}
        if self.run.sleep.get(self.section):
            spec["_sleep"] = self.run.sleep[self.section]
        spec_path, partial = work / f"{name}.spec.json", work / f"{name}.partial.json"
        spec_path.write_text(json.dumps(spec))
        partial.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--spec", str(spec_path),
               "--partial", str(partial)]
        log = work / f"{name}.log"
        status, rc, out, wall = run_process(cmd, self.remaining(), self.run.jax_env(), log)
        result = last_json_line(out) if status == "ok" else None
        if result is None:
            result = json.loads(partial.read_text()) if partial.exists() else {}
            status = "failed" if status == "ok" else status
        self.parts[name] = {"status": status, "kind": "jax", "return_code": rc, "wall_s": wall, "result": result,
                            "log": str(log), "log_tail": tail(log) if status != "ok" else tail(log, 1500)}
        if status != "ok":
            raise PartStopped(status, f"part {name} {status} after {wall:.1f}s (log {log})")
        return result

    def torch_part(self, name: str, script: str, args: list[str]) -> dict | None:
        """Run bench/<script> with the torch python; None (and a 'skipped' part) when torch is not there.
        A failed torch run is recorded and the section goes on; a timeout stops the section."""
        why = self.run.torch_missing()
        if why:
            self.parts[name] = {"status": "skipped", "kind": "torch", "reason": why}
            return None
        log = self.run.work_dir / f"{name}.log"
        cmd = [self.run.torch_python, str(REPO / "bench" / script), *args]
        status, rc, out, wall = run_process(cmd, self.remaining(), self.run.torch_env(), log)
        result = last_json_line(out)
        if status == "ok" and (result is None or result.get("ok") is False):
            status = "failed"
        self.parts[name] = {"status": status, "kind": "torch", "return_code": rc, "wall_s": wall, "result": result,
                            "log": str(log), "log_tail": tail(log) if status != "ok" else tail(log, 1500)}
        if status == "timed_out":
            raise PartStopped(status, f"torch part {name} timed out after {wall:.1f}s (log {log})")
        return result if status == "ok" else None


class Run:
    """Run-wide options and environment for the children."""

    def __init__(self, args, work_dir: Path):
        self.dry_run = args.dry_run
        self.work_dir = work_dir
        self.torch_python = args.torch_python or sys.executable
        self.sleep = {k: float(v) for k, v in (item.split("=", 1) for item in args.test_sleep)}
        self.compile_cache = None if args.dry_run else args.compile_cache
        self._torch_missing: str | None | bool = False

    def jax_env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if self.dry_run:
            env["JAX_PLATFORMS"] = "cpu"  # tiny shapes on the CPU, even on a GPU machine
            # The dry run is all compilation (tiny programs run in microseconds): cheaper LLVM passes halve it.
            env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), DRY_RUN_XLA_FLAGS]).strip()
        else:
            # Nothing else shares the device while a child runs (parts run one at a time), and Safe Delta at 7B
            # needs ~105 GB: let JAX take more than its default 75 %.
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
            if self.compile_cache:
                env.setdefault("JAX_COMPILATION_CACHE_DIR", self.compile_cache)
        return env

    def torch_env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def torch_device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def torch_missing(self) -> str | None:
        """None when the torch python has torch and transformers, else why the torch half is skipped."""
        if self._torch_missing is False:
            probe = ("import importlib.util as u, sys; missing = [m for m in ('torch', 'transformers') "
                     "if u.find_spec(m) is None]; print(','.join(missing)); sys.exit(3 if missing else 0)")
            try:
                proc = subprocess.run([self.torch_python, "-c", probe], capture_output=True, text=True, timeout=60)
                self._torch_missing = None if proc.returncode == 0 else (
                    f"skipped: {proc.stdout.strip() or 'torch'} not installed (in {self.torch_python})")
            except (OSError, subprocess.TimeoutExpired) as exc:
                self._torch_missing = f"skipped: cannot run the torch python {self.torch_python!r} ({exc})"
        return self._torch_missing


# ----------------------------------------------------------------------------------------------------------------
# Section bodies (driver side): which parts run, and how their results combine


def goal(text: str, value, threshold: float, higher_is_better: bool = True, unit: str = "") -> dict:
    """A speed goal of the issue; judged on the device only (a dry run's tiny CPU timings say nothing)."""
    met = None if value is None else (value >= threshold if higher_is_better else value < threshold)
    return {"goal": text, "kind": "speed", "value": value, "threshold": threshold, "unit": unit, "met": met}


def check(text: str, met) -> dict:
    """A correctness check: judged in a dry run too."""
    return {"goal": text, "kind": "check", "value": None, "threshold": None, "unit": "", "met": met}


def run_versions(ctx: Context) -> None:
    ctx.jax_part("versions")


def combine_versions(ctx: Context) -> tuple[dict, list]:
    result = dict(ctx.parts.get("versions", {}).get("result") or {})
    peak, source = peak_for(result.get("device_kind"))
    result.update(peak_bf16_tflops=peak, peak_source=source)
    return result, []


def run_correctness(ctx: Context) -> None:
    ctx.jax_part("correctness")


def combine_correctness(ctx: Context) -> tuple[dict, list]:
    result = dict(ctx.parts.get("correctness", {}).get("result") or {})
    golden = result.get("golden") or {}
    kv = result.get("kv_cache") or {}
    goals = [
        check(f"tiny golden logits and hidden states within {ctx.spec['atol']:g} of transformers' (fp32, matmul "
              "precision highest), every variant", all(v.get("pass") for v in golden.values()) if golden else None),
        check("KV-cache greedy decoding == full recompute, every prompt of every variant",
              all(v.get("equal") for v in kv.values()) if kv else None),
    ]
    return result, goals


def run_train(ctx: Context) -> None:
    jax_result = ctx.jax_part("train_jax")
    rows = {r: jax_result.get(r) or {} for r in ("full", "lora")}
    s = ctx.spec
    args = [jax_result["hf_config_dir"], "--random-weights", "--device", ctx.run.torch_device(),
            "--autocast", "bfloat16", "--seq", str(s["seq"]), "--steps", str(s["steps"]),
            "--warmup", str(s["warmup"]), "--lr", str(s["lr"]), "--b2", str(jax_result["optimizer"]["b2"]),
            "--weight-decay", str(jax_result["optimizer"]["weight_decay"]),
            "--clip-norm", str(jax_result["optimizer"]["clip_norm"]), "--lora-rank", str(s["lora_rank"]),
            "--lora-alpha", str(s["lora_alpha"]), "--lora-targets", ",".join(s["lora_targets"]),
            "--batch", str(rows["full"].get("batch") or s["batches"][-1]),
            "--lora-batch", str(rows["lora"].get("batch") or s["batches"][-1])]
    ctx.torch_part("train_torch", "torch_train_step.py", args)


def combine_train(ctx: Context) -> tuple[dict, list]:
    jax_result = ctx.parts.get("train_jax", {}).get("result") or {}
    torch_part = ctx.parts.get("train_torch", {})
    torch_result = torch_part.get("result") or {}
    peak, source = peak_for(jax_result.get("device_kind"))
    rows = {}
    for name in ("full", "lora"):
        ours = jax_result.get(name) or {}
        tps, flops = ours.get("tokens_per_s"), ours.get("flops_per_token")
        theirs = torch_result.get(name) if torch_part.get("status") == "ok" else None
        rows[name] = {
            "batch": ours.get("batch"), "seq": ours.get("seq"),
            "safetrade_tokens_per_s": tps, "torch_tokens_per_s": theirs,
            "ratio": tps / theirs if tps and theirs else None,
            "model_tflops_per_s": tps * flops / 1e12 if tps and flops else None,
            "mfu": tps * flops / 1e12 / peak if tps and flops and peak else None,
            "torch_mfu": theirs * flops / 1e12 / peak if theirs and flops and peak else None,
            "flops_per_token": flops, "compile_s": ours.get("compile_s"), "step_s": ours.get("step_s_median"),
            "loss": ours.get("loss"), "xla_memory_gib": ours.get("xla_memory_gib"),
            "peak_gib_in_use": ours.get("peak_gib_in_use"), "attempts": ours.get("attempts"),
        }
    result = {"model": jax_result.get("model"), "optimizer": jax_result.get("optimizer"),
              "device_kind": jax_result.get("device_kind"), "peak_bf16_tflops": peak, "peak_source": source,
              "rows": rows, "flops_formula": FLOPS_FORMULA,
              "torch": ({k: torch_result.get(k) for k in ("torch", "device", "autocast", "attn_implementation",
                                                           "peak_memory_gib", "loss", "lora_skipped")}
                        if torch_result else None),
              "torch_status": torch_part.get("status"), "torch_reason": torch_part.get("reason")}
    goals = [goal("full fine-tuning MFU >= 45 %", rows["full"]["mfu"], GOAL_FULL_MFU),
             goal("LoRA MFU >= 35 %", rows["lora"]["mfu"], GOAL_LORA_MFU),
             goal("full fine-tuning >= 1.3x torch tokens/s", rows["full"]["ratio"], GOAL_TRAIN_RATIO, unit="x"),
             goal("LoRA >= 1.3x torch tokens/s", rows["lora"]["ratio"], GOAL_TRAIN_RATIO, unit="x")]
    return result, goals


FLOPS_FORMULA = ("MaxText's model-FLOPs convention (bench/train_step.py model_flops_per_step): every weight costs 6 "
                 "FLOPs per token (2 forward, 2 for the activation gradient, 2 for the weight gradient) and causal "
                 "attention 6*L*S*H*Dh per token (QK^T and PV, 2*2*S*H*Dh per layer forward, halved by the mask, x3 "
                 "with the backward); with LoRA the frozen weights get no weight gradient: 4*N + 6*N_adapters. "
                 "N counts the tied embedding once (the LM head matmul). Remat recomputation is not counted.")


def run_generate(ctx: Context) -> None:
    jax_result = ctx.jax_part("generate_jax")
    s = ctx.spec
    args = ["--model-dir", jax_result["hf_config_dir"], "--random-weights", "--prompts", jax_result["prompts_file"],
            "--new-tokens", str(s["new_tokens"]), "--repeats", str(s["repeats"]), "--dtype", s["dtype"],
            "--device", ctx.run.torch_device()]
    ctx.torch_part("generate_torch", "torch_forward.py", args)


def combine_generate(ctx: Context) -> tuple[dict, list]:
    ours_all = (ctx.parts.get("generate_jax", {}).get("result") or {}).get("batches") or {}
    torch_part = ctx.parts.get("generate_torch", {})
    theirs_all = (torch_part.get("result") or {}).get("results") or {} if torch_part.get("status") == "ok" else {}
    rows = {}
    for b in ctx.spec["batches"]:
        ours, theirs = ours_all.get(str(b)) or {}, theirs_all.get(str(b)) or {}
        decode, torch_decode = ours.get("decode_tok_s"), theirs.get("decode_tok_s")
        rows[str(b)] = {"batch": b, "safetrade_decode_tok_s": decode, "torch_decode_tok_s": torch_decode,
                        "ratio": decode / torch_decode if decode and torch_decode else None,
                        "safetrade_decode_loop_tok_s": ours.get("decode_direct_tok_s"),
                        "safetrade_prefill_tok_s": ours.get("prefill_tok_s"),
                        "torch_prefill_tok_s": theirs.get("prefill_tok_s"), "compile_s": ours.get("compile_s")}
    biggest = str(max(ctx.spec["batches"]))
    result = {"model": (ctx.parts.get("generate_jax", {}).get("result") or {}).get("model"),
              "prompt_len": ctx.spec["prompt_len"], "new_tokens": ctx.spec["new_tokens"], "rows": rows,
              "torch": ({k: (torch_part.get("result") or {}).get(k) for k in ("torch", "transformers", "device",
                                                                               "dtype")}
                        if torch_part.get("status") == "ok" else None),
              "torch_status": torch_part.get("status"), "torch_reason": torch_part.get("reason")}
    return result, [goal(f"decode at batch {biggest} >= 2x torch generate at batch {biggest}",
                         rows[biggest]["ratio"], GOAL_DECODE_RATIO, unit="x")]


def run_sqsd(ctx: Context) -> None:
    ctx.jax_part("sqsd")


def combine_sqsd(ctx: Context) -> tuple[dict, list]:
    result = dict(ctx.parts.get("sqsd", {}).get("result") or {})
    vm, b1 = result.get("vmapped") or {}, result.get("batch1") or {}
    ratio = vm["samples_per_s"] / b1["samples_per_s"] if vm.get("samples_per_s") and b1.get("samples_per_s") \
        else None
    result["ratio"] = ratio
    g = goal(f"vmapped >= 10x batch 1 (same scores within {result.get('equal_tol', 'tol')})", ratio, GOAL_SQSD_RATIO,
             unit="x")
    if g["met"] and result.get("max_abs_diff_score") is not None:
        g["met"] = bool(result["max_abs_diff_score"] <= result["equal_tol"])
    return result, [g]


def run_safedelta(ctx: Context) -> None:
    ctx.jax_part("safedelta")


def combine_safedelta(ctx: Context) -> tuple[dict, list]:
    result = dict(ctx.parts.get("safedelta", {}).get("result") or {})
    first, cached = result.get("first") or {}, result.get("cached") or {}
    return result, [goal("first request (Hessians computed and cached + transform) < 60 s", first.get("total_s"),
                         GOAL_SD_FIRST_S, higher_is_better=False, unit="s"),
                    goal("repeat request (cached Hessians + transform) < 30 s", cached.get("total_s"),
                         GOAL_SD_CACHED_S, higher_is_better=False, unit="s")]


BODIES = {
    "versions": (run_versions, combine_versions),
    "correctness": (run_correctness, combine_correctness),
    "train": (run_train, combine_train),
    "generate": (run_generate, combine_generate),
    "sqsd": (run_sqsd, combine_sqsd),
    "safedelta": (run_safedelta, combine_safedelta),
}


def run_section(name: str, cap: float, run: Run, spec: dict) -> dict:
    ctx = Context(name, spec, time.monotonic() + cap, run)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    status, reason = "ok", None
    body, combine = BODIES[name]
    t0 = time.monotonic()
    try:
        body(ctx)
    except PartStopped as stop:
        status, reason = stop.status, str(stop)
    except Interrupted as stop:
        status, reason = "interrupted", f"the driver got {stop}"
    except Exception as exc:  # noqa: BLE001 - a driver-side bug in one section must not lose the others
        status, reason = "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
    wall = time.monotonic() - t0
    try:
        results, goals = combine(ctx)
    except Exception as exc:  # noqa: BLE001
        results, goals = {}, []
        status, reason = "failed", f"combining the parts failed: {type(exc).__name__}: {exc}"
    if run.dry_run:
        for g in goals:
            if g["kind"] == "speed":
                g.update(met=None, note="dry run: not judged")
    if status == "timed_out":
        reason = f"killed at its cap of {cap:.1f}s; figures recorded before that are kept ({reason})"
    return {"section": name, "status": status, "reason": reason, "started": started, "wall_s": wall, "cap_s": cap,
            "dry_run": run.dry_run, "settings": spec, "results": results, "goals": goals, "parts": ctx.parts}


# ----------------------------------------------------------------------------------------------------------------
# Reports: <section>.json, summary.md (appended), results.md (rebuilt)


def clean(value):
    """JSON-safe: NaN / inf -> None, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_json(path: Path, data) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(clean(data), indent=1) + "\n")
    os.replace(partial, path)


def fmt(x, spec=".1f", suffix=""):
    return "–" if x is None else f"{format(x, spec)}{suffix}"


def pct(x):
    return "–" if x is None else f"{100 * x:.1f} %"


def verdict(met) -> str:
    return "undetermined" if met is None else ("**met**" if met else "**not met**")


def goal_lines(record: dict) -> list[str]:
    lines = []
    for g in record.get("goals") or []:
        value = g.get("value")
        shown = "" if value is None and g.get("threshold") is None else (
            f": {pct(value) if 'MFU' in g['goal'] else fmt(value, '.2f', g.get('unit', ''))}")
        lines.append(f"- goal: {g['goal']}{shown} -> {g.get('note') or verdict(g.get('met'))}")
    return lines


def section_markdown(record: dict) -> str:
    name, r = record["section"], record.get("results") or {}
    head = f"### {name}: {record['status']} ({record['wall_s']:.1f} s of a {record['cap_s']:.0f} s cap)"
    lines = [head, ""]
    if record.get("reason"):
        lines += [f"_{record['reason'].splitlines()[0]}_", ""]
    if name == "versions":
        pk = r.get("packages") or {}
        lines += [f"- device: {r.get('device_kind')} x{r.get('device_count')} ({r.get('backend')}), memory limit "
                  f"{fmt((r.get('memory_bytes_limit') or 0) / 2**30 or None, '.1f', ' GiB')}; "
                  f"{r.get('platform_version') or ''} {r.get('nvidia_smi') or ''}".rstrip(),
                  f"- python {r.get('python')}; " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
                  "- absent: " + (", ".join(k for k, v in pk.items() if not v) or "none"),
                  f"- bf16 peak for MFU: {fmt(r.get('peak_bf16_tflops'), '.0f', ' TFLOP/s')} ({r.get('peak_source')});"
                  f" measured bf16 matmul {r.get('matmul_n')}^3: {fmt(r.get('matmul_bf16_tflops'), '.3g', ' TFLOP/s')}"]
    elif name == "correctness":
        lines += ["| variant | max abs logits | max abs layer outputs | max abs final hidden | within atol | "
                  "KV-cache == recompute |", "|---|---:|---:|---:|---|---|"]
        kv = r.get("kv_cache") or {}
        for variant, g in (r.get("golden") or {}).items():
            h = g.get("highest") or {}
            lines.append(f"| {variant} | {fmt(h.get('logits'), '.1e')} | {fmt(h.get('layer_outputs'), '.1e')} | "
                         f"{fmt(h.get('final_hidden'), '.1e')} | {g.get('pass')} | "
                         f"{(kv.get(variant) or {}).get('equal')} |")
        default = {v: (g.get("default") or {}).get("logits") for v, g in (r.get("golden") or {}).items()}
        if any(x is not None for x in default.values()):
            lines += ["", "With the default matmul precision (for information): max abs logits "
                      + ", ".join(f"{v} {fmt(x, '.1e')}" for v, x in default.items())]
    elif name == "train":
        m = r.get("model") or {}
        lines += [f"{m.get('preset')} ({fmt((m.get('num_params') or 0) / 1e9 or None, '.2f')}B params, random weights), "
                  f"{m.get('dtype')} compute, {m.get('param_dtype')} masters, remat {m.get('remat')}; optimizer "
                  f"{r.get('optimizer')}; LoRA {m.get('lora')}; peak {fmt(r.get('peak_bf16_tflops'), '.0f')} "
                  f"TFLOP/s ({r.get('peak_source')})", "",
                  "| step | batch x seq | safetrade tok/s | MFU | torch tok/s | torch MFU | ratio | compile s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row, x in (r.get("rows") or {}).items():
            lines.append(f"| {row} | {x.get('batch')} x {x.get('seq')} | {fmt(x.get('safetrade_tokens_per_s'), '.0f')} "
                         f"| {pct(x.get('mfu'))} | {fmt(x.get('torch_tokens_per_s'), '.0f')} | {pct(x.get('torch_mfu'))}"
                         f" | {fmt(x.get('ratio'), '.2f', 'x')} | {fmt(x.get('compile_s'), '.1f')} |")
        lines += ["", f"torch: {r.get('torch') or r.get('torch_reason') or r.get('torch_status')}"]
    elif name == "generate":
        lines += [f"{(r.get('model') or {}).get('preset')} ({(r.get('model') or {}).get('dtype')}, random weights), "
                  f"prompt {r.get('prompt_len')}, {r.get('new_tokens')} new tokens, greedy", "",
                  "| batch | safetrade decode tok/s | torch decode tok/s | ratio | safetrade decode loop alone tok/s | "
                  "safetrade prefill tok/s | torch prefill tok/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for b, x in (r.get("rows") or {}).items():
            lines.append(f"| {b} | {fmt(x.get('safetrade_decode_tok_s'), '.0f')} | {fmt(x.get('torch_decode_tok_s'), '.0f')}"
                         f" | {fmt(x.get('ratio'), '.2f', 'x')} | {fmt(x.get('safetrade_decode_loop_tok_s'), '.0f')} | "
                         f"{fmt(x.get('safetrade_prefill_tok_s'), '.0f')} | {fmt(x.get('torch_prefill_tok_s'), '.0f')} |")
        lines += ["", f"torch: {r.get('torch') or r.get('torch_reason') or r.get('torch_status')}"]
    elif name == "sqsd":
        vm, b1 = r.get("vmapped") or {}, r.get("batch1") or {}
        lines += [f"{(r.get('model') or {}).get('preset')}, {r.get('n')} samples x {r.get('tokens')} tokens, LoRA r "
                  f"{r.get('rank')} on all projections", "",
                  "| path | batch | samples/s | wall s | compile s |", "|---|---:|---:|---:|---:|",
                  f"| vmapped | {vm.get('batch')} | {fmt(vm.get('samples_per_s'), '.2f')} | {fmt(vm.get('wall_s'), '.2f')}"
                  f" | {fmt(vm.get('compile_s'), '.1f')} |",
                  f"| batch 1 | 1 | {fmt(b1.get('samples_per_s'), '.2f')} | {fmt(b1.get('wall_s'), '.2f')} | "
                  f"{fmt(b1.get('compile_s'), '.1f')} |", "",
                  f"ratio {fmt(r.get('ratio'), '.2f', 'x')}; max |score difference| {fmt(r.get('max_abs_diff_score'), '.1e')}"]
    elif name == "safedelta":
        first, cached = r.get("first") or {}, r.get("cached") or {}
        lines += [f"{(r.get('model') or {}).get('preset')} ({r.get('dtype')}, random weights; fine-tuned = aligned + "
                  f"N(0, {r.get('noise_std')}^2) on every projection), {r.get('sequences')} x {r.get('tokens')} "
                  f"calibration tokens, s = {r.get('s')}", "",
                  "| request | Hessians s | transform s | total s |", "|---|---:|---:|---:|",
                  f"| first (computed, cached to disk) | {fmt(first.get('hessians_s'), '.1f')} | "
                  f"{fmt(first.get('transform_s'), '.1f')} | {fmt(first.get('total_s'), '.1f')} |",
                  f"| repeat (Hessians from the cache) | {fmt(cached.get('hessians_s'), '.1f')} | "
                  f"{fmt(cached.get('transform_s'), '.1f')} | {fmt(cached.get('total_s'), '.1f')} |", "",
                  f"kept fraction {fmt(first.get('kept_fraction'), '.4f')}; Hessian cache "
                  f"{fmt((r.get('cache_bytes') or 0) / 2**30 or None, '.1f', ' GiB')}; params "
                  f"{fmt((r.get('param_bytes') or 0) / 2**30 or None, '.1f', ' GiB')} per model (the cache key hashes "
                  f"them: host sha256 {fmt(r.get('sha256_gb_per_s'), '.2f', ' GB/s')})"]
    lines += [""] + goal_lines(record) if record.get("goals") else []
    if record.get("dry_run"):
        lines.append("- (dry run: tiny shapes on the CPU; the figures only show that the section runs)")
    return "\n".join(lines) + "\n"


def header_markdown(info: dict) -> str:
    return (f"## device check {info['date']}{' (dry run)' if info['dry_run'] else ''}\n\n"
            f"- command: `{info['command']}`\n- host: {info['host']}, {info['cpus']} CPUs; git {info['git']}\n"
            f"- sections: {', '.join(info['sections'])}; budget {info['budget_s']:.0f} s\n\n")


def write_results_md(out: Path, info: dict) -> None:
    """results.md: the block to paste into bench/RESULTS.md, rebuilt from every <section>.json in `out`."""
    blocks = [header_markdown(info)]
    for name in SECTIONS:
        path = out / f"{name}.json"
        if path.exists():
            try:
                blocks.append(section_markdown(json.loads(path.read_text())) + "\n")
            except (ValueError, KeyError) as exc:
                blocks.append(f"### {name}: unreadable {path.name} ({exc})\n\n")
    write_text_atomic(out / "results.md", "".join(blocks))


def write_text_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def git_commit() -> str:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=20).stdout.strip()
        return (proc.stdout.strip() + (" (uncommitted changes)" if dirty else "")) if proc.returncode == 0 \
            else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Parts: what the children run (JAX is imported here, inside each function)


class Recorder:
    """A part's figures so far, rewritten atomically to the partial file after each put (a killed part keeps
    them)."""

    def __init__(self, path: Path | None):
        self.path, self.data = path, {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        if self.path is not None:
            write_json(self.path, self.data)


def _oom(exc: Exception) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _device_summary():
    import jax

    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends have no memory stats
        stats = {}
    return device, stats


def _xla_memory(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    gib = 2**30
    return {"arguments": m.argument_size_in_bytes / gib, "outputs": m.output_size_in_bytes / gib,
            "temporaries": m.temp_size_in_bytes / gib, "aliased": m.alias_size_in_bytes / gib}


def _write_hf_config(cfg, directory: Path) -> str:
    """config.json for transformers to build the same architecture with random weights (no weights written)."""
    from safetrade.models import llama

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(llama.config_to_hf(cfg), indent=1))
    return str(directory)


def _model_info(cfg, preset: str) -> dict:
    return {"preset": preset, "num_params": cfg.num_params, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "vocab": cfg.vocab_size, "dtype": cfg.dtype,
            "param_dtype": cfg.param_dtype, "remat": cfg.remat}


def part_versions(spec: dict, rec: Recorder) -> dict:
    import importlib.metadata as metadata

    packages = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                 "chex", "numpy", "scipy", "transformers", "tokenizers", "safetensors", "torch", "peft", "gguf",
                 "datasets", "rouge-score"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    rec.put("python", platform.python_version())
    rec.put("packages", packages)
    import jax
    import jax.numpy as jnp

    device, stats = _device_summary()
    rec.put("backend", jax.default_backend())
    rec.put("device_kind", device.device_kind)
    rec.put("device_count", jax.device_count())
    rec.put("memory_bytes_limit", stats.get("bytes_limit"))
    try:
        from jax.extend import backend as jax_backend

        rec.put("platform_version", str(jax_backend.get_backend().platform_version).replace("\n", " "))
    except Exception as exc:  # noqa: BLE001 - informational
        rec.put("platform_version", f"unavailable ({type(exc).__name__})")
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        rec.put("nvidia_smi", proc.stdout.strip() or proc.stderr.strip()[-300:])
    rec.put("env", {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS",
                                                   "JAX_COMPILATION_CACHE_DIR", "CUDA_VISIBLE_DEVICES")})
    rec.put("default_matmul_precision", str(jax.config.jax_default_matmul_precision))

    n = int(spec["matmul_n"])
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    for _ in range(3):
        f(a).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    rec.put("matmul_n", n)
    rec.put("matmul_bf16_tflops", 2 * n**3 / statistics.median(times) / 1e12)
    return rec.data


def _recompute_greedy(cfg, params, prompts, n):
    """Reference decoder: the full forward pass, no cache, over the whole sequence for every new token (as
    tests/test_generate.py's), in one right-padded buffer wide enough for every prompt, so it compiles once."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from safetrade.models import llama

    width = max(len(p) for p in prompts) + n
    forward = jax.jit(lambda p, t, m: llama.forward(cfg, p, t, attention_mask=m)[0])
    out = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(n):
            tokens = np.zeros((1, width), np.int32)
            tokens[0, : len(seq)] = seq
            mask = (np.arange(width) < len(seq)).astype(np.int32)[None]
            seq.append(int(jnp.argmax(forward(params, tokens, mask)[0, len(seq) - 1])))
        out.append(seq[len(prompt):])
    return out


def _matmul_precision(precision: str):
    """jax.default_matmul_precision(precision), or the same by hand where a jax version lacks the context manager."""
    import contextlib

    import jax

    if hasattr(jax, "default_matmul_precision"):
        return jax.default_matmul_precision(precision)

    @contextlib.contextmanager
    def scoped():
        before = jax.config.jax_default_matmul_precision
        jax.config.update("jax_default_matmul_precision", precision)
        try:
            yield
        finally:
            jax.config.update("jax_default_matmul_precision", before)

    return scoped()


def part_correctness(spec: dict, rec: Recorder) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from safetrade.generate import SamplingConfig, generate
    from safetrade.models import io, llama

    golden_dir = REPO / "tests" / "golden" / "data"
    variants = sorted(p.name[len("tiny_"):] for p in golden_dir.glob("tiny_*") if (p / "expected.npz").exists())
    if not variants:
        raise RuntimeError(f"no tiny_*/expected.npz under {golden_dir}")
    rec.put("device", str(jax.devices()[0]))
    rec.put("atol", spec["atol"])
    golden, kv = {}, {}
    prompts = [[5, 9, 13], [7, 1, 2, 3, 4, 5, 6, 8, 100, 200, 17, 3, 9], [42]]  # tests/test_generate.py's
    for variant in variants:
        # dtypes explicit: the default compute dtype may follow the backend (bf16 on accelerators).
        cfg, params = io.load_hf(golden_dir / f"tiny_{variant}", dtype="float32", param_dtype="float32")
        expected = np.load(golden_dir / f"tiny_{variant}" / "expected.npz")
        ids = jnp.asarray(expected["input_ids"])
        entry = {}
        for precision in ("highest", "default") if spec["compare_default_precision"] else ("highest",):
            with _matmul_precision(precision):
                logits, hidden = jax.jit(lambda p, t: llama.forward(cfg, p, t, return_hidden=True))(params, ids)
                entry[precision] = {
                    "logits": float(np.abs(np.asarray(logits) - expected["logits"]).max()),
                    "layer_outputs": float(np.abs(np.asarray(hidden["layer_outputs"]) - expected["layer_outputs"]).max()),
                    "final_hidden": float(np.abs(np.asarray(hidden["final"]) - expected["final_hidden"]).max()),
                }
        entry["pass"] = all(v <= spec["atol"] for v in entry["highest"].values())
        golden[variant] = entry
        rec.put("golden", golden)
        n = int(spec["new_tokens"])
        out = generate(cfg, params, prompts, SamplingConfig(max_new_tokens=n, pad_to_multiple=8))
        reference = _recompute_greedy(cfg, params, prompts, n)
        kv[variant] = {"equal": out.tokens == reference, "new_tokens": n, "prompts": len(prompts),
                       "rows_equal": [a == b for a, b in zip(out.tokens, reference)]}
        rec.put("kv_cache", kv)
    return rec.data


def part_train_jax(spec: dict, rec: Recorder) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.train_step import model_flops_per_step, random_token_batch, train_setup
    from safetrade.config import OptimSection
    from safetrade.models import llama
    from safetrade.train.jobs import make_optimizer

    cfg = llama.preset(spec["preset"]).replace(dtype=spec["dtype"], param_dtype=spec["param_dtype"],
                                               remat=bool(spec["remat"]))
    lora_config = llama.LoraConfig(int(spec["lora_rank"]), float(spec["lora_alpha"]), tuple(spec["lora_targets"]))
    t = time.perf_counter()
    params = jax.block_until_ready(llama.init(cfg, jax.random.key(0)))
    device, _ = _device_summary()
    rec.put("device_kind", device.device_kind)
    rec.put("model", {**_model_info(cfg, spec["preset"]), "init_s": time.perf_counter() - t,
                      "lora": dataclasses.asdict(lora_config)})
    optim = OptimSection(lr=float(spec["lr"]))
    rec.put("optimizer", {"name": optim.name, "lr": optim.lr, "b1": optim.b1, "b2": optim.b2,
                          "weight_decay": optim.weight_decay, "clip_norm": optim.clip_norm,
                          "schedule": optim.schedule})
    rec.put("hf_config_dir", _write_hf_config(cfg, Path(spec["work_dir"]) / "train-hf"))
    tx = make_optimizer(optim, 1000)
    seq = int(spec["seq"])

    def measure(batch: int, lora) -> dict:
        # Full fine-tuning donates its state: it trains a copy, so the LoRA row still has the weights.
        source = params if lora is not None else jax.tree.map(jnp.copy, params)
        fn, state, frozen, base_cfg, trainable = train_setup(cfg, source, tx, lora)
        del source
        batch_arrays = jax.device_put(random_token_batch(cfg.vocab_size, batch, seq))
        t = time.perf_counter()
        compiled = fn.lower(state, batch_arrays, frozen).compile()
        compile_s = time.perf_counter() - t
        memory = _xla_memory(compiled)
        _, stats = _device_summary()
        limit = stats.get("bytes_limit")
        if limit and memory:
            need = stats.get("bytes_in_use", 0) + (memory["temporaries"] + memory["outputs"]
                                                  - memory["aliased"]) * 2**30
            if need > float(spec["memory_headroom"]) * limit:
                raise MemoryError(f"batch {batch}: XLA plans {need / 2**30:.1f} GiB, over "
                                  f"{spec['memory_headroom']} of the device's {limit / 2**30:.1f} GiB")
        times = []
        for k in range(int(spec["warmup"]) + int(spec["steps"])):
            t = time.perf_counter()
            state, metrics = compiled(state, batch_arrays, frozen)
            jax.block_until_ready(state)
            if k >= int(spec["warmup"]):
                times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        _, stats = _device_summary()
        flops = model_flops_per_step(base_cfg, batch, seq, trainable if lora is not None else None)
        return {"batch": batch, "seq": seq, "tokens_per_s": batch * seq / step_s, "step_s_median": step_s,
                "step_s_runs": times, "compile_s": compile_s, "flops_per_token": flops / (batch * seq),
                "trainable_params": trainable, "loss": float(metrics["loss_cap"]), "xla_memory_gib": memory,
                "peak_gib_in_use": (stats.get("peak_bytes_in_use") or 0) / 2**30 or None}

    for row, lora in (("full", None), ("lora", lora_config)):
        attempts = []
        for batch in spec["batches"]:
            try:
                result = measure(int(batch), lora)
            except Exception as exc:  # noqa: BLE001 - too big for the device: the next, smaller batch
                if not (isinstance(exc, MemoryError) or _oom(exc)) or batch == spec["batches"][-1]:
                    raise
                attempts.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            rec.put(row, {**result, "attempts": attempts})
            break
    return rec.data


def part_generate_jax(spec: dict, rec: Recorder) -> dict:
    import jax
    import numpy as np

    from bench.forward import bench_safetrade as time_generation
    from safetrade.models import llama

    cfg = llama.preset(spec["preset"]).replace(dtype=spec["dtype"], param_dtype=spec["dtype"])
    params = jax.block_until_ready(llama.init(cfg, jax.random.key(0)))
    rec.put("model", _model_info(cfg, spec["preset"]))
    work = Path(spec["work_dir"])
    rec.put("hf_config_dir", _write_hf_config(cfg, work / "generate-hf"))
    rng = np.random.default_rng(0)
    prompts = {int(b): rng.integers(0, cfg.vocab_size, (int(b), int(spec["prompt_len"])), dtype=np.int64)
               for b in spec["batches"]}
    prompts_file = work / "generate-prompts.json"
    prompts_file.write_text(json.dumps({"batches": {str(b): ids.tolist() for b, ids in prompts.items()}}))
    rec.put("prompts_file", str(prompts_file))
    batches = {}
    for b, ids in prompts.items():
        result = time_generation(cfg, params, {b: ids}, int(spec["new_tokens"]), int(spec["repeats"]))[str(b)]
        result.pop("tokens", None)
        batches[str(b)] = result
        rec.put("batches", batches)
    return rec.data


def part_sqsd(spec: dict, rec: Recorder) -> dict:
    import jax
    import numpy as np

    from bench.sqsd import EQUAL_TOL, random_adapters
    from safetrade import sqsd
    from safetrade.models import llama

    cfg = llama.preset(spec["preset"]).replace(dtype=spec["dtype"], param_dtype=spec["dtype"])
    base = jax.block_until_ready(llama.init(cfg, jax.random.key(0)))
    states = random_adapters(cfg, base, int(spec["rank"]), float(spec["alpha"]), float(spec["b_std"]), seed=0)
    lora_cfg, initial = states["initial"]
    danger = sqsd.directions_from_adapters(*states["danger"])
    safety = sqsd.directions_from_adapters(*states["safety"])
    sites, loss_fn = sqsd.llama_lora_sites(lora_cfg), sqsd.LlamaLoss(lora_cfg)
    tokens, prompt = int(spec["tokens"]), int(spec["prompt_tokens"])
    rng = np.random.default_rng(0)
    examples = [{"input_ids": rng.integers(0, cfg.vocab_size, tokens).astype(np.int32),
                 "loss_mask": (np.arange(tokens) >= prompt).astype(np.float32)} for _ in range(int(spec["n"]))]
    for key in ("rank", "alpha", "tokens", "prompt_tokens", "n"):
        rec.put(key, spec[key])
    rec.put("model", _model_info(cfg, spec["preset"]))
    rec.put("equal_tol", EQUAL_TOL)
    rec.put("default_matmul_precision", str(jax.config.jax_default_matmul_precision))

    scores = {}
    for label, batch in (("vmapped", int(spec["batch"])), ("batch1", 1)):
        config = sqsd.SQSDConfig(batch_size=batch, max_len=tokens)
        t = time.perf_counter()  # warm-up: compiles the one (batch, length) shape the timed call uses
        sqsd.score_samples(loss_fn, initial, examples[:batch], danger, safety, sites=sites, cfg=config)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        scores[label] = sqsd.score_samples(loss_fn, initial, examples, danger, safety, sites=sites, cfg=config)
        wall = time.perf_counter() - t
        rec.put(label, {"batch": batch, "samples_per_s": len(examples) / wall, "wall_s": wall,
                        "compile_s": compile_s, "valid": int(scores[label].valid.sum())})
    diff = np.abs(scores["vmapped"].score - scores["batch1"].score)
    rec.put("max_abs_diff_score", float(np.nanmax(diff)) if np.isfinite(diff).any() else None)
    rec.put("score_range", float(np.nanmax(scores["batch1"].score) - np.nanmin(scores["batch1"].score)))
    return rec.data


def part_safedelta(spec: dict, rec: Recorder) -> dict:
    import hashlib

    import jax
    import numpy as np

    from bench.safedelta import timed_request, with_noise
    from safetrade.models import llama
    from safetrade.safedelta import SafeDeltaConfig

    cfg = llama.preset(spec["preset"]).replace(dtype=spec["dtype"], param_dtype=spec["dtype"])
    t = time.perf_counter()
    aligned = jax.block_until_ready(llama.init(cfg, jax.random.key(0)))
    finetuned = jax.block_until_ready(with_noise(cfg, aligned, float(spec["noise_std"]), seed=0))
    rec.put("model", {**_model_info(cfg, spec["preset"]), "setup_s": time.perf_counter() - t})
    for key in ("dtype", "sequences", "tokens", "batch", "noise_std", "s"):
        rec.put(key, spec[key])
    rng = np.random.default_rng(0)
    n, tokens, batch = int(spec["sequences"]), int(spec["tokens"]), int(spec["batch"])
    batches = [{"input_ids": rng.integers(0, cfg.vocab_size, (min(batch, n - i), tokens)).astype(np.int32),
                "attention_mask": np.ones((min(batch, n - i), tokens), np.int32)} for i in range(0, n, batch)]
    rec.put("param_bytes", int(sum(x.nbytes for x in jax.tree.leaves(aligned))))
    # The Hessian cache is keyed by a sha256 over every param's bytes: its host throughput sizes that share.
    block = np.random.default_rng(1).bytes(64 * 2**20)
    t = time.perf_counter()
    hashlib.sha256(block).hexdigest()
    rec.put("sha256_gb_per_s", len(block) / (time.perf_counter() - t) / 1e9)
    sd_cfg = SafeDeltaConfig(s=float(spec["s"]))
    with tempfile.TemporaryDirectory(prefix="hessians-", dir=spec["work_dir"]) as cache:
        for label in ("first", "cached"):
            hessians_s, transform_s, result, report = timed_request(cfg, aligned, finetuned, batches, sd_cfg,
                                                                    cache_dir=cache)
            rec.put(label, {"hessians_s": hessians_s, "transform_s": transform_s,
                            "total_s": hessians_s + transform_s, "kept_fraction": report["kept_fraction"],
                            "damping_fallbacks": len(report["damping_fallbacks"])})
            if label == "first":
                rec.put("cache_bytes", sum(p.stat().st_size for p in Path(cache).glob("*.safetensors")))
            del result
    return rec.data


PARTS = {"versions": part_versions, "correctness": part_correctness, "train_jax": part_train_jax,
         "generate_jax": part_generate_jax, "sqsd": part_sqsd, "safedelta": part_safedelta}


def part_main(args) -> int:
    spec = json.loads(Path(args.spec).read_text())
    if spec.get("_sleep"):  # test hook: a section that outlives its cap
        time.sleep(float(spec["_sleep"]))
    rec = Recorder(Path(args.partial) if args.partial else None)
    data = PARTS[args.part](spec, rec)
    print(json.dumps(clean(data)), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, epilog=WHEELS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="device_check_out", help="folder for <section>.json, summary.md, results.md")
    ap.add_argument("--dry-run", action="store_true", help="every section at tiny shapes on the CPU (seconds)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections, in order: {','.join(SECTIONS)}")
    ap.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                    help="a section's time cap (defaults: " + ", ".join(f"{k} {v}" for k, v in CAPS.items())
                         + f" s; {DRY_RUN_CAP} s each with --dry-run)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole run; a section's cap is cut to what is left "
                         f"(default {BUDGET_S}, {DRY_RUN_BUDGET_S} with --dry-run)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="change a section's setting, e.g. train.batches=2,1 sqsd.batch=32 safedelta.dtype=bfloat16 "
                         "(see SETTINGS in this file)")
    ap.add_argument("--torch-python", default=None,
                    help="python with torch + transformers (+ peft) for the torch halves (default: this python)")
    ap.add_argument("--work-dir", default=None, help="logs, config.json files, Hessian cache (default: a temp dir)")
    ap.add_argument("--compile-cache", default="/tmp/safetrade-jax-compile-cache",
                    help="JAX persistent compilation cache for the children (a rerun on the same machine compiles "
                         "less; '' to disable; never used with --dry-run)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--partial", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--test-sleep", action="append", default=[], help=argparse.SUPPRESS)  # SECTION=SECONDS
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.part:
        return part_main(args)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    caps = {**({s: DRY_RUN_CAP for s in SECTIONS} if args.dry_run else CAPS), **parse_caps(args.cap)}
    overrides = parse_overrides(args.set)
    budget = args.budget if args.budget is not None else (DRY_RUN_BUDGET_S if args.dry_run else BUDGET_S)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args, work)
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "dry_run": args.dry_run,
            "command": " ".join(["python3", "bench/device_check.py", *(argv if argv is not None else sys.argv[1:])]),
            "host": platform.node(), "cpus": os.cpu_count(), "git": git_commit(), "sections": sections,
            "budget_s": budget}
    with open(out / "summary.md", "a") as summary:
        summary.write(header_markdown(info))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    print(f"device check: sections {', '.join(sections)}; out {out}; logs {work}", flush=True)
    start, bad = time.monotonic(), []
    try:
        for name in sections:
            left = budget - (time.monotonic() - start)
            spec = settings_for(name, args.dry_run, overrides)
            if left < 1:
                record = {"section": name, "status": "skipped", "reason": f"the run's budget of {budget:.0f} s is "
                          "spent", "wall_s": 0.0, "cap_s": 0.0, "dry_run": args.dry_run, "settings": spec,
                          "results": {}, "goals": [], "parts": {}}
            else:
                print(f"[{name}] cap {min(caps[name], left):.0f} s ...", flush=True)
                record = run_section(name, min(caps[name], left), run, spec)
            record["run"] = info
            write_json(out / f"{name}.json", record)
            with open(out / "summary.md", "a") as summary:
                summary.write(section_markdown(record) + "\n")
            write_results_md(out, info)
            print(f"[{name}] {record['status']} in {record['wall_s']:.1f} s"
                  + (f": {record['reason'].splitlines()[0]}" if record.get("reason") else ""), flush=True)
            for g in record["goals"]:
                print(f"    goal: {g['goal']}: {g.get('note') or verdict(g['met']).strip('*')}", flush=True)
            if record["status"] not in ("ok", "skipped"):
                bad.append(name)
            if record["status"] == "interrupted":
                break
    except Interrupted:
        bad.append("interrupted")
    print(f"device check done in {time.monotonic() - start:.0f} s; {out / 'results.md'}"
          + (f"; not ok: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
