"""What differs between this CPU machine and an accelerator image (docs/accelerators.md).

- The core path (model, train step, Safe Delta, SQSD, tradeoff, generation) imports and runs with `gguf`,
  `datasets`, `rouge_score` and `lm_eval` absent, which the GPU image lacks, without importing transformers, tensorboardX or
  matplotlib, and without a DeprecationWarning raised from safetrade's own code.
- dtype="auto" resolves by the backend: bfloat16 compute on gpu/tpu, float32 on cpu; params float32 always.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from safetrade import config
from safetrade.models import io
from tests.conftest import GOLDEN

REPO = Path(__file__).resolve().parent.parent

CORE_PATH_SCRIPT = textwrap.dedent("""
    import sys
    import warnings

    for name in ("gguf", "datasets", "rouge_score", "lm_eval"):
        sys.modules[name] = None  # `import name` now raises ImportError, as where the package is not installed
    warnings.simplefilter("always")

    with warnings.catch_warnings(record=True) as caught:
        import jax
        import jax.numpy as jnp
        import optax

        import safetrade.generate
        import safetrade.models.llama
        import safetrade.safedelta
        import safetrade.sqsd
        import safetrade.tradeoff
        import safetrade.train.step
        from safetrade.generate import SamplingConfig, generate
        from safetrade.models import llama
        from safetrade.safedelta import safe_delta
        from safetrade.safedelta.llama_adapter import collect_llama_hessians, kernel_hessians
        from safetrade.train import step as step_lib

        optional = [m for m in ("transformers", "tensorboardX", "matplotlib", "torch") if m in sys.modules]
        assert not optional, f"the core path imported {optional}"

        cfg = llama.preset("tiny")
        params = llama.init(cfg, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (2, 8), 3, cfg.vocab_size)
        logits, _ = jax.jit(lambda p, t: llama.forward(cfg, p, t))(params, ids)
        assert logits.shape == (2, 8, cfg.vocab_size)

        tx, strategy = optax.adamw(1e-2), safetrade.tradeoff.strategy_config("sft")
        step = jax.jit(step_lib.make_train_step(cfg, tx, strategy))
        ones = jnp.ones((2, 8), jnp.int32)
        batch = {"cap": {"input_ids": ids, "attention_mask": ones, "loss_mask": ones.astype(jnp.float32)}}
        state, metrics = step(step_lib.init_state(params, tx, strategy), batch, {})
        assert bool(jnp.isfinite(metrics["loss_cap"]))

        hessians = collect_llama_hessians(cfg, params, [{"input_ids": ids}])
        # One kernel: each kernel shape compiles its own layer program, and one shows the path works.
        edited, report = safe_delta(params, state.params, kernel_hessians(hessians),
                                    kernels=["blocks/attn/q_proj/kernel"])
        assert 0.0 <= report["kept_fraction"] <= 1.0

        out = generate(cfg, edited, [[5, 6, 7]], SamplingConfig(max_new_tokens=4))
        assert len(out.tokens[0]) == 4

        # The jobs (which do import transformers, for the tokenizer) import without the absent packages too.
        import safetrade.evaluate.guards
        import safetrade.evaluate.report
        import safetrade.evaluate.suite
        import safetrade.safedelta.job
        import safetrade.sqsd.job
        import safetrade.tokenizer
        import safetrade.train.jobs

    ours = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning)) and "/safetrade/" in w.filename]
    assert not ours, "\\n".join(ours)
    print("core path ok")
""")


def test_core_path_runs_without_optional_packages():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)  # one device is enough here
    result = subprocess.run([sys.executable, "-c", CORE_PATH_SCRIPT], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "core path ok" in result.stdout


@pytest.mark.parametrize(("backend", "compute"), [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_auto_dtype_follows_the_backend(monkeypatch, backend, compute):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert io.resolve_dtypes("auto", "float32") == (compute, "float32")
    assert io.resolve_dtypes("auto", "auto") == (compute, "float32")
    assert io.resolve_dtypes("float32", "bfloat16") == ("float32", "bfloat16")  # explicit values are kept
    # load_model (what every command calls) defaults to auto; load_hf resolves an explicit auto the same way.
    for cfg, params in (io.load_model(GOLDEN / "tiny_gqa_tied"), io.load_hf(GOLDEN / "tiny_gqa_tied", dtype="auto")):
        assert (cfg.dtype, cfg.param_dtype) == (compute, "float32")
        assert {np.dtype(x.dtype) for x in jax.tree.leaves(params)} == {np.dtype("float32")}


def test_train_jobs_default_to_auto_and_plain_loaders_keep_float32():
    assert config.TrainJob().model.dtype == "auto" and config.TrainJob().model.param_dtype == "float32"
    cfg, _ = io.load_hf(GOLDEN / "tiny_gqa_tied")
    assert (cfg.dtype, cfg.param_dtype) == ("float32", "float32")
