"""`safetrade defend` (safetrade/defenses/job.py): checkpoints in, defended HF dir + report out.

The job's output, reloaded from disk, must equal the library transform applied to the same params in memory
(bit for bit: float32 safetensors round-trip exactly), for a full fine-tune and for a PEFT adapter directory.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from safetrade.cli import main
from safetrade.defenses import RestaConfig, SafeLoraConfig, resta, safe_lora
from safetrade.defenses.job import DefendJob, nest_method_overrides, run_defend_job
from safetrade.errors import SafetradeError
from safetrade.models import io, llama, lora
from safetrade.models.llama_config import LoraConfig


def _perturbed(params, key, scale):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("defend")
    cfg = llama.preset("tiny")
    unaligned = llama.init(cfg, jax.random.key(0))
    aligned = _perturbed(unaligned, jax.random.key(1), 0.01)
    finetuned = _perturbed(aligned, jax.random.key(2), 0.01)
    paths = {}
    for name, params in (("unaligned", unaligned), ("aligned", aligned), ("finetuned", finetuned)):
        paths[name] = str(io.save_hf(root / name, cfg, params) or root / name)
    lora_cfg, with_adapters = lora.add_adapters(cfg, aligned, LoraConfig(rank=4, targets=("q_proj", "v_proj")),
                                                jax.random.key(3))
    base, adapters = lora.split(with_adapters)
    adapters = jax.tree.map(lambda b: b + 0.05 * jax.random.normal(jax.random.key(4), b.shape, b.dtype), adapters)
    lora.save_peft(root / "adapter", lora_cfg, adapters)
    paths["adapter"] = str(root / "adapter")
    return root, cfg, {"unaligned": unaligned, "aligned": aligned, "finetuned": finetuned}, paths


def _reloaded(out_dir):
    return io.load_model(out_dir / "hf", dtype="float32")[1]


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_safe_lora_and_resta_jobs_equal_the_library_transforms(checkpoints, tmp_path):
    _, _, params, paths = checkpoints
    common = dict(aligned=paths["aligned"], unaligned=paths["unaligned"], finetuned=paths["finetuned"])
    summary = run_defend_job(DefendJob(method="safe_lora", out_dir=str(tmp_path / "sl"), **common))
    expected, report = safe_lora(params["aligned"], params["unaligned"], params["finetuned"])
    _assert_equal(_reloaded(tmp_path / "sl"), expected)
    assert summary["report"]["layers_projected"] == report["layers_projected"] == 10
    assert json.loads((tmp_path / "sl" / "report.json").read_text())["report"]["delta"] == "full"

    run_defend_job(DefendJob(method="resta", out_dir=str(tmp_path / "re"), resta=RestaConfig(gamma=0.5), **common))
    expected, _ = resta(params["aligned"], params["unaligned"], params["finetuned"], gamma=0.5)
    _assert_equal(_reloaded(tmp_path / "re"), expected)


def test_a_peft_adapter_is_projected_in_its_lora_form_then_merged(checkpoints, tmp_path):
    _, cfg, params, paths = checkpoints
    summary = run_defend_job(DefendJob(method="safe_lora", aligned=paths["aligned"], unaligned=paths["unaligned"],
                                       finetuned=paths["adapter"], out_dir=str(tmp_path / "sl"),
                                       safe_lora=SafeLoraConfig(num_layers=2)))
    assert summary["finetuned_is_adapter"] and summary["report"]["delta"] == "lora"
    lora_cfg, with_adapters = lora.load_peft(paths["adapter"], cfg, params["aligned"])
    defended, _ = safe_lora(params["aligned"], params["unaligned"], with_adapters, num_layers=2)
    _assert_equal(_reloaded(tmp_path / "sl"), lora.merge(lora_cfg, defended)[1])


def test_cli_routes_bare_knobs_to_the_chosen_method(checkpoints, tmp_path, capsys):
    _, _, params, paths = checkpoints
    assert nest_method_overrides(["method=resta", "gamma=2", "out_dir=x"]) == ["method=resta", "resta.gamma=2",
                                                                               "out_dir=x"]
    assert nest_method_overrides(["num_layers=3"]) == ["safe_lora.num_layers=3"]
    out = tmp_path / "cli"
    rc = main(["defend", "method=safe_lora", "num_layers=3", f"aligned={paths['aligned']}",
               f"unaligned={paths['unaligned']}", f"finetuned={paths['finetuned']}", f"out_dir={out}"])
    assert rc == 0 and "projected 3 of" in capsys.readouterr().out
    assert (out / "config.yaml").exists()
    expected, _ = safe_lora(params["aligned"], params["unaligned"], params["finetuned"], num_layers=3)
    _assert_equal(_reloaded(out), expected)


def test_bad_jobs_are_clear_errors(checkpoints, tmp_path):
    _, _, _, paths = checkpoints
    with pytest.raises(SafetradeError, match="method='lisa'; choose one of safe_lora, resta"):
        DefendJob(method="lisa")
    with pytest.raises(SafetradeError, match="unaligned checkpoint .*missing"):
        run_defend_job(DefendJob(aligned=paths["aligned"], unaligned=str(tmp_path / "missing"),
                                 finetuned=paths["finetuned"], out_dir=str(tmp_path / "o")))
