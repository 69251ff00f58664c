"""bench/memory_plan.py's machinery on the tiny preset, so the 7-8B memory plans cannot rot.

Every program kind is compiled at tiny sizes (in this process, on its simulated devices) and its numbers are checked
against byte counts computed here from the config's shapes, independently of the script: the full-FT step's
arguments hold at least fp32 params + AdamW's two moments and alias them (the donated state); LoRA needs less than
full fine-tuning; fsdp over 2 devices halves the state per device; the Hessian program returns exactly the four
[L, d, d] float32 Grams; the whole-model Safe Delta program reads both models' kernels and the Hessians; the streamed
programs need less than the whole-model ones. One run of the command line (a subprocess per program) checks the
table, the JSON and the per-device state of fsdp over 2 devices.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from safetrade.models import llama

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "memory_plan.py"


@pytest.fixture(scope="module")
def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("memory_plan", None)


@pytest.fixture(scope="module")
def rows(memory_plan):
    """name -> row, each program compiled on first use (a compile costs 2-20 s here)."""
    class Rows(dict):
        def __missing__(self, name):
            self[name] = memory_plan.plan(name, memory_plan.TINY)
            return self[name]
    return Rows()


def kernel_params(cfg) -> int:
    """Parameters of the seven stacked projections, from the config alone."""
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return cfg.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * f)


@pytest.mark.slow  # two train-step compiles (~15 s each)
def test_training_programs(rows):
    cfg = llama.preset("tiny")
    state = cfg.num_params * 4 * 3  # fp32 params + AdamW's mu and nu
    full, lora = rows["full_8b_8x2048"], rows["lora_8b_8x2048"]
    assert full["bytes"]["arguments"] >= state
    assert full["bytes"]["aliased"] >= state  # the donated state is updated in place
    assert full["peak_bytes"] == (full["bytes"]["arguments"] + full["bytes"]["outputs"]
                                  + full["bytes"]["temporaries"] - full["bytes"]["aliased"])
    assert full["trainable_bytes"] == cfg.num_params * 4 and full["frozen_bytes"] == 0
    assert lora["peak_bytes"] < full["peak_bytes"]
    assert lora["frozen_bytes"] == cfg.num_params * 4  # the fp32 base weights are inputs, not trained
    # r = 16 on all seven projections: A [in, r] and B [r, out] per kernel, every layer
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    ins_outs = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    assert lora["trainable_bytes"] == 4 * cfg.num_layers * 16 * sum(i + o for i, o in ins_outs)


def test_hessian_programs(rows):
    cfg = llama.preset("tiny")
    d, f = cfg.hidden_size, cfg.intermediate_size
    grams = 4 * cfg.num_layers * (3 * d * d + f * f)  # attn, o_proj (q = d here), mlp and down_proj inputs
    one_pass, stream = rows["hessians_7b"], rows["hessians_7b_stream"]
    assert grams <= one_pass["bytes"]["outputs"] <= grams + 1024  # + the output tuple's pointers
    assert one_pass["bytes"]["arguments"] >= cfg.num_params * 4
    assert one_pass["need_bytes"] >= cfg.num_params * 4 + one_pass["bytes"]["outputs"] + 2 * grams  # whole params tree
    # per layer: one layer's Grams and the residual stream out, one layer's weights in
    assert stream["bytes"]["outputs"] >= grams // cfg.num_layers
    assert stream["peak_bytes"] < one_pass["peak_bytes"] and stream["need_bytes"] < one_pass["need_bytes"]
    assert stream["host_bytes"] == cfg.num_params * 4 + grams


@pytest.mark.slow  # the whole-model transform compiles seven kernels' rules (~15 s)
def test_safe_delta_programs(rows):
    cfg = llama.preset("tiny")
    kernels = kernel_params(cfg) * 4
    d, f = cfg.hidden_size, cfg.intermediate_size
    hessians = 4 * cfg.num_layers * (3 * d * d + f * f)
    whole, stream = rows["safedelta_7b"], rows["safedelta_7b_stream"]
    assert whole["bytes"]["arguments"] >= 2 * kernels + hessians
    assert whole["bytes"]["outputs"] >= kernels
    assert whole["need_bytes"] == whole["peak_bytes"] + 2 * (cfg.num_params * 4 - kernels)
    # the streamed chunk: one layer of down_proj (the largest Hessian), both its kernels in and one out
    assert stream["chunk"] == f"down_proj: 1 x {f} x {d}"
    assert stream["bytes"]["arguments"] >= 4 * (f * f + 2 * f * d) and stream["bytes"]["outputs"] >= 4 * f * d
    assert stream["need_bytes"] < whole["need_bytes"]
    assert stream["host_bytes"] == 2 * cfg.num_params * 4 + kernels + hessians


def test_fits_follow_the_rule(memory_plan, rows):
    names = ("hessians_7b", "hessians_7b_stream")
    for name in names:
        row = rows[name]
        for device, capacity in memory_plan.CAPACITY_BYTES.items():
            assert row["fits"][device] == (row["need_bytes"] <= memory_plan.USABLE * capacity)
    table = memory_plan.table([rows[name] for name in names])
    assert all(f"| {name} |" in table for name in names) and len(table.splitlines()) == 2 + len(names)


@pytest.mark.slow  # a subprocess that compiles the step for 2 simulated devices (~20 s)
def test_command_line_runs_each_program_in_its_own_process(tmp_path):
    """fsdp over 2 devices, in a child process with 2 simulated devices: each device holds half of every sharded
    leaf of the state (all but the norms, a few hundred bytes)."""
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--only", "full_8b_8x2048_fsdp2", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    plan = json.loads(out.read_text())
    (row,) = plan["rows"]
    assert "error" not in row and row["devices"] == 2 and row["preset"] == "tiny"
    assert "| full_8b_8x2048_fsdp2 |" in done.stdout and plan["scale"] == "tiny"
    state = llama.preset("tiny").num_params * 4 * 3
    assert state / 2 <= row["bytes"]["arguments"] < 0.55 * state + 4096  # + the replicated step, rng and norms
