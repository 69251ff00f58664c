"""bench/device_check.py: the --dry-run of every section (CPU, tiny shapes, in a subprocess as on the device; the
torch halves too where .venv-torch exists, else recorded as skipped), a section killed at its cap, and the driver's
pure helpers.

The dry run's figures are timings of tiny models and are never asserted; what is asserted is that every section
writes its JSON with the expected keys and that the numbers the check compares are consistent (the golden models
within tolerance, KV-cache == recompute, vmapped SQSD == batch 1, a cached-Hessian request == the first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import device_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.py"
TORCH_PYTHON = REPO / ".venv-torch" / "bin" / "python"
RECORD_KEYS = {"section", "status", "reason", "started", "wall_s", "cap_s", "dry_run", "settings", "results",
               "goals", "parts", "run"}


def run_check(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not conftest's 8 simulated devices
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work-dir", str(tmp_path / "work"),
                           *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return proc, out


def load(out: Path, section: str) -> dict:
    record = json.loads((out / f"{section}.json").read_text())
    assert RECORD_KEYS <= set(record), f"{section}.json lacks {RECORD_KEYS - set(record)}"
    return record


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    # The torch halves run (on the CPU) where .venv-torch exists; elsewhere they must be recorded as skipped.
    with_torch = TORCH_PYTHON.exists()
    proc, out = run_check(tmp_path, "--dry-run", "--torch-python", str(TORCH_PYTHON if with_torch else sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = {name: load(out, name) for name in device_check.SECTIONS}
    for name, record in records.items():
        assert record["status"] == "ok", (name, record["reason"], record["parts"])
        assert record["dry_run"] is True and record["wall_s"] > 0
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT

    versions = records["versions"]["results"]
    assert versions["backend"] == "cpu" and versions["python"] and versions["packages"]["jax"]
    assert versions["peak_bf16_tflops"] is None and versions["peak_source"].startswith("MFU omitted")

    correctness = records["correctness"]["results"]
    assert len(correctness["golden"]) == 3
    assert all(v["pass"] and v["highest"]["logits"] <= 1e-4 for v in correctness["golden"].values())
    assert all(v["equal"] for v in correctness["kv_cache"].values())
    assert [g["met"] for g in records["correctness"]["goals"]] == [True, True]

    train = records["train"]
    for row in ("full", "lora"):
        r = train["results"]["rows"][row]
        assert r["safetrade_tokens_per_s"] > 0 and r["batch"] == 2 and r["seq"] == 32
        assert r["mfu"] is None  # no bf16 peak for a CPU
    # MaxText's model FLOPs, by hand for the tiny preset (d 64, mlp 128, 2 layers, 4 heads of 16, 2 kv heads,
    # tied vocab 256): 6 per weight per token + causal attention 6·L·S·H·Dh; LoRA r 16 on all seven projections
    # adds r·(in + out) per projection and layer, and frozen weights cost 4 instead of 6.
    d, f, layers, q, kv, vocab, seq = 64, 128, 2, 64, 32, 256, 32
    weights = vocab * d + layers * (d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d) + d
    adapters = layers * 16 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    attention = 6 * layers * seq * 4 * 16
    assert train["parts"]["train_jax"]["result"]["lora"]["trainable_params"] == adapters
    assert train["results"]["rows"]["full"]["flops_per_token"] == 6 * weights + attention
    assert train["results"]["rows"]["lora"]["flops_per_token"] == 4 * weights + 6 * adapters + attention
    assert {g["met"] for g in train["goals"]} == {None}  # speed goals are not judged in a dry run

    generate = records["generate"]
    assert set(generate["results"]["rows"]) == {"1", "4"}
    assert all(r["safetrade_prefill_tok_s"] > 0 and r["safetrade_decode_loop_tok_s"] > 0
               for r in generate["results"]["rows"].values())

    if with_torch:
        assert train["parts"]["train_torch"]["status"] == "ok", train["parts"]["train_torch"]
        assert train["results"]["torch"]["autocast"] == "bfloat16"
        assert all(train["results"]["rows"][row]["torch_tokens_per_s"] > 0 for row in ("full", "lora"))
        assert generate["parts"]["generate_torch"]["status"] == "ok", generate["parts"]["generate_torch"]
        assert all(r["torch_prefill_tok_s"] > 0 for r in generate["results"]["rows"].values())
    else:
        for record, part in ((train, "train_torch"), (generate, "generate_torch")):
            assert record["parts"][part]["status"] == "skipped"
            assert "torch not installed" in record["parts"][part]["reason"]
        assert train["results"]["rows"]["full"]["torch_tokens_per_s"] is None

    sqsd = records["sqsd"]["results"]
    assert sqsd["vmapped"]["samples_per_s"] > 0 and sqsd["batch1"]["samples_per_s"] > 0
    assert sqsd["vmapped"]["valid"] == sqsd["batch1"]["valid"] == sqsd["n"]
    assert sqsd["max_abs_diff_score"] <= sqsd["equal_tol"]  # the same code at batch 1 and vmapped
    assert sqsd["ratio"] > 0

    safedelta = records["safedelta"]["results"]
    assert 0 < safedelta["first"]["kept_fraction"] <= 1
    assert safedelta["cached"]["kept_fraction"] == safedelta["first"]["kept_fraction"]  # cache = recomputation
    assert safedelta["cache_bytes"] > 0 and safedelta["first"]["total_s"] > 0

    summary, results = (out / "summary.md").read_text(), (out / "results.md").read_text()
    for name in device_check.SECTIONS:
        assert f"### {name}: ok" in summary and f"### {name}: ok" in results


def test_without_torch_the_torch_half_is_recorded_as_skipped(tmp_path):
    args = device_check.build_parser().parse_args(["--dry-run", "--torch-python", sys.executable])
    run = device_check.Run(args, tmp_path)
    ctx = device_check.Context("train", {}, float("inf"), run)
    if run.torch_missing() is None:
        pytest.skip(f"{sys.executable} has torch")
    assert ctx.torch_part("train_torch", "torch_train_step.py", []) is None
    assert ctx.parts["train_torch"]["status"] == "skipped"
    assert ctx.parts["train_torch"]["reason"].startswith("skipped: torch") and "not installed" in \
        ctx.parts["train_torch"]["reason"]


def test_a_section_past_its_cap_is_recorded_as_timed_out(tmp_path):
    proc, out = run_check(tmp_path, "--dry-run", "--only", "versions", "--cap", "versions=0.5",
                          "--test-sleep", "versions=60", timeout=120)
    assert proc.returncode == 1
    record = load(out, "versions")
    assert record["status"] == "timed_out" and "cap of 0.5s" in record["reason"]
    assert record["parts"]["versions"]["status"] == "timed_out"
    assert record["wall_s"] < 30  # killed, not waited for
    assert "### versions: timed_out" in (out / "summary.md").read_text()


def test_peak_table_and_overrides():
    assert device_check.peak_for("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert device_check.peak_for("NVIDIA H100 PCIe")[0] == 756.0
    assert device_check.peak_for("NVIDIA H200")[0] == 989.0
    assert device_check.peak_for("NVIDIA A100-SXM4-80GB")[0] == 312.0
    peak, why = device_check.peak_for("cpu")
    assert peak is None and "MFU omitted" in why
    assert device_check.parse_overrides(["train.batches=2,1", "sqsd.batch=32", "safedelta.dtype=bfloat16"]) == {
        "train": {"batches": [2, 1]}, "sqsd": {"batch": 32}, "safedelta": {"dtype": "bfloat16"}}
    with pytest.raises(SystemExit, match="has no setting 'batchsize'"):
        device_check.parse_overrides(["sqsd.batchsize=3"])
    with pytest.raises(SystemExit, match="SECTION one of"):
        device_check.parse_caps(["nosuch=3"])
    assert device_check.settings_for("train", True, {})["preset"] == "tiny"
    assert device_check.settings_for("train", False, {"train": {"steps": 4}})["steps"] == 4


def test_help_explains_how_to_bring_wheels():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "pip download" in proc.stdout and "--no-index" in proc.stdout and ".whl" in proc.stdout
