"""The `safetrade` command end to end: generate, convert, and errors as messages rather than tracebacks."""

from __future__ import annotations

import json

import pytest
import yaml

from safetrade import cli
from safetrade.models import io
from tests.conftest import GOLDEN


def test_every_option_has_help():
    parser = cli.build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings or action.dest} has no help text"


def test_unknown_model_is_a_clean_error(capsys):
    assert cli.main(["generate", "--model", "no-such-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m-instruct" in err and "Traceback" not in err


@pytest.mark.slow
def test_generate_and_convert_on_the_embedded_model(tmp_path, capsys, smollm2_gguf):
    out = tmp_path / "gen.json"
    assert cli.main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
                     "--json", str(out)]) == 0
    reply = json.loads(out.read_text())["results"][0]["reply"]
    assert "Paris" in reply

    assert cli.main(["convert", str(GOLDEN / "tiny_gqa_tied"), str(tmp_path / "tiny")]) == 0
    assert "no tokenizer written" in capsys.readouterr().err  # the tiny golden dirs carry none
    assert io.load_hf(tmp_path / "tiny")[0] == io.load_hf(GOLDEN / "tiny_gqa_tied")[0]
    assert cli.main(["convert", str(smollm2_gguf), str(tmp_path / "hf")]) == 0
    cfg, _ = io.load_hf(tmp_path / "hf")
    assert cfg.num_layers == 30 and (tmp_path / "hf" / "tokenizer.json").exists()


@pytest.mark.slow
def test_sqsd_command_scores_a_pool_and_names_missing_adapters(tmp_path, capsys, smollm2_gguf):
    out = tmp_path / "scores.jsonl"
    assert cli.main(["sqsd", "method=random", "pool=capability", "n=20", f"out={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and sorted(r["rank"] for r in rows) == list(range(1, 21))
    assert {r["window"] for r in rows} == {1, 2, 3, 4, 5}
    assert cli.main(["sqsd", "pool=capability", "n=4", f"out={out}"]) == 2
    assert "sqsd needs initial=DIR, danger=DIR, safety=DIR" in capsys.readouterr().err


def test_sqsd_settings_go_through_the_config_path(tmp_path, capsys):
    """--config, dotted overrides of the nested scorer config and --print-config, as the other subcommands;
    a bad key or value is a clean error naming it (no model is loaded for any of these)."""
    settings = tmp_path / "sqsd.yaml"
    settings.write_text("method: gradient\nsqsd:\n  batch_size: 2\n")
    assert cli.main(["sqsd", "--config", str(settings), "sqsd.metric=projection", "sqsd.max_len=64", "n=5",
                     "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "gradient" and printed["n"] == 5
    assert printed["sqsd"] == {"metric": "projection", "batch_size": 2, "max_len": 64}
    assert cli.main(["sqsd", "sqsd.metrc=cosine", "--print-config"]) == 2
    assert "unknown key(s) metrc" in capsys.readouterr().err
    assert cli.main(["sqsd", "sqsd.metric=dot", "--print-config"]) == 2
    assert "unknown metric 'dot'" in capsys.readouterr().err
    assert cli.main(["sqsd", "method=best", "--print-config"]) == 2
    assert "unknown method 'best'" in capsys.readouterr().err


def test_evaluate_compare_of_a_missing_file_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["evaluate", "--compare", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
