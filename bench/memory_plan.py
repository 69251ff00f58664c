"""Device memory plans of 7-8B programs, from ahead-of-time compiles on abstract shapes (no device, nothing allocated).

    python bench/memory_plan.py                          # every program (= make bench-memory)
    python bench/memory_plan.py --only full_8b_8x2048    # one program (--only may be repeated)
    python bench/memory_plan.py --list                   # the programs
    python bench/memory_plan.py --json plan.json         # the rows as JSON too

Each program is the project's own jitted function: `jax.jit(...).lower(ShapeDtypeStructs).compile()` for the CPU
backend, then XLA's `memory_analysis()`, per device: arguments, outputs, temporaries and the aliased part (donated
inputs the outputs reuse). **peak = arguments + outputs + temporaries − aliased.** A CPU compile's plan is an
estimate of a GPU's: XLA's GPU pipeline fuses and schedules differently (and adds cuBLAS/cuDNN workspaces), and the
GPU allocator (BFC, preallocating XLA_PYTHON_CLIENT_MEM_FRACTION of memory, 0.75 by default) fragments. **need** adds
what the program's caller keeps on the device around it (each row says what); a row "fits" a device when need
≤ 95 % of the memory nvidia-smi reports for an 80 GB card (81559 MiB, H100 80GB) and for an H200 (143771 MiB).

Every program runs in its own subprocess (XLA reads the simulated device count once per process; a fresh process
also returns each compile's memory). Programs, with Llama-3-8B (`llama3_8b`) or Llama-2-7B (`llama2_7b`):

  lora_8b_{1,8}x2048        train step (safetrade/train/step.py, optimizer of jobs.make_optimizer: AdamW + clip):
                            LoRA r = 16 (alpha 32) on q,k,v,o,gate,up,down; fp32 adapters, AdamW moments and fp32
                            frozen base weights; bf16 compute; remat; 1 or 8 sequences of 2048 tokens
  full_8b_{1,8}x2048        the same step, full fine-tuning: fp32 masters + AdamW moments, bf16 compute, remat
  full_8b_{1,8}x2048_noclip the same without global-norm clipping (optim.clip_norm=0): on the CPU backend the
                            clipped gradients are a second fp32 copy of the gradients (~25 GiB at 8B)
  full_8b_8x2048_fsdp{2,4,8}  full fine-tuning at 8 x 2048 on N simulated devices, params and moments sharded by
                            fsdp (mesh data 1 x fsdp N), the batch split N ways: per-device figures
  hessians_{7b,8b}          the one-pass Hessian collection's per-batch program (collect_llama_hessians: the whole
                            model, fp32 weights and compute, one batch of 8 x 512 tokens, the job's batch_size; the
                            calibration set is 128 x 512, 16 calls of this program); need adds the running Grams
                            and the new sums of the add outside the program
  hessians_{7b,8b}_stream   collect_llama_hessians(stream=True): the per-layer program (one layer's weights, a
                            batch's residual stream); need adds the other 15 batches' residual streams and this
                            layer's running and new sums
  safedelta_{7b,8b}         the whole-model transform as one program (safedelta/tree.py's per-kernel rule,
                            official mode, on all seven stacked kernels of both models and the four [L, d, d]
                            Hessians); need adds the leaves safe_delta keeps but does not edit (embeddings,
                            lm_head, norms of both models)
  safedelta_{7b,8b}_stream  stream_layers = 1: the per-chunk program of the largest chunk (one layer of down_proj:
                            its Hessian is d_ff x d_ff), and the host memory the streamed transform holds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for path in (BENCH.parent, BENCH):  # the repository (safetrade) and bench/ (aot_compile), without pip install -e
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import jax  # noqa: E402  (no backend starts at import: the subprocesses set their device count first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from aot_compile import GIB, memory_of, shaped, simulate_devices, train_step_program  # noqa: E402
from safetrade import parallel  # noqa: E402
from safetrade.config import OptimSection  # noqa: E402
from safetrade.models import llama  # noqa: E402
from safetrade.safedelta import llama_adapter  # noqa: E402
from safetrade.safedelta.config import SafeDeltaConfig, static_structure, traced_knobs  # noqa: E402
from safetrade.safedelta.layer import stacked_layers  # noqa: E402

MIB = 1024**2
CAPACITY_BYTES = {"80 GB": 81559 * MIB, "141 GB": 143771 * MIB}  # nvidia-smi's total for H100 80GB / H200
USABLE = 0.95  # headroom for the CUDA context, library workspaces and fragmentation
LORA = llama.LoraConfig(rank=16, alpha=32.0, targets=llama.LORA_TARGETS)
OPTIM = OptimSection(lr=1e-5)  # AdamW (b1 0.9, b2 0.95), global-norm clip 1.0: the training default


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of a plan. FULL is the real one; TINY runs the same machinery on the tiny preset in seconds (tests)."""

    presets: dict  # preset named by a program -> preset compiled
    seq: int  # training sequence length
    calibration_rows: int  # Safe Delta calibration sequences
    calibration_len: int
    calibration_batch: int  # rows per call of the Hessian program (SafeDeltaJob.batch_size)

    def cfg(self, preset: str) -> llama.LlamaConfig:
        return llama.preset(self.presets.get(preset, preset))


FULL = Scale(presets={}, seq=2048, calibration_rows=128, calibration_len=512, calibration_batch=8)
TINY = Scale(presets={"llama2_7b": "tiny", "llama3_8b": "tiny"}, seq=64, calibration_rows=16, calibration_len=32,
             calibration_batch=4)


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    preset: str
    devices: int
    summary: str
    build: Callable  # (Scale, devices) -> dict: fn, args, need (a function of the memory analysis), notes


def nbytes(tree) -> int:
    """Bytes of a tree of arrays / ShapeDtypeStructs (the global arrays, whatever their sharding)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _mesh(devices: int, fsdp: int):
    return parallel.make_mesh(-1, fsdp, 1, devices=jax.devices()[:devices])


# ----------------------------------------------------------------------------------------------------------------
# Programs


def _train(preset: str, batch: int, *, lora: bool, fsdp: int = 1, optim: OptimSection = OPTIM):
    def build(scale: Scale, devices: int) -> dict:
        cfg = scale.cfg(preset).replace(dtype="bfloat16", param_dtype="float32", remat=True)
        fn, args = train_step_program(cfg, _mesh(devices, fsdp), batch, scale.seq, lora=LORA if lora else None,
                                      optim=optim)
        state, _, frozen = args
        return {"fn": fn, "args": args, "need": lambda memory: memory["peak_bytes"],
                "need_is": "peak (the step's state is donated: it is the arguments, aliased to the outputs)",
                "notes": {"tokens": f"{batch} x {scale.seq}", "params": cfg.num_params,
                          "trainable_bytes": nbytes(state.params), "optimizer_state_bytes": nbytes(state.opt_state),
                          "frozen_bytes": nbytes(frozen)}}
    return build


def _calibration_batch(scale: Scale):
    row = jax.ShapeDtypeStruct((scale.calibration_batch, scale.calibration_len), jnp.int32)
    return {"input_ids": row, "attention_mask": row}


def _gram_bytes(cfg: llama.LlamaConfig, layers: int) -> int:
    """float32 Grams of the four Llama layer inputs (q/k/v and gate/up share theirs) for `layers` layers."""
    d, q, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size
    return 4 * layers * (d * d + q * q + d * d + f * f)


def _hessians(preset: str):
    def build(scale: Scale, devices: int) -> dict:
        # fp32 weights and compute (a CPU's default; on a GPU dtype="auto" computes in bf16, which shrinks only
        # the activations, not the weights or the Grams)
        cfg = scale.cfg(preset)
        sums = _gram_bytes(cfg, cfg.num_layers)
        params = llama.abstract_params(cfg)

        def need(memory):
            # While the program runs, the running sums S sit beside it; then collect_hessians adds its output
            # outside the program, holding the params, that output, S and the new sums together. The program
            # does not read lm_head (jit leaves the unused argument out), but the params tree holds it.
            b = memory["bytes"]
            unused = max(0, nbytes(params) - b["arguments"])
            return unused + max(memory["peak_bytes"] + sums, b["arguments"] + b["outputs"] + 2 * sums)

        return {"fn": llama_adapter.batch_hessian_step(cfg),
                "args": (params, (), _calibration_batch(scale)), "need": need,
                "need_is": "max(peak + S, arguments + outputs + 2 S) + the params it does not read (lm_head), "
                           "S = the running Gram sums [L, d, d]",
                "notes": {"tokens": f"{scale.calibration_batch} x {scale.calibration_len} per call, "
                                    f"{scale.calibration_rows // scale.calibration_batch} calls",
                          "gram_sum_bytes": sums}}
    return build


def _hessians_stream(preset: str):
    def build(scale: Scale, devices: int) -> dict:
        cfg = scale.cfg(preset)
        abstract = llama.abstract_params(cfg)
        layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract["blocks"])
        b, t = scale.calibration_batch, scale.calibration_len
        stream = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.dtype(cfg.dtype))
        mask = jax.ShapeDtypeStruct((b, t), jnp.int32)
        calls = scale.calibration_rows // b
        others = (calls - 1) * (nbytes(stream) + nbytes(mask))
        layer_sums = _gram_bytes(cfg, 1)
        embed = nbytes(abstract["embed"]) + calls * (nbytes(stream) + nbytes(mask))

        def need(memory):
            # The other batches' residual streams and masks stay on the device between layers; this layer's
            # running sums and the new sums of the add sit beside the program. Embedding all batches first
            # holds the embedding table and every stream.
            return max(memory["peak_bytes"] + others + 2 * layer_sums, embed)

        host = nbytes(abstract) + _gram_bytes(cfg, cfg.num_layers)
        return {"fn": llama_adapter.layer_programs(cfg).layer, "args": (layer, stream, mask), "need": need,
                "need_is": "max(peak + other batches' streams + 2 x one layer's Gram sums, embedding + all "
                           "streams)",
                "notes": {"tokens": f"{b} x {t} per call, {calls} calls per layer", "host_bytes": host,
                          "host_is": "params + Hessians in host memory"}}
    return build


def _stacked(cfg: llama.LlamaConfig, dtype) -> dict:
    """{kernel path: [L, in, out]} and {Hessian name: [L, d, d]} ShapeDtypeStructs of the seven projections."""
    abstract = llama.abstract_params(cfg)
    kernels = {}
    for path in llama_adapter.KERNELS:
        leaf = abstract
        for key in path.split("/"):
            leaf = leaf[key]
        kernels[path] = jax.ShapeDtypeStruct(leaf.shape, dtype)
    hessians = {}
    for path, kernel in kernels.items():
        name = llama_adapter.HESSIAN_INPUTS[path.split("/")[-2]]
        hessians[name] = jax.ShapeDtypeStruct((kernel.shape[0], kernel.shape[1], kernel.shape[1]), jnp.float32)
    return kernels, hessians


def _whole_model_transform(cfg: llama.LlamaConfig, sd: SafeDeltaConfig):
    """safe_delta's per-kernel loop as one program: (aligned kernels, fine-tuned kernels, Hessians, key) -> kernels."""
    def transform(aligned, finetuned, hessians, key):
        out = {}
        for index, path in enumerate(llama_adapter.KERNELS):
            w_a, name = aligned[path], llama_adapter.HESSIAN_INPUTS[path.split("/")[-2]]
            keys = jax.random.split(jax.random.fold_in(key, index), w_a.shape[0])
            out[path], _ = stacked_layers(w_a, finetuned[path], hessians[name], keys, traced_knobs(sd, w_a.shape),
                                          static_structure(sd))
        return out
    return jax.jit(transform)


def _safedelta(preset: str):
    def build(scale: Scale, devices: int) -> dict:
        cfg = scale.cfg(preset)
        kernels, hessians = _stacked(cfg, jnp.float32)
        other = 2 * (nbytes(llama.abstract_params(cfg)) - nbytes(kernels))
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        return {"fn": _whole_model_transform(cfg, SafeDeltaConfig()), "args": (kernels, kernels, hessians, key),
                "need": lambda memory: memory["peak_bytes"] + other,
                "need_is": "peak + the unedited leaves of both models (embeddings, lm_head, norms)",
                "notes": {"other_leaves_bytes": other, "hessian_bytes": nbytes(hessians)}}
    return build


def _safedelta_stream(preset: str):
    def build(scale: Scale, devices: int) -> dict:
        cfg = scale.cfg(preset)
        kernels, hessians = _stacked(cfg, jnp.float32)
        sd = SafeDeltaConfig(stream_layers=1)
        # The chunk with the most input bytes (its Hessian d_in² plus both kernels d_in·d_out): down_proj in a
        # Llama (d_in = the MLP width). Every array the per-layer rule makes is one of those sizes, so its
        # program is the largest; compiling each distinct shape would cost minutes and change nothing.
        path = max(kernels, key=lambda p: kernels[p].shape[1] * (kernels[p].shape[1] + 2 * kernels[p].shape[2]))
        d_in, d_out = kernels[path].shape[1:]
        # What tree.py's streaming sends per chunk: stream_layers layers of both kernels, their Hessians and keys,
        # through the very jitted function it calls.
        chunk = jax.ShapeDtypeStruct((sd.stream_layers, d_in, d_out), kernels[path].dtype)
        h = jax.ShapeDtypeStruct((sd.stream_layers, d_in, d_in), jnp.float32)
        keys = jax.ShapeDtypeStruct((sd.stream_layers,), jax.random.key(0).dtype)
        # Both models, the edited kernels (the result's other leaves are the aligned model's) and the Hessians.
        host = 2 * nbytes(llama.abstract_params(cfg)) + nbytes(kernels) + nbytes(hessians)
        return {"fn": stacked_layers,
                "args": (chunk, chunk, h, keys, traced_knobs(sd, chunk.shape), static_structure(sd)),
                "need": lambda memory: memory["peak_bytes"],
                "need_is": "peak of the per-chunk program (nothing else stays on the device)",
                "notes": {"chunk": f"{path.split('/')[-2]}: {sd.stream_layers} x {d_in} x {d_out}",
                          "host_bytes": host,
                          "host_is": "aligned + fine-tuned models, edited kernels and Hessians in host memory"}}
    return build


def _programs() -> dict[str, Program]:
    out = [
        Program("lora_8b_1x2048", "llama3_8b", 1, "LoRA r=16 all projections, 1 x 2048", _train("llama3_8b", 1, lora=True)),
        Program("lora_8b_8x2048", "llama3_8b", 1, "LoRA r=16 all projections, 8 x 2048", _train("llama3_8b", 8, lora=True)),
        Program("full_8b_1x2048", "llama3_8b", 1, "full FT, AdamW fp32 masters, 1 x 2048", _train("llama3_8b", 1, lora=False)),
        Program("full_8b_8x2048", "llama3_8b", 1, "full FT, AdamW fp32 masters, 8 x 2048", _train("llama3_8b", 8, lora=False)),
    ]
    no_clip = dataclasses.replace(OPTIM, clip_norm=0.0)
    for batch in (1, 8):
        out.append(Program(f"full_8b_{batch}x2048_noclip", "llama3_8b", 1,
                           f"full FT, {batch} x 2048, optim.clip_norm=0",
                           _train("llama3_8b", batch, lora=False, optim=no_clip)))
    for n in (2, 4, 8):
        out.append(Program(f"full_8b_8x2048_fsdp{n}", "llama3_8b", n, f"full FT, 8 x 2048, fsdp over {n}",
                           _train("llama3_8b", 8, lora=False, fsdp=n)))
    for tag, preset in (("7b", "llama2_7b"), ("8b", "llama3_8b")):
        out += [
            Program(f"hessians_{tag}", preset, 1, "Hessians, one pass, per batch", _hessians(preset)),
            Program(f"hessians_{tag}_stream", preset, 1, "Hessians, streamed, per layer", _hessians_stream(preset)),
            Program(f"safedelta_{tag}", preset, 1, "Safe Delta, whole model", _safedelta(preset)),
            Program(f"safedelta_{tag}_stream", preset, 1, "Safe Delta, streamed, per layer", _safedelta_stream(preset)),
        ]
    return {p.name: p for p in out}


PROGRAMS = _programs()


# ----------------------------------------------------------------------------------------------------------------
# Running


def plan(name: str, scale: Scale = FULL) -> dict:
    """Compile program `name` in this process (which must have its devices) and return its row."""
    program = PROGRAMS[name]
    if jax.device_count() < program.devices:
        raise SystemExit(f"{name} needs {program.devices} devices; this process has {jax.device_count()}: run it "
                         "through main() (a subprocess each), or set XLA_FLAGS=--xla_force_host_platform_device_"
                         "count=N before jax starts")
    built = program.build(scale, program.devices)
    memory = memory_of(built["fn"], *built["args"])
    need = int(built["need"](memory))
    cfg = scale.cfg(program.preset)
    return {"name": name, "preset": scale.presets.get(program.preset, program.preset), "params": cfg.num_params,
            "summary": program.summary, "devices": program.devices, **memory, "need_bytes": need,
            "need_is": built["need_is"],
            "fits": {device: need <= USABLE * capacity for device, capacity in CAPACITY_BYTES.items()},
            **built["notes"]}


def plan_in_subprocess(name: str, tiny: bool, timeout: float) -> dict:
    """`plan(name)` in a fresh Python with the program's simulated device count."""
    program = PROGRAMS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        simulate_devices(program.devices, env)
        command = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--row-json", str(out)]
        if tiny:
            command.append("--tiny")
        try:
            done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"name": name, "error": f"timed out after {timeout:.0f} s"}
        if done.returncode or not out.exists():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return {"name": name, "error": last[0] if last else f"exit status {done.returncode}"}
        return json.loads(out.read_text())


def _gib(n) -> str:
    return f"{n / GIB:.2f}"


def table(rows: list[dict]) -> str:
    """The markdown table of the rows (GiB per device)."""
    head = ("| program | what | devices | arguments | outputs | temporaries | aliased | peak | need | fits 80 GB "
            "| fits 141 GB | host | compile s |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 6 + ":-:|:-:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |" + " |" * 11)
            continue
        b = r["bytes"]
        host = _gib(r["host_bytes"]) if "host_bytes" in r else ""
        lines.append(f"| {r['name']} | {r['summary']} | {r['devices']} | {_gib(b['arguments'])} | "
                     f"{_gib(b['outputs'])} | {_gib(b['temporaries'])} | {_gib(b['aliased'])} | "
                     f"{_gib(r['peak_bytes'])} | {_gib(r['need_bytes'])} | {'yes' if r['fits']['80 GB'] else 'no'} | "
                     f"{'yes' if r['fits']['141 GB'] else 'no'} | {host} | {r['lower_s'] + r['compile_s']:.0f} |")
    return "\n".join(lines)


def machine() -> dict:
    from forward import cpu_model

    return {"host": platform.node(), "cpu": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "date": datetime.datetime.now().isoformat(timespec="minutes")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--only", action="append", choices=sorted(PROGRAMS), metavar="NAME",
                        help="run only this program (repeatable); --list shows the names")
    parser.add_argument("--list", action="store_true", help="list the programs and exit")
    parser.add_argument("--json", help="write the rows (and the machine) as JSON here")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset and short sequences (a smoke test)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per program (default 1200)")
    parser.add_argument("--row-json", help=argparse.SUPPRESS)  # internal: plan one program here, write its row
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else FULL

    if args.list:
        for p in PROGRAMS.values():
            print(f"{p.name:26s} {p.preset:10s} {p.devices} device(s)  {p.summary}")
        return
    if args.row_json:
        Path(args.row_json).write_text(json.dumps(plan(args.only[0], scale)))
        return

    rows = []
    for name in args.only or PROGRAMS:
        row = plan_in_subprocess(name, args.tiny, args.timeout)
        rows.append(row)
        print(f"{name}: " + (f"error {row['error']}" if "error" in row else
                             f"peak {_gib(row['peak_bytes'])} GiB, need {_gib(row['need_bytes'])} GiB per device "
                             f"({row['lower_s'] + row['compile_s']:.0f} s)"), flush=True)
    print()
    print(table(rows))
    print(f"\npeak = arguments + outputs + temporaries - aliased (XLA memory_analysis, CPU backend: an estimate of "
          f"a GPU's); need = peak + what the caller keeps on the device (per row); fits = need <= {USABLE:.0%} of "
          f"81559 MiB (80 GB) / 143771 MiB (141 GB); host = host memory a streamed program's caller holds. GiB "
          f"per device.")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "scale": "tiny" if args.tiny else "full",
                                               "capacity_bytes": CAPACITY_BYTES, "usable_fraction": USABLE,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
