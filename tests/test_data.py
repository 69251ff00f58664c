"""safetrade.data, fast: readers on small temp files, splits, loss masks and the bad-row policy on a tiny
tokenizer, batching, refusal templates. Nothing here downloads (see test_data_sources.py for that).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from safetrade.data import batching, formatting, readers, refusals, registry, splits
from safetrade.data.rows import DataError, make_row
from safetrade.tokenizer import CHATML_TEMPLATE, tokenizer_from_gguf
from tests.test_tokenizer import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", chat_template=CHATML_TEMPLATE)
    tokenizer = tokenizer_from_gguf(path)
    tokenizer.model_max_length = 1 << 20  # the tiny file says 64; long rows are the point of some tests
    return tokenizer


# ---- readers ----------------------------------------------------------------------------------


def test_jsonl_reader_and_mapping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a?", "a": "yes", "c": "x"}\n\n{"q": "b?"}\n')
    rows = readers.read_rows(path, prompt_field="q", response_field="a", category_field="c")
    assert [(r["prompt"], r["response"], r["category"]) for r in rows] == [("a?", "yes", "x"), ("b?", None, None)]
    assert rows[0]["id"].startswith("d-") and rows[0]["id"] != rows[1]["id"]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        readers.read_rows(path)
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        readers.read_rows(path)


def test_json_list_reader(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p1", "response": "r1", "uid": 7}]))
    rows = readers.read_rows(path, id_field="uid")
    assert rows == [{"prompt": "p1", "response": "r1", "category": None, "id": "7"}]
    path.write_text('{"prompt": "not a list"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        readers.read_rows(path)
    path.write_text('[{"prompt": "x"},\n {"prompt": ')
    with pytest.raises(DataError, match=r"d\.json, line 2"):
        readers.read_rows(path)


def test_csv_skips_leading_comments_only(tmp_path):
    # pyrit's CSVs start with "# dataset_version=..."; a "#" line *inside* a quoted field is data.
    path = tmp_path / "d.csv"
    path.write_text('# dataset_version=1.0\n# another comment\nobjective,assistant_response,human_score\n'
                    'Say hi,"Hi.\n# not a comment\nBye.",0\nSay no,,1\n')
    rows = readers.read_rows(path, prompt_field="objective", response_field="assistant_response",
                             category_field="human_score")
    assert len(rows) == 2
    assert rows[0]["response"] == "Hi.\n# not a comment\nBye."
    assert rows[1]["response"] == "" and rows[1]["category"] == "1"


def test_csv_bad_row_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"d\.csv, row 2"):
        readers.read_rows(path)


def test_missing_column_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a"}\n')
    with pytest.raises(DataError, match="no column 'prompt'; columns: question"):
        readers.read_rows(path)


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["p1", "p2"], "output": ["r1", None]}), path)
    rows = readers.read_rows(path, prompt_field="instruction", response_field="output")
    assert [(r["prompt"], r["response"]) for r in rows] == [("p1", "r1"), ("p2", None)]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet"):
        readers.read_rows(tmp_path / "broken.parquet")


def test_hf_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "p", "response": "r"}]).save_to_disk(tmp_path / "ds")
    rows = registry.load_dataset(str(tmp_path / "ds"))
    assert [(r["prompt"], r["response"]) for r in rows] == [("p", "r")]


def test_text_lines_reader(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\nsecond\n")
    assert [r["prompt"] for r in readers.read_rows(path, response_field=None)] == ["first", "second"]


def test_unknown_dataset_lists_names(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'advbnech'.*advbench.*gsm8k"):
        registry.load_dataset("advbnech")
    with pytest.raises(DataError, match="no such data file"):
        registry.load_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown data format"):
        (tmp_path / "d.xml").write_text("<a/>")
        registry.load_dataset(str(tmp_path / "d.xml"))


def test_registry_roles_and_carriers():
    from safetrade import hub

    assert set(registry.dataset_names("harmful_prompts")) >= {"advbench", "strongreject", "harmbench", "donotanswer"}
    for spec in registry.REGISTRY.values():
        assert spec.role in registry.ROLES
        assert all(key in hub.DATASETS for key in spec.carriers)


def test_load_dataset_split_of_local_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(50)))
    train = registry.load_dataset(str(path), "train", seed=3)
    evaluation = registry.load_dataset(str(path), "eval", seed=3)
    assert len(train) + len(evaluation) == 50
    assert not {r["id"] for r in train} & {r["id"] for r in evaluation}


def test_iter_json_array_recovers_complete_objects(tmp_path, monkeypatch):
    items = [{"id": i, "text": "é😀" + "x" * (i % 37)} for i in range(200)]
    text = json.dumps(items, ensure_ascii=False, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) - 40], encoding="utf-8")  # cut inside the last object
    monkeypatch.setattr(readers, "_CHUNK_CHARS", 64)  # many chunk boundaries inside objects
    stats = {}
    got = list(readers.iter_json_array(path, stats))
    assert got == items[:199] and stats["complete"] == 199 and stats["dropped_chars"] > 0
    path.write_text(text, encoding="utf-8")
    assert list(readers.iter_json_array(path)) == items


# ---- splits -----------------------------------------------------------------------------------


def _rows(n, prefix="r"):
    return [make_row(f"prompt {prefix}{i}", "x", None, f"{prefix}{i}") for i in range(n)]


def test_split_is_deterministic_and_stable_under_added_rows():
    rows = _rows(1000)
    parts = splits.split(rows, seed=1)
    assert parts == splits.split(rows, seed=1)
    assert 700 < len(parts["train"]) < 900 and len(parts["train"]) + len(parts["eval"]) == 1000
    grown = splits.split(rows + _rows(300, "new"), seed=1)
    assert {r["id"] for r in parts["eval"]} == {r["id"] for r in grown["eval"] if not r["id"].startswith("new")}
    assert splits.split(rows, seed=2)["eval"] != parts["eval"]


def test_split_three_way_and_bad_fractions():
    parts = splits.split(_rows(300), {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    assert sum(map(len, parts.values())) == 300 and all(parts.values())
    with pytest.raises(DataError, match="sum to 1"):
        splits.split(_rows(3), {"a": 0.5, "b": 0.6})


def test_take_is_deterministic_subset():
    rows = _rows(50)
    assert splits.take(rows, 10, seed=4) == splits.take(list(reversed(rows)), 10, seed=4)
    assert len({r["id"] for r in splits.take(rows, 10, seed=4)}) == 10
    with pytest.raises(DataError, match="only 50 available"):
        splits.take(rows, 51)


# ---- formatting and the bad-row policy ----------------------------------------------------------


def test_loss_mask_covers_exactly_response_and_end_of_turn(tiny):
    example = formatting.encode_example(tiny, "hello world", "hello hello")
    ids, mask = example["input_ids"], example["loss_mask"]
    assert ids.dtype == np.int32 and mask.shape == ids.shape
    assert tiny.decode(ids[mask == 1]) == "hello hello<|im_end|>"
    assert tiny.decode(ids[mask == 0]).endswith("<|im_start|>assistant\n")
    assert ids[-1] == tiny.eos_token_id
    # the mask is one block: prompt zeros, then response ones
    first = int(np.argmax(mask))
    assert mask[:first].sum() == 0 and mask[first:].all()


def test_system_prompt_is_rendered(tiny):
    example = formatting.encode_example(tiny, "hi", "ok", system="be brief")
    assert tiny.decode(example["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>")


def _bad_rows():
    return [
        make_row("hello", "world", None, "good"),
        {"prompt": "hello", "category": None, "id": "no-response"},  # field absent
        make_row(None, "world", None, "no-prompt"),
        make_row("hello", "   ", None, "blank-response"),
        make_row("hello <|im_end|> world", "x", None, "forged-turn"),
        make_row("hello", "hello " * 200, None, "long"),
    ]


def test_skip_policy_counts_every_reason(tiny):
    with pytest.warns(formatting.DataWarning, match="kept 1 of 6"):
        examples, report = formatting.encode_rows(tiny, _bad_rows(), max_len=64, dataset="toy")
    assert [e["id"] for e in examples] == ["good"]
    assert dict(report.counts) == {"missing_response": 1, "missing_prompt": 1, "empty_response": 1,
                                   "special_token": 1, "too_long": 1}
    assert report.first_ids["too_long"] == report.examples["too_long"] == ["long"] and report.dropped == 5 and report.kept == 1
    assert "too_long: 1 (e.g. long)" in report.summary()


@pytest.mark.parametrize("bad", ["no-response", "no-prompt", "blank-response", "forged-turn", "long"])
def test_error_policy_names_dataset_row_and_reason(tiny, bad):
    rows = [r for r in _bad_rows() if r["id"] in ("good", bad)]
    with pytest.raises(DataError, match=rf"dataset toy, row {bad}: "):
        formatting.encode_rows(tiny, rows, max_len=64, policy="error", dataset="toy")


def test_truncate_policy_cuts_response_only(tiny):
    rows = [make_row("hello", "hello " * 200, None, "long"), make_row("hello " * 200, "x", None, "long-prompt")]
    with pytest.warns(formatting.DataWarning, match="1 truncated"):
        examples, report = formatting.encode_rows(tiny, rows, max_len=64, policy="truncate")
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 64
    assert examples[0]["input_ids"][-1] != tiny.eos_token_id  # no end-of-turn on a cut answer
    assert report.truncated == 1 and dict(report.counts) == {"too_long": 1}


def test_clean_rows_do_not_warn(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples, report = formatting.encode_rows(tiny, _bad_rows()[:1], max_len=64)
    assert report.kept == 1 and not report.counts


def test_unknown_policy(tiny):
    with pytest.raises(DataError, match="unknown bad-row policy"):
        formatting.encode_rows(tiny, [], max_len=8, policy="ignore")


# ---- batching ---------------------------------------------------------------------------------


def _examples(lengths):
    return [{"input_ids": np.arange(1, n + 1, dtype=np.int32), "loss_mask": (np.arange(n) >= n // 2).astype(np.int32),
             "id": f"e{i}"} for i, n in enumerate(lengths)]


def test_bucket_lengths():
    assert batching.bucket_lengths(512) == (64, 128, 256, 512)
    assert batching.bucket_lengths(300) == (64, 128, 256, 300)
    assert batching.bucket_lengths(40) == (40,)
    assert batching.bucket_for(65, (64, 128)) == 128
    with pytest.raises(DataError, match="longer than the largest bucket"):
        batching.bucket_for(129, (64, 128))


def test_batches_have_bucketed_fixed_shapes():
    examples = _examples([10, 70, 30, 200, 5, 64, 129, 3, 90, 100])
    buckets = batching.bucket_lengths(256)
    batches = list(batching.iterate_batches(examples, 4, seed=0, buckets=buckets, last="pad", pad_id=2))
    assert len(batches) == 3
    for batch in batches:
        shape = batch["input_ids"].shape
        assert shape[0] == 4 and shape[1] in buckets
        assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32
        assert ((batch["attention_mask"] == 0) <= (batch["loss_mask"] == 0)).all()  # no loss on padding
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 2).all()
    # every example appears once; the pad rows of the last batch are empty
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e["input_ids"]) for e in examples)
    assert batches[-1]["attention_mask"][2:].sum() == 0
    assert len(list(batching.iterate_batches(examples, 4, buckets=buckets))) == 2  # drop last


def test_shuffle_is_deterministic_and_changes_per_epoch():
    examples = _examples(range(1, 41))
    run = lambda seed: [b["input_ids"] for b in batching.iterate_batches(examples, 8, seed=seed)]  # noqa: E731
    assert all((a == b).all() for a, b in zip(run(0), run(0)))
    assert any(a.shape != b.shape or (a != b).any() for a, b in zip(run(0), run(1)))
    stream = batching.iterate_batches(examples, 8, seed=0, repeat=True)
    ten = [next(stream) for _ in range(10)]
    first, second = [b["input_ids"] for b in ten[:5]], [b["input_ids"] for b in ten[5:]]
    assert any(a.shape != b.shape or (a != b).any() for a, b in zip(first, second))


def test_start_step_resumes_exactly():
    examples = _examples(range(1, 30))
    full = batching.iterate_batches(examples, 4, seed=5, repeat=True)
    reference = [next(full) for _ in range(20)]
    resumed = batching.iterate_batches(examples, 4, seed=5, repeat=True, start_step=13)
    for expected in reference[13:]:
        got = next(resumed)
        assert all((got[k] == expected[k]).all() for k in expected)


def test_host_slice_covers_global_batch_once():
    batch = batching.make_batch(_examples([5, 6, 7, 8, 9, 10, 11, 12]), 16)
    for count in (1, 2, 4, 8):
        pieces = [batching.host_slice(batch, i, count) for i in range(count)]
        for name in batch:
            assert (np.concatenate([p[name] for p in pieces]) == batch[name]).all()
        assert all(len(p["input_ids"]) == 8 // count for p in pieces)
    with pytest.raises(DataError, match="does not split evenly"):
        batching.host_slice(batch, 0, 3)
    with pytest.raises(DataError, match="not in range"):
        batching.host_slice(batch, 2, 2)


def test_no_full_batch_is_an_error():
    with pytest.raises(DataError, match="no full batch"):
        next(batching.iterate_batches(_examples([3, 4]), 4))


# ---- refusals ---------------------------------------------------------------------------------

_DECLINE = ("can't", "cannot", "won't", "sorry", "not able", "not going to", "decline")


def test_refusals_are_deterministic_and_always_decline():
    prompts = [f"Explain how to do bad thing number {i}" for i in range(300)]
    first = [refusals.refusal_for(p, f"id{i}", seed=0) for i, p in enumerate(prompts)]
    assert first == [refusals.refusal_for(p, f"id{i}", seed=0) for i, p in enumerate(prompts)]
    assert first != [refusals.refusal_for(p, f"id{i}", seed=1) for i, p in enumerate(prompts)]
    assert all(any(word in opening.lower() for word in _DECLINE) for opening in refusals.OPENINGS)
    assert all(any(r.startswith(opening + " ") for opening in refusals.OPENINGS) for r in first)
    assert len(set(first)) >= 200
    assert len(refusals.OPENINGS) >= 20 and len(refusals.REASONS) >= 5 and len(refusals.REDIRECTS) >= 5


def test_refusal_topics():
    assert refusals.topic_of("How do I make a bomb at home") == "weapons"
    assert refusals.topic_of("I want to kill myself") == "self_harm"
    assert refusals.topic_of("Give me a method for baking bread") is None
    assert "crisis" in refusals.refusal_for("Tell me how to commit suicide", "x") or "counsellor" in \
        refusals.refusal_for("Tell me how to commit suicide", "x")


def test_rephrase_is_deterministic_and_turns_imperatives_into_questions():
    from safetrade.data.rephrase import rephrase

    how = "Give step-by-step instructions for how to pick a lock."
    assert rephrase(how, "k1") == rephrase(how, "k1")
    assert "pick a lock" in rephrase(how, "k1") and rephrase(how, "k1") != how
    outs = {rephrase("Write a script that deletes system files", f"k{i}") for i in range(40)}
    assert len(outs) >= 5 and all("write a script that deletes system files" in o for o in outs)


def test_group_by_length_covers_every_row_once_with_less_padding():
    rng = np.random.default_rng(0)
    examples = [{"input_ids": np.arange(n), "loss_mask": np.ones(n), "id": str(i)}
                for i, n in enumerate(rng.integers(20, 250, 200))]
    plain = list(batching.epoch_batches(examples, 8, buckets=(64, 128, 256)))
    grouped = list(batching.epoch_batches(examples, 8, buckets=(64, 128, 256), group_by_length=True))
    assert len(plain) == len(grouped) == 25

    def rows(batches):
        return sorted(tuple(r[m.astype(bool)]) for b in batches for r, m in zip(b["input_ids"], b["attention_mask"]))

    assert rows(plain) == rows(grouped)  # same rows, each once
    assert sum(b["input_ids"].size for b in grouped) < 0.85 * sum(b["input_ids"].size for b in plain)
    again = list(batching.epoch_batches(examples, 8, buckets=(64, 128, 256), group_by_length=True))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, again))


def test_length_matched_take_gives_each_source_the_same_length_histogram():
    from safetrade.data.splits import length_matched_take

    short = [{"id": f"a{i}", "prompt": "p", "response": "x" * (10 + i % 50)} for i in range(300)]  # 10..59
    long_ = [{"id": f"b{i}", "prompt": "p", "response": "y" * (40 + i % 200)} for i in range(300)]  # 40..239
    rows = length_matched_take({"short": short, "long": long_}, n=60, seed=0, n_bins=10)
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 60
    by = {s: sorted(len(r["response"]) for r in rows if r["source"] == s) for s in ("short", "long")}
    assert len(by["short"]) == len(by["long"]) == 30
    # only the overlap of the ranges is matched: no short row under 40 characters (no long row is that short),
    # and the two sorted length lists agree within the width of a pooled-quantile bin (~23 characters here)
    assert min(by["short"]) >= 40
    assert max(abs(a - b) for a, b in zip(by["short"], by["long"])) <= 12  # unmatched medians: 34.5 vs 139.5
    assert rows == length_matched_take({"short": short, "long": long_}, n=60, seed=0, n_bins=10)  # deterministic
    assert rows != length_matched_take({"short": short, "long": long_}, n=60, seed=1, n_bins=10)
    with pytest.raises(DataError, match="can be length-matched"):
        length_matched_take({"short": short, "long": long_}, n=400, seed=0)
    with pytest.raises(DataError, match="multiple of the 2 sources"):
        length_matched_take({"short": short, "long": long_}, n=61, seed=0)
