"""safetrade as an lm-evaluation-harness model: any lm-eval task on our params, batched, without torch.

    python -m safetrade.evaluate.lm_eval_model --model safetrade --model_args pretrained=runs/align/hf \\
        --tasks mmlu --batch_size 16            # or the console script `safetrade-lm-eval`, same arguments

`SafetradeLM` implements lm-eval's model contract (lm_eval.api.model.LM, through its TemplateLM base for the
context / continuation split) on safetrade's own Llama:

- `loglikelihood`: requests become token rows `(context + continuation)[-(max_length + 1):]`, sorted longest
  first, right-padded to a bucket length (safetrade.data.batching) in batches of `batch_size`, one jitted forward
  per batch, the output layer applied only where a continuation token is scored. Requests whose
  context + continuation minus the last token are identical (the choices " A" / " B" / " C" / " D" of a
  multiple-choice question) share one row: the last token is read from that row's full distribution, so an
  MMLU question costs one row, not four. Returns (sum of log-probs, every continuation token is the argmax).
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (lm_eval.utils) scored by the same batched path.
- `generate_until`: requests grouped by their generation kwargs, contexts left-truncated to leave room for
  `max_gen_toks`, generated in batches by safetrade.generate.generate (greedy unless do_sample with a
  temperature > 0), then cut before the first `until` string (and the end-of-text token).
- `apply_chat_template` / `chat_template` / `tokenizer_name`: lm-eval's chat-template hooks, through the model's
  own template (ChatML when the tokenizer has none), as safetrade.tokenizer renders it everywhere else.

Registration: `@register_model("safetrade")` runs when this module is imported. lm-eval 0.4.13 finds models only
in its own name table (lm_eval/models/__init__.py) and in what imported code registered; it reads no entry
points, so the stock `lm_eval` command cannot know "safetrade". `main()` (this module run with -m, or the
`safetrade-lm-eval` script) imports the model and then hands the command line to lm-eval's own CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from safetrade.data.batching import bucket_for, bucket_lengths, make_batch
from safetrade.errors import EvaluationError
from safetrade.generate import SamplingConfig, generate
from safetrade.models import llama

log = logging.getLogger(__name__)

__all__ = ["SafetradeLM", "main"]

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default (HFLM.max_gen_toks)
# lm-eval passes these to every model (from --device / --max_batch_size); one jax device set, no batch-size search.
IGNORED_MODEL_ARGS = ("device", "max_batch_size")
# The generation kwargs lm-eval tasks use that safetrade.generate implements; any other is refused by name.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")
# How many text arguments each request type has; a multimodal task (doc_to_image / doc_to_audio) appends a dict.
_TEXT_ARGS = {"loglikelihood": 2, "loglikelihood_rolling": 1, "generate_until": 2}


@dataclasses.dataclass(frozen=True)
class _Row:
    """One forward row: `tokens` scored on the last `n_cont`, shared by every request in `members`."""

    tokens: tuple[int, ...]
    n_cont: int
    members: list[tuple[int, int]]  # (request index, that request's last continuation token)


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(cfg, params, batch, where, targets, n_cont):
    """Score each row's continuation, whose token j sits in slot j of `targets` [B, C] and is predicted by the
    logits at position `where` [B, C]; `n_cont` [B] real slots per row (0 for a padding row).

    Returns, per row: Σ log p over the continuation minus its last token [B], whether each of those tokens was the
    argmax [B], and log p(·) at the last continuation position [B, V] (one row serves every request that differs
    only in that last token). The vocabulary projection runs on the C scored positions only, not on all T: an
    MMLU context of 500 tokens scored for one answer letter would otherwise materialise B x 500 x V logits
    (16.8 GB at B 16, T 2048 and Llama-3's 128256 tokens); XLA drops the unused full logits of `forward`.
    """
    _, hidden = llama.forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"],
                              return_hidden=True)
    scored = jnp.take_along_axis(hidden["final"], where[..., None], axis=1)  # [B, C, D]
    logits = _vocabulary_logits(cfg, params, scored)  # [B, C, V]
    # Reductions over V rather than a [B, C, V] log_softmax and argmax: on the CPU these passes cost more than the
    # tiny model itself. A token is greedy when no other token has a larger logit (HFLM: argmax equality).
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    greedy = target_logit >= logits.max(axis=-1)
    before_last = jnp.arange(targets.shape[1])[None, :] < (n_cont[:, None] - 1)
    prefix_logprob = jnp.where(before_last, target_logit - logz, 0.0).sum(-1)
    prefix_greedy = jnp.all(jnp.where(before_last, greedy, True), axis=-1)
    last = jnp.maximum(n_cont - 1, 0)[:, None]
    last_logits = jnp.take_along_axis(logits, last[..., None], axis=1)[:, 0]  # [B, V]
    return prefix_logprob, prefix_greedy, last_logits - jnp.take_along_axis(logz, last, axis=1)


def _vocabulary_logits(cfg, params, hidden):
    """The model's own output layer (tied embedding or lm_head, as Llama.__call__ applies it) on `hidden`."""
    model = nnx.merge(llama.graphdef(cfg), params)
    logits = model.embed.attend(hidden) if model.lm_head is None else model.lm_head(hidden)
    return logits.astype(jnp.float32)


@register_model("safetrade")
class SafetradeLM(TemplateLM):
    """lm-eval model over safetrade params (see module doc). `model_args`: pretrained, batch_size, max_length,
    dtype, max_gen_toks, seed; lm-eval's device and max_batch_size are accepted and ignored."""

    MULTIMODAL = False  # lm-eval refuses image / audio tasks for models without it; _check_text_only says why

    def __init__(self, pretrained: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, dtype: str = "auto", max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 seed: int = 0, **other):
        unknown = sorted(k for k in other if k not in IGNORED_MODEL_ARGS)
        if unknown:
            known = ("pretrained", "batch_size", "max_length", "dtype", "max_gen_toks", "seed", *IGNORED_MODEL_ARGS)
            raise EvaluationError(f"lm-eval model_args for model 'safetrade': unknown key(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(known)}")
        if not pretrained:
            raise EvaluationError("lm-eval model 'safetrade' needs model_args pretrained=<HF directory | .gguf file | "
                                  "registered model name>")
        from safetrade.models.io import load_model
        from safetrade.tokenizer import load_tokenizer

        cfg, params = load_model(str(pretrained), dtype=str(dtype))
        tokenizer = load_tokenizer(str(pretrained))
        self._setup(cfg, params, tokenizer, batch_size=batch_size, max_length=max_length,
                    max_gen_toks=max_gen_toks, seed=seed, source=str(pretrained))

    @classmethod
    def from_params(cls, cfg, params, tokenizer, *, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0,
                    name: str = "params") -> SafetradeLM:
        """An lm-eval model over params already in memory (pass it as `lm_eval.simple_evaluate(model=...)`)."""
        self = cls.__new__(cls)
        self._setup(cfg, params, tokenizer, batch_size=batch_size, max_length=max_length,
                    max_gen_toks=max_gen_toks, seed=seed, source=name)
        return self

    def _setup(self, cfg, params, tokenizer, *, batch_size, max_length, max_gen_toks, seed, source):
        TemplateLM.__init__(self)
        if len(tokenizer) > cfg.vocab_size:
            raise EvaluationError(f"{source}: the tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                                  f"{cfg.vocab_size}")
        self.cfg, self.params, self.tokenizer, self.source = cfg, params, tokenizer, source
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length is not None else cfg.max_position_embeddings
        if not 1 < self._max_length <= cfg.max_position_embeddings:
            raise EvaluationError(f"lm-eval model_args max_length={self._max_length} must be in 2.."
                                  f"{cfg.max_position_embeddings} (the context of {source})")
        self._max_gen_toks = int(max_gen_toks)
        if self._max_gen_toks < 1:
            raise EvaluationError(f"lm-eval model_args max_gen_toks={max_gen_toks} must be >= 1")
        self._seed = int(seed)
        self.batch_sizes = {0: self._batch_size}  # lm-eval copies this into results["config"]["batch_sizes"]

    # ---- what lm-eval reads ------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling window's start) is conditioned on: BOS, else EOS, as HFLM."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return (self.tokenizer.name_or_path or self.source).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "model_num_parameters": self.cfg.num_params,
                "model_dtype": self.cfg.dtype, "model_param_dtype": self.cfg.param_dtype}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of `string`. By default the tokenizer's own special tokens (its BOS, if it adds one), except
        when the string already starts with BOS, as a chat-templated context does: never a second BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The context string for lm-eval's chat messages; with add_generation_prompt=False the last (assistant)
        message is left open for the continuation, as HFLM does."""
        import jinja2

        from safetrade.tokenizer import chat_prompt

        try:
            return chat_prompt(self.tokenizer, chat_history, add_generation_prompt,
                               continue_final_message=not add_generation_prompt)
        except jinja2.exceptions.TemplateError:
            # Some templates refuse a system turn; HFLM drops it and retries, and so do we.
            log.warning("the chat template failed; retrying without the system message")
            return chat_prompt(self.tokenizer, [m for m in chat_history if m["role"] != "system"],
                               add_generation_prompt, continue_final_message=not add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template `apply_chat_template` renders with (recorded in lm-eval's results); None when off."""
        from safetrade.tokenizer import CHATML_TEMPLATE

        if chat_template is False or chat_template is None:
            return None
        template = self.tokenizer.chat_template or CHATML_TEMPLATE
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise EvaluationError(f"chat template {name!r} not in the tokenizer's {sorted(template)}")
            return template[name]
        return template

    # ---- loglikelihood -----------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        _check_text_only(requests, "loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`requests`: ((context, continuation) or None, context ids, continuation ids) as TemplateLM builds them.
        The first element keys lm-eval's --use_cache; None (rolling windows) is not cached here."""
        rows: dict[tuple[tuple[int, ...], int], _Row] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise EvaluationError(f"loglikelihood request {i} has an empty continuation")
            if len(continuation) > self.max_length:
                raise EvaluationError(f"loglikelihood request {i}: a continuation of {len(continuation)} tokens "
                                      f"does not fit max_length {self.max_length}")
            # HFLM's window: at most max_length tokens of input, predicting the last len(continuation) of them + 1.
            window = tuple((list(context) + list(continuation))[-(self.max_length + 1):])
            key = (window[:-1], len(continuation))
            rows.setdefault(key, _Row(window, len(continuation), [])).members.append((i, window[-1]))
        results = self._score(list(rows.values()), len(requests), disable_tqdm)
        for (args, _, _), answer in zip(requests, results):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, answer)
        return results

    def _score(self, rows: list[_Row], n_requests: int, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Run `rows` in fixed-shape batches; one (log-prob, is-greedy) per request."""
        out: list[tuple[float, bool] | None] = [None] * n_requests
        buckets = bucket_lengths(self.max_length + 1)
        # Longest bucket first (an out-of-memory shows at once); inside a bucket, by continuation length: a batch is
        # padded to its bucket anyway, and to its longest continuation on the output layer.
        rows = sorted(rows, key=lambda r: (-bucket_for(len(r.tokens), buckets), -r.n_cont, -len(r.tokens)))
        pad = self.tokenizer.pad_token_id or 0
        bar = tqdm(total=n_requests, disable=disable_tqdm, desc="safetrade loglikelihood", unit="request")
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            length = bucket_for(max(len(r.tokens) for r in chunk), buckets)
            slots = bucket_for(max(r.n_cont for r in chunk), bucket_lengths(length, min_len=1))
            batch = make_batch([{"input_ids": np.asarray(r.tokens, np.int32), "loss_mask": np.ones(len(r.tokens))}
                                for r in chunk], length, self.batch_size, pad_id=pad)
            where = np.zeros((self.batch_size, slots), np.int32)
            targets = np.zeros((self.batch_size, slots), np.int32)
            n_cont = np.zeros(self.batch_size, np.int32)
            for k, r in enumerate(chunk):
                first = len(r.tokens) - r.n_cont  # index of the first continuation token
                where[k, :r.n_cont] = np.arange(first - 1, len(r.tokens) - 1)  # logits at t predict token t + 1
                targets[k, :r.n_cont] = r.tokens[first:]
                n_cont[k] = r.n_cont
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            prefix_lp, prefix_greedy, last_lp = (
                np.asarray(x) for x in _score_rows(self.cfg, self.params, inputs, where, targets, n_cont))
            for k, row in enumerate(chunk):
                best = last_lp[k].max()
                for i, last_token in row.members:
                    out[i] = (float(prefix_lp[k]) + float(last_lp[k, last_token]),
                              bool(prefix_greedy[k]) and bool(last_lp[k, last_token] >= best))
                bar.update(len(row.members))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole text, in disjoint windows of max_length tokens (each token predicted once)."""
        _check_text_only(requests, "loglikelihood_rolling")
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut before the first stop string; batched per distinct set of generation kwargs."""
        from safetrade.tokenizer import stop_token_ids

        _check_text_only(requests, "generate_until")
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.eot_token_id
        eos_text = self.tokenizer.decode([eos], skip_special_tokens=False) if eos is not None else None
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="safetrade generate_until", unit="request")
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            sampling, until = self._sampling(gen_kwargs, eos_text, stop_token_ids(self.tokenizer))
            room, sampling = self._context_room(sampling)
            contexts = [self.tok_encode(requests[i].args[0], left_truncate_len=room) or [self.prefix_token_id]
                        for i in indices]
            order = np.argsort([-len(c) for c in contexts], kind="stable")
            for b, start in enumerate(range(0, len(order), self.batch_size)):
                chunk = order[start:start + self.batch_size]
                generation = generate(self.cfg, self.params, [contexts[k] for k in chunk],
                                      dataclasses.replace(sampling, seed=sampling.seed + b),
                                      pad_id=self.tokenizer.pad_token_id or 0)
                for k, tokens in zip(chunk, generation.tokens):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    out[indices[k]] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[indices[k]].args, out[indices[k]])
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _sampling(self, gen_kwargs: dict, eos_text: str | None,
                  end_ids: Sequence[int]) -> tuple[SamplingConfig, list[str]]:
        """(SamplingConfig, stop strings) for one request's generation kwargs (lm-eval's aliases normalised)."""
        if not isinstance(gen_kwargs, dict):
            raise EvaluationError(f"generate_until expects a dict of generation kwargs, got "
                                  f"{type(gen_kwargs).__name__}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise EvaluationError(f"generation kwarg(s) {', '.join(unknown)} are not supported by the safetrade "
                                  f"lm-eval model; supported: {', '.join(GEN_KWARGS)}")
        until = handle_stop_sequences(kwargs["until"], eos=eos_text)
        # do_sample without a temperature samples at 1, as transformers' generate does; do_sample=False is greedy.
        temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
        # A stop string that is one whole token also ends the row early: the text is cut at or before that token
        # anyway, so stopping there changes nothing but the time spent.
        stop_ids = set(end_ids)
        for s in until:
            ids = self.tokenizer.encode(s, add_special_tokens=False)
            if len(ids) == 1 and self.tokenizer.decode(ids) == s:
                stop_ids.add(ids[0])
        sampling = SamplingConfig(max_new_tokens=int(kwargs["max_gen_toks"]), temperature=temperature,
                                  top_p=float(kwargs.get("top_p", 1.0)), seed=self._seed,
                                  stop_token_ids=tuple(sorted(stop_ids)))
        return sampling, until

    def _context_room(self, sampling: SamplingConfig) -> tuple[int, SamplingConfig]:
        """(most context tokens, sampling): as HFLM, a context keeps its last max_length - max_gen_toks tokens.
        generate() rounds prompt and new-token lengths up to pad_to_multiple (fewer compiled shapes); where that
        rounding would pass the model's context, it pads exactly instead."""
        room = self.max_length - sampling.max_new_tokens
        if room < 1:
            raise EvaluationError(f"max_gen_toks {sampling.max_new_tokens} leaves no room for a context within "
                                  f"max_length {self.max_length}")
        step = sampling.pad_to_multiple
        if -(-room // step) * step + -(-sampling.max_new_tokens // step) * step > self.cfg.max_position_embeddings:
            sampling = dataclasses.replace(sampling, pad_to_multiple=1)
        return room, sampling


def _batch_size(value) -> int:
    """lm-eval's --batch_size: an int, its string, or "auto" / "auto:N" (no search here: the default size)."""
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size=%s: safetrade does not search batch sizes; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"lm-eval batch_size must be an integer or 'auto', got {value!r}") from None
    if size < 1:
        raise EvaluationError(f"lm-eval batch_size must be >= 1, got {size}")
    return size


def _check_text_only(requests, method: str) -> None:
    """lm-eval appends a dict of images / audio to the arguments of multimodal requests: refuse those by name."""
    for req in requests:
        extra = req.args[_TEXT_ARGS[method]:]
        if extra:
            kinds = sorted({k for e in extra if isinstance(e, dict) for k in e}) or [type(e).__name__ for e in extra]
            raise EvaluationError(
                f"lm-eval task {req.task_name!r} sends multimodal {method} requests ({', '.join(kinds)} input); the "
                "safetrade lm-eval model supports text-only loglikelihood, loglikelihood_rolling and generate_until")


def main(argv: Sequence[str] | None = None) -> Any:
    """lm-eval's command line, with "safetrade" registered (importing this module did that)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return cli_evaluate()


if __name__ == "__main__":
    # Run as `python -m`, this file is the module __main__, and it is that copy of SafetradeLM that got registered.
    main()
