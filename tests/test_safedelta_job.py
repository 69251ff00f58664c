"""`safetrade safedelta` end to end on a small random model with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import yaml

from safetrade import cli
from safetrade.models import io, llama, lora


@pytest.fixture(scope="module")
def pair(tmp_path_factory, smollm2_gguf):
    from safetrade.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("sd")
    tok = load_tokenizer(smollm2_gguf)
    cfg = llama.preset("tiny").replace(vocab_size=49152, max_position_embeddings=512)
    aligned = llama.init(cfg, jax.random.key(0))
    noise = llama.init(cfg, jax.random.key(1))
    finetuned = jax.tree.map(lambda a, n: a + 0.05 * n, aligned, noise)
    io.save_hf(root / "aligned", cfg, aligned, tokenizer=tok)
    io.save_hf(root / "finetuned", cfg, finetuned, tokenizer=tok)
    lcfg, with_adapters = lora.add_adapters(cfg, aligned, llama.LoraConfig(rank=2, alpha=4, targets=("q_proj",)),
                                            jax.random.key(2))
    base, adapters = lora.split(with_adapters)
    # lora_b = 0.01 (not 0): a real delta, of the same order as the full fine-tune's (~1e-3 per entry)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 + 0.01 if "lora_b" in jax.tree_util.keystr(path) else x, adapters)
    lora.save_peft(root / "adapter", lcfg, adapters)
    return root, cfg, aligned, finetuned


@pytest.mark.slow
def test_safedelta_command_writes_params_report_and_reuses_hessians(pair, capsys):
    root, cfg, aligned, finetuned = pair
    common = [f"aligned={root / 'aligned'}", "n_calibration=16", "max_len=128", f"cache_dir={root / 'cache'}"]
    assert cli.main(["safedelta", *common, f"finetuned={root / 'finetuned'}", f"out_dir={root / 'out'}"]) == 0
    report = json.loads((root / "out" / "report.json").read_text())
    assert 0 < report["kept_fraction"] < 1 and report["n_calibration_sequences"] == 16
    assert set(report["timings"]) == {"load_s", "hessians_s", "transform_s", "export_s"}
    assert (root / "out" / "kept_fraction.png").stat().st_size > 1000
    _, params = io.load_hf(root / "out" / "hf")
    q = params["blocks"]["attn"]["q_proj"]["kernel"]
    # every entry is the aligned weight, the fine-tuned weight, or compensated: the result is neither endpoint
    assert not np.allclose(q, aligned["blocks"]["attn"]["q_proj"]["kernel"])
    assert not np.allclose(q, finetuned["blocks"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(params["embed"]["embedding"], aligned["embed"]["embedding"])  # official: aligned
    assert len(list((root / "cache").glob("hessians-*.safetensors"))) == 1
    # a LoRA fine-tune (PEFT dir) is merged first; same calibration -> the cached Hessians are reused
    assert cli.main(["safedelta", *common, f"finetuned={root / 'adapter'}", f"out_dir={root / 'out_lora'}"]) == 0
    assert len(list((root / "cache").glob("hessians-*.safetensors"))) == 1
    _, from_lora = io.load_hf(root / "out_lora" / "hf")
    # the adapters touched q_proj only: there is a delta to edit, while up_proj has none and stays aligned exactly
    assert not np.allclose(from_lora["blocks"]["attn"]["q_proj"]["kernel"], aligned["blocks"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(from_lora["blocks"]["mlp"]["up_proj"]["kernel"],
                                  aligned["blocks"]["mlp"]["up_proj"]["kernel"])


@pytest.mark.slow
def test_safedelta_command_names_a_mismatched_checkpoint(pair, tmp_path, capsys):
    root, cfg, aligned, _ = pair
    other = llama.init(cfg.replace(num_layers=3), jax.random.key(3))
    io.save_hf(tmp_path / "other", cfg.replace(num_layers=3), other)
    assert cli.main(["safedelta", f"aligned={root / 'aligned'}", f"finetuned={tmp_path / 'other'}",
                     f"out_dir={tmp_path / 'out'}", "n_calibration=8", "export=false"]) == 2
    assert "not the same architecture" in capsys.readouterr().err


def test_method_knobs_bare_or_nested_reach_the_nested_config(capsys):
    """Every SafeDeltaConfig knob is settable as a bare or a `safedelta.`-dotted override; a job field of the same
    name (seed) stays the job's; a typo or an invalid value is an error naming the key."""
    assert cli.main(["safedelta", "damp=0.05", "block_size=512", "safedelta.exclude_frac=0.1", "lazy_group=8",
                     "layer_batch=2", "mode=paper", "ablation=magnitude", "seed=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["safedelta"]["seed"] == 0
    assert {k: printed["safedelta"][k] for k in ("damp", "block_size", "exclude_frac", "lazy_group", "layer_batch",
                                                 "mode", "ablation")} == {
        "damp": 0.05, "block_size": 512, "exclude_frac": 0.1, "lazy_group": 8, "layer_batch": 2, "mode": "paper",
        "ablation": "magnitude"}
    assert cli.main(["safedelta", "dmp=0.05", "--print-config"]) == 2
    assert "unknown key(s) dmp" in capsys.readouterr().err
    assert cli.main(["safedelta", "lazy_group=0", "--print-config"]) == 2
    assert "lazy_group" in capsys.readouterr().err


@pytest.mark.slow
def test_method_knobs_take_effect_and_are_recorded(pair, tmp_path):
    """A run with damp/block_size/exclude_frac/lazy_group overridden records them in report.json and gives other
    kernels than the default run on the same (cached) Hessians."""
    root, *_ = pair
    common = [f"aligned={root / 'aligned'}", f"finetuned={root / 'finetuned'}", "n_calibration=16", "max_len=128",
              f"cache_dir={root / 'cache'}", "s=1.0"]
    assert cli.main(["safedelta", *common, f"out_dir={tmp_path / 'default'}"]) == 0
    assert cli.main(["safedelta", *common, f"out_dir={tmp_path / 'knobs'}", "damp=0.05", "block_size=16",
                     "exclude_frac=0.1", "safedelta.lazy_group=8"]) == 0
    report = json.loads((tmp_path / "knobs" / "report.json").read_text())
    assert {k: report["job"]["safedelta"][k] for k in ("damp", "block_size", "exclude_frac", "lazy_group", "s")} == {
        "damp": 0.05, "block_size": 16, "exclude_frac": 0.1, "lazy_group": 8, "s": 1.0}
    default = json.loads((tmp_path / "default" / "report.json").read_text())
    assert default["job"]["safedelta"]["damp"] == 0.01
    assert report["kept_fraction"] != default["kept_fraction"]
    _, knobs = io.load_hf(tmp_path / "knobs" / "hf")
    _, plain = io.load_hf(tmp_path / "default" / "hf")
    assert not np.array_equal(knobs["blocks"]["attn"]["q_proj"]["kernel"], plain["blocks"]["attn"]["q_proj"]["kernel"])
