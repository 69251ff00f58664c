"""safetrade as an lm-evaluation-harness model (safetrade/evaluate/lm_eval_model.py), offline, on a tiny random model.

The tasks are the local YAML files in tests/data/lm_eval/ over local JSONL files. References are computed here,
one request at a time, without the adapter: context / continuation split by lm-eval's rule written out again,
log-probabilities from the training loss code (train.losses.token_nll) on each request alone (batch 1, no shared
rows, no sorting), greedy text from a full recompute per token (no KV cache). Tolerance: 1e-4 absolute on
log-probabilities summed over a few tokens (float32; batch composition and row sharing change only the order of
float32 reductions).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from lm_eval import simple_evaluate
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from transformers import PreTrainedTokenizerFast

from safetrade.errors import EvaluationError
from safetrade.evaluate.lm_eval_model import SafetradeLM
from safetrade.models import io, llama
from safetrade.tokenizer import CHATML_TEMPLATE, chat_prompt, tokenizer_from_gguf
from safetrade.train.losses import token_nll
from tests.test_tokenizer import write_tiny_gguf

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval"  # the YAMLs name their JSONL files relative to REPO
MAX_LENGTH = 63  # every loglikelihood row fits one 64-token bucket: one compile serves the whole file
BATCH = 8
ATOL = 1e-4
REFERENCE_WIDTH = 64  # >= MAX_LENGTH + 1 and >= a generation context + its new tokens
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    tok = tokenizer_from_gguf(write_tiny_gguf(tmp / "tok.gguf", chat_template=CHATML_TEMPLATE))
    cfg = llama.preset("tiny").replace(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False)
    params = llama.init(cfg, jax.random.key(0))
    # A tied random model greedily repeats its last token; an untied, scaled-up head writes varied text instead.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10
    return SimpleNamespace(tok=tok, cfg=cfg, params=params, dir=io.save_hf(tmp / "model", cfg, params, tok))


@pytest.fixture(scope="module")
def lm(tiny):
    return SafetradeLM.from_params(tiny.cfg, tiny.params, tiny.tok, batch_size=BATCH, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def evaluated(tiny):
    """One lm-eval run of the three local tasks through the registered name, as the CLI does it."""
    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(REPO):
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        return simple_evaluate(model="safetrade", model_args=f"pretrained={tiny.dir},max_length={MAX_LENGTH}",
                               batch_size=BATCH, tasks=["safetrade_mc", "safetrade_gen", "safetrade_rolling"],
                               task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)


# ---- references, one request at a time ------------------------------------------------------------------------


def split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM rule: an empty context becomes the prefix token (BOS here); trailing context spaces
    move into the continuation; the whole string is encoded and split at the context's length."""
    if context == "":
        return [tok.bos_token_id], tok.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tok.encode(context)
    return context_ids, tok.encode(context + continuation)[len(context_ids):]


@functools.partial(jax.jit, static_argnums=0)
def _one_row(cfg, params, batch):
    """token_nll and the logits of one row. The row is right-padded to a fixed width only so that this compiles
    once (on 2 CPU cores a compile per length costs more than the whole test file); under the causal mask a
    position never sees the padding after it."""
    nll, _ = token_nll(cfg, params, batch)
    logits, _ = llama.forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
    return nll, logits


def forward_one(tiny, tokens, targets: int = 0):
    """(per-token NLL [W-1], logits [W, V]) of `tokens` alone, the last `targets` of them scored."""
    n = len(tokens)
    assert n <= REFERENCE_WIDTH
    batch = {"input_ids": np.zeros((1, REFERENCE_WIDTH), np.int32),
             "attention_mask": np.zeros((1, REFERENCE_WIDTH), np.int32),
             "loss_mask": np.zeros((1, REFERENCE_WIDTH), np.float32)}
    batch["input_ids"][0, :n] = tokens
    batch["attention_mask"][0, :n] = 1
    batch["loss_mask"][0, n - targets:n] = 1
    nll, logits = _one_row(tiny.cfg, tiny.params, batch)
    return np.asarray(nll[0]), np.asarray(logits[0])


def reference_score(tiny, context_ids, continuation_ids) -> tuple[float, bool]:
    """(Σ log p(continuation), all greedy) from token_nll on this request alone, left-truncated as HFLM does."""
    window = (list(context_ids) + list(continuation_ids))[-(MAX_LENGTH + 1):]
    n, m = len(window), len(continuation_ids)
    nll, logits = forward_one(tiny, window, m)
    greedy = np.argmax(logits[n - m - 1:n - 1], -1).tolist() == window[n - m:]
    return -float(nll.sum()), greedy


def reference_greedy(tiny, context_ids, max_new: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence for every new token; stops at end-of-turn."""
    ids, out = list(context_ids), []
    for _ in range(max_new):
        _, logits = forward_one(tiny, ids)
        token = int(np.argmax(logits[len(ids) - 1]))
        if token == tiny.tok.eos_token_id:
            break
        ids.append(token)
        out.append(token)
    return out


def docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines()]


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(arguments), idx=0,
                    metadata=("direct", 0, 1))


# ---- through lm-eval's evaluator --------------------------------------------------------------------------------


def test_registered_under_its_name():
    assert get_model("safetrade") is SafetradeLM


def test_multiple_choice_accuracy_equals_a_hand_computation(evaluated, tiny):
    samples = {s["doc"]["id"]: s for s in evaluated["samples"]["safetrade_mc"]}
    correct = []
    for doc in docs("mc.jsonl"):
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [reference_score(tiny, *split(tiny.tok, context, " " + choice)) for choice in doc["choices"]]
        got = [resp[0] for resp in samples[doc["id"]]["resps"]]
        np.testing.assert_allclose([g[0] for g in got], [s[0] for s in scores], atol=ATOL, rtol=0)
        assert [bool(g[1]) for g in got] == [s[1] for s in scores]
        correct.append(int(np.argmax([s[0] for s in scores])) == doc["answer"])
    assert evaluated["results"]["safetrade_mc"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert evaluated["config"]["batch_sizes"] == [BATCH]


def test_generate_until_stops_at_the_tasks_stop_strings(evaluated, tiny):
    samples = {s["doc"]["id"]: s for s in evaluated["samples"]["safetrade_gen"]}
    for doc in docs("gen.jsonl"):
        context_ids = tiny.tok.encode(f"{doc['prompt']}\nAnswer:")[-(MAX_LENGTH - 16):]
        text = tiny.tok.decode(reference_greedy(tiny, context_ids, 16), skip_special_tokens=True)
        expected = text.split("\n")[0].split(".")[0]  # the YAML's until: ["\n", "."]
        assert samples[doc["id"]]["resps"] == [[expected]]


def test_rolling_loglikelihood_of_the_task_equals_token_nlls(evaluated, tiny):
    samples = {s["doc"]["id"]: s for s in evaluated["samples"]["safetrade_rolling"]}
    short = docs("text.jsonl")[0]
    tokens = tiny.tok.encode(short["text"])
    assert len(tokens) < MAX_LENGTH  # one window: the prefix token, then the text
    expected, _ = reference_score(tiny, [tiny.tok.bos_token_id], tokens)
    assert samples[short["id"]]["resps"][0][0] == pytest.approx(expected, abs=ATOL)


# ---- the adapter's methods, directly ----------------------------------------------------------------------------


def test_loglikelihood_batched_equals_one_request_at_a_time(lm, tiny):
    long_context = "word " * 40  # 200 bytes: left-truncated to the window
    pairs = [
        ("Question: is this safe?\nAnswer:", " A"),  # choices that differ in their last token only: one row
        ("Question: is this safe?\nAnswer:", " B"),
        ("Question: is this safe?\nAnswer:", " C"),
        ("hello", " world hello"),
        ("", "hello world"),  # empty context: conditioned on the prefix token
        ("Answer: ", "maybe"),  # trailing space moves into the continuation
        (long_context, " the end"),
    ]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ref_logprob, ref_greedy = reference_score(tiny, *split(tiny.tok, context, continuation))
        assert logprob == pytest.approx(ref_logprob, abs=ATOL), (context, continuation)
        assert greedy == ref_greedy
    # the shared-row path ran: the first three requests agree on everything but their last token
    shared = {(*ctx, *cont[:-1]) for ctx, cont in (split(tiny.tok, c, x) for c, x in pairs[:3])}
    assert len(shared) == 1 and len({split(tiny.tok, c, x)[1][-1] for c, x in pairs[:3]}) == 3


def test_is_greedy_is_true_exactly_for_the_argmax_continuation(lm, tiny):
    context = tiny.tok.encode("Question: is this safe?\nAnswer:")
    greedy = reference_greedy(tiny, context, 4)
    assert len(greedy) == 4
    other = next(t for t in range(4, 200) if t not in greedy)
    token_requests = [greedy, [other, *greedy[1:]], [*greedy[:2], other, greedy[3]], [*greedy[:3], other]]
    got = lm._loglikelihood_tokens([(None, context, cont) for cont in token_requests], disable_tqdm=True)
    assert [g for _, g in got] == [True, False, False, False]
    for cont, (logprob, _) in zip(token_requests, got):
        assert logprob == pytest.approx(reference_score(tiny, context, cont)[0], abs=ATOL)


def test_context_split_moves_trailing_spaces(lm, tiny):
    context, continuation = lm._encode_pair("Answer: ", "maybe")
    assert context == tiny.tok.encode("Answer:")
    assert continuation == tiny.tok.encode("Answer: maybe")[len(context):] == tiny.tok.encode(" maybe")
    a, b = lm.loglikelihood([request("loglikelihood", "Answer: ", "maybe"),
                             request("loglikelihood", "Answer:", " maybe")], disable_tqdm=True)
    assert a == b


def test_rolling_loglikelihood_over_several_windows_is_the_sum_of_their_nlls(lm, tiny):
    text = docs("text.jsonl")[1]["text"]
    tokens = tiny.tok.encode(text)
    windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        tokens, prefix_token=tiny.tok.bos_token_id, max_seq_len=MAX_LENGTH, context_len=1)]
    assert len(windows) > 1 and sum(len(cont) for _, cont in windows) == len(tokens)
    expected = sum(reference_score(tiny, ctx, cont)[0] for ctx, cont in windows)
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert got == pytest.approx(expected, abs=ATOL * len(windows))


def test_generate_until_cuts_at_a_stop_string_and_obeys_max_gen_toks(lm, tiny):
    context = "Safe or unsafe: bake bread\nAnswer:"
    full = reference_greedy(tiny, tiny.tok.encode(context), 12)
    text = tiny.tok.decode(full, skip_special_tokens=True)
    pieces = [tiny.tok.decode([t]) for t in full]
    printable = ["\ufffd" not in piece and piece.strip() != "" for piece in pieces]
    clean = [k for k in range(2, len(full) - 1) if printable[k] and printable[k + 1]]
    # a stop string that is one whole token (generation also ends early there) and one that spans two tokens
    # (only the text cut can stop it)
    one_token = next(pieces[k] for k in clean if tiny.tok.encode(pieces[k]) == [full[k]])
    two_tokens = next(s for k in clean if len(tiny.tok.encode(s := pieces[k] + pieces[k + 1])) > 1)
    kwargs = {"max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([
        request("generate_until", context, {"until": [one_token], **kwargs}),
        request("generate_until", context, {"until": [two_tokens], **kwargs}),
        request("generate_until", context, {"until": [], "max_gen_toks": 4}),
    ], disable_tqdm=True)
    expected = [text.split(one_token)[0], text.split(two_tokens)[0], tiny.tok.decode(full[:4])]
    assert got == expected
    assert len(expected[0]) < len(text) and len(expected[1]) < len(text)


def test_chat_template_hooks_and_no_second_bos(tiny):
    # The same vocabulary with a tokenizer that adds BOS on its own, as Llama-3's does.
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=tiny.tok.backend_tokenizer, bos_token=tiny.tok.bos_token,
                                      eos_token=tiny.tok.eos_token, pad_token=tiny.tok.pad_token,
                                      add_bos_token=True, chat_template=CHATML_TEMPLATE)
    lm = SafetradeLM.from_params(tiny.cfg, tiny.params, bos_tok, max_length=MAX_LENGTH, name="tiny/chat")
    bos = bos_tok.bos_token_id
    assert lm.tok_encode("hello") == [bos, *bos_tok.encode("hello", add_special_tokens=False)]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    templated = lm.apply_chat_template(messages)
    assert templated == chat_prompt(bos_tok, messages) and templated.startswith(bos_tok.bos_token)
    ids = lm.tok_encode(templated)
    assert ids == bos_tok.encode(templated, add_special_tokens=False) and ids[0] == bos and ids[1] != bos
    # add_generation_prompt=False leaves the last assistant message open for the continuation
    open_turn = lm.apply_chat_template([*messages, {"role": "assistant", "content": "The answer is"}],
                                       add_generation_prompt=False)
    assert open_turn.endswith("<|im_start|>assistant\nThe answer is")
    assert lm.chat_template(True) == CHATML_TEMPLATE and lm.chat_template(False) is None
    assert lm.tokenizer_name == "tiny__chat"


# ---- bad input --------------------------------------------------------------------------------------------------


def test_unknown_model_args_key_is_named():
    with pytest.raises(EvaluationError, match="unknown key.*temperature"):
        SafetradeLM.create_from_arg_string("pretrained=x,temperature=0.5", {"batch_size": 4, "device": "cpu"})
    with pytest.raises(EvaluationError, match="needs model_args pretrained"):
        SafetradeLM.create_from_arg_string("", {"device": None, "max_batch_size": 8})


def test_unsupported_requests_are_named(lm):
    image = {"visual": ["<an image>"]}
    with pytest.raises(EvaluationError, match=r"multimodal generate_until requests \(visual input\)"):
        lm.generate_until([request("generate_until", "Describe:", {"until": []}, image)])
    with pytest.raises(EvaluationError, match="multimodal loglikelihood"):
        lm.loglikelihood([request("loglikelihood", "a", " b", {"audio": [b""]})])
    with pytest.raises(EvaluationError, match="top_k"):
        lm.generate_until([request("generate_until", "hi", {"until": [], "top_k": 5})])
    with pytest.raises(EvaluationError, match="leaves no room"):
        lm.generate_until([request("generate_until", "hi", {"until": [], "max_gen_toks": MAX_LENGTH})])


def test_the_command_line_runs_the_local_task(tiny, evaluated, tmp_path):
    """`python -m safetrade.evaluate.lm_eval_model` is lm-eval's CLI with the model registered."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "safetrade.evaluate.lm_eval_model", "--model", "safetrade",
           "--model_args", f"pretrained={tiny.dir},max_length={MAX_LENGTH}", "--tasks", "safetrade_mc",
           "--include_path", str(TASKS), "--batch_size", str(BATCH), "--output_path", str(out)]
    env = {**os.environ, **OFFLINE, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"]["safetrade_mc"]["acc,none"]
    assert acc == evaluated["results"]["safetrade_mc"]["acc,none"]
