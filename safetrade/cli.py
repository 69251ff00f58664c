"""The `safetrade` command: one subcommand per job.

    safetrade generate --model smollm2-135m-instruct --prompt "How do I bake bread?"
    safetrade convert smollm2-135m-instruct out/smollm2-hf
    safetrade evaluate model=runs/align/hf harmful=[heldout,advbench] gsm8k=200 --out runs/eval/aligned.json
    safetrade evaluate --compare runs/eval/base.json runs/eval/aligned.json --plot runs/eval/compare.png
    safetrade demo [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from safetrade.errors import SafetradeError

# Each command imports its job module when it runs: importing them all here takes 2.9 s (jax, optax, orbax, the
# model) against 0.08 s for this module alone (measured 2026-12-01, 2-core CPU), which `safetrade --help` and every
# config error would pay.

DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registered name, .gguf file, HF directory or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weight and compute dtype; auto: bfloat16 compute on gpu/tpu, float32 on cpu, float32 "
                        "weights (default: auto)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed, same text (default: 0)")


def _add_config_args(p: argparse.ArgumentParser, job: str, example: str) -> None:
    """KEY=VALUE overrides, --config and --print-config of a job config resolved by safetrade.config.load."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"{job} fields, e.g. {example}")
    p.add_argument("--config", type=Path, default=None, help=f"YAML file of {job} fields")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safetrade", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="chat-formatted generation from one or more prompts",
                         description="Apply the model's chat template to each prompt and generate a reply.")
    _add_model_args(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="a user message; repeat the flag for a batch of prompts")
    gen.add_argument("--system", default=None,
                     help="system message (default: the chat template's own default, if any)")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    _add_sampling_args(gen)
    gen.add_argument("--json", type=Path, default=None, help="also write prompts and replies to this JSON file")

    conv = sub.add_parser("convert", help="convert a GGUF file or HF directory into an HF safetensors directory",
                          description="Write config.json + safetensors + tokenizer files that transformers and "
                                      "safetrade both load.")
    conv.add_argument("source", help="registered name, .gguf file, HF directory or hub id")
    conv.add_argument("output", type=Path, help="directory to write (created if missing)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="dtype of the written weights (default: float32)")

    for name, default, what in (
        ("align", "experiments/configs/align.yaml", "refusal-SFT the unaligned base model on the built-in alignment set"),
        ("finetune", "experiments/configs/finetune.yaml",
         "fine-tune an aligned model with a strategy: sft, case1_penalty, case1_constrained, case2_projection, "
         "case2_penalty"),
    ):
        job = sub.add_parser(name, help=what, description=what + ". Settings come from --config (YAML), then "
                             "dotted overrides such as optim.lr=1e-4 strategy.name=case1_penalty strategy.lam=1. "
                             "The resolved config is written to OUT_DIR/config.yaml; re-running the same command "
                             "resumes from the newest checkpoint there.")
        job.add_argument("--config", type=Path, default=Path(default), help=f"YAML job config (default: {default})")
        job.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="dotted overrides of config keys, e.g. steps=50 data.batch_size=4 lora.enabled=true")
        job.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    ev = sub.add_parser(
        "evaluate", help="safety and utility evaluation of one model, or a comparison of saved evaluations",
        description="ASR per harmful set and judge (with per-category breakdown), refusal margin, over-refusal, "
                    "GSM8K accuracy and response-only losses of one model; writes a JSON (config, model and data "
                    "fingerprints, metrics, per-sample outputs) and prints a table. Settings come from --config "
                    "(YAML) and KEY=VALUE overrides of safetrade.evaluate.suite.EvalConfig, e.g. "
                    "model=runs/align/hf harmful=[heldout,advbench] n_harmful=100 gsm8k=200 judges=[keyword] "
                    "temperature=0.7 seed=1. With --compare, prints saved evaluations side by side instead.")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="EvalConfig fields, e.g. gsm8k=200")
    ev.add_argument("--config", type=Path, default=None, help="YAML file of EvalConfig fields")
    ev.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default: runs/eval/<model name>.json); the resolved config goes beside it")
    ev.add_argument("--compare", nargs="+", type=Path, default=None, metavar="JSON",
                    help="print these evaluation JSONs side by side (no model is run)")
    ev.add_argument("--plot", type=Path, default=None,
                    help="with --compare: write a PNG bar chart (95%% error bars) here")
    ev.add_argument("--reference", default=None, metavar="LABEL|PATH",
                    help="with --compare: the record the others are tested against (paired tests on the same "
                         "prompts); a file stem or one of the compared paths (default: the first)")
    ev.add_argument("--markdown", action="store_true", help="with --compare: print the table as markdown")
    ev.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    de = sub.add_parser(
        "defend", help="a post-hoc weight defense (Safe LoRA, Resta) on aligned / unaligned / fine-tuned checkpoints",
        description="Safe LoRA (Hsu et al.) or Resta (Bhardwaj et al.) applied to a fine-tuned model, from its aligned "
                    "parent and the unaligned model that was aligned; writes OUT_DIR/hf and OUT_DIR/report.json "
                    "(docs/defenses.md). Settings are KEY=VALUE fields of safetrade.defenses.job.DefendJob "
                    "(method=safe_lora|resta aligned=... unaligned=... finetuned=... out_dir=...) and the chosen "
                    "method's knobs, as safe_lora.KEY / resta.KEY or bare: num_layers=10, threshold=0.5, "
                    "gamma=1.0 dare_p=0.5 seed=0. `finetuned` may be a PEFT adapter dir trained on the aligned "
                    "model (Safe LoRA then projects the adapters themselves).")
    de.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="DefendJob fields and method knobs, e.g. method=resta gamma=0.5")
    de.add_argument("--config", type=Path, default=None, help="YAML file of DefendJob fields")
    de.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    sd = sub.add_parser(
        "safedelta", help="Safe Delta: make a fine-tuned model safer from its aligned parent (HF dir + report)",
        description="Safety Hessians from the aligned model on calibration rows (cached by model + data "
                    "fingerprint), the Safe Delta transform of every q/k/v/o/gate/up/down kernel, an HF dir and a "
                    "report (per-layer kept fraction, safety cost spent vs budget, time per stage, PNG). Settings "
                    "are KEY=VALUE fields of safetrade.safedelta.job.SafeDeltaJob, e.g. aligned=runs/align/hf "
                    "finetuned=runs/attack/hf out_dir=runs/safedelta n_calibration=64, and of its nested "
                    "SafeDeltaConfig, as safedelta.KEY=VALUE or bare KEY=VALUE: s=0.1 mode=official "
                    "ablation=no_compensation damp=0.05 block_size=512 exclude_frac=0.1 lazy_group=8 layer_batch=2. "
                    "`finetuned` may be a PEFT adapter dir trained on the aligned model (merged first).")
    sd.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="SafeDeltaJob fields and SafeDeltaConfig knobs, e.g. s=0.05 safedelta.damp=0.05")
    sd.add_argument("--config", type=Path, default=None,
                    help="YAML file of SafeDeltaJob fields (method knobs under a `safedelta:` section)")
    sd.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    th = sub.add_parser(
        "theory", help="check the project's Case I / Case II bounds against gaps measured in fine-tune runs",
        description="Measure r = ||θ − θ_s||, the safety gap G_s, proxy and capability losses of each fine-tune "
                    "run dir (OUT_DIR/hf + OUT_DIR/config.yaml, as `safetrade finetune` writes them) against the "
                    "aligned model; estimate Lipschitz/smoothness constants (Case II) and the min-L_f and "
                    "similarity terms (Case I); check the bounds and write result.json, bounds.md, bounds.png to "
                    "out_dir. Settings are KEY=VALUE fields of theory.real.TheoryJob, e.g. aligned=runs/align/hf "
                    "runs=[runs/case2/r0.5,runs/case2/r1] out_dir=runs/theory n_rows=16 lanczos_steps=8.")
    th.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="TheoryJob fields, e.g. samples=4")
    th.add_argument("--config", type=Path, default=None, help="YAML file of TheoryJob fields")
    th.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    sq = sub.add_parser(
        "sqsd", help="score a benign pool for safety-degradation risk (SQSD or a baseline); JSONL + windows",
        description="Per-sample risk scores of a benign training pool. SQSD needs three PEFT adapters on the same "
                    "base model (written by `safetrade finetune lora.enabled=true`, OUT_DIR/adapter): initial= "
                    "(briefly fine-tuned on benign data), danger= (fine-tuned on harmful compliance) and safety= "
                    "(fine-tuned on refusals). Baselines (method=): random, representation and gradient (He et al. "
                    "2024, anchored on the harmful Q+A attack set and refusals), self_inf (Self-Inf-N). Writes one "
                    "JSON line per sample (text, score, components, rank, window, flags) and prints window sizes. "
                    "Settings are KEY=VALUE fields of safetrade.sqsd.job.SQSDJob, the scorer's under sqsd., e.g. "
                    "model=runs/align/hf initial=A danger=D safety=S pool=capability n=200 sqsd.metric=projection "
                    "sqsd.batch_size=4 sqsd.max_len=512 out=runs/sqsd/scores.jsonl.")
    _add_config_args(sq, "SQSDJob", "method=random n=20 sqsd.batch_size=4")

    demo = sub.add_parser(
        "demo", help="the main job: align, attack, fine-tune, Case I/II, Safe Delta, SQSD, bounds (cached stages)",
        description="The whole study on the embedded default model (safetrade/demo.py; docs/demo.md): align the "
                    "base model, attack it and fine-tune it benignly, run Case I and Case II, apply Safe Delta, score "
                    "the benign pool with SQSD, check the Case II bounds, and print one summary table. Stages are "
                    "cached in OUT_DIR/stages: a re-run reuses them, an interrupted run resumes.")
    demo.add_argument("--quick", action="store_true", help="small sizes (a few minutes): checks the pipeline only")
    demo.add_argument("--config", default=None, help="a DemoJob YAML (see --print-config)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="DemoJob fields, e.g. align_steps=200")
    demo.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def _load(model: str, dtype: str):
    from safetrade.models import io
    from safetrade.tokenizer import load_tokenizer

    start = time.perf_counter()
    cfg, params = io.load_model(model, param_dtype=dtype, dtype=dtype)
    tokenizer = load_tokenizer(model)
    print(f"loaded {model}: {cfg.num_params / 1e6:.1f}M params, {cfg.num_layers} layers "
          f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return cfg, params, tokenizer


def _chat(cfg, params, tokenizer, prompts: list[str], system: str | None, raw: bool, sampling):
    from safetrade.generate import generate
    from safetrade.tokenizer import encode_user_prompts

    if raw:
        ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    else:
        ids = encode_user_prompts(tokenizer, prompts, system)
    start = time.perf_counter()
    out = generate(cfg, params, ids, sampling, pad_id=tokenizer.pad_token_id or 0)
    seconds = time.perf_counter() - start
    replies = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    n = sum(len(t) for t in out.tokens)
    print(f"generated {n} tokens in {seconds:.1f} s (compile included)", file=sys.stderr)
    return replies


def _sampling(args, tokenizer):
    from safetrade.generate import SamplingConfig
    from safetrade.tokenizer import stop_token_ids

    stops = stop_token_ids(tokenizer)
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=getattr(args, "temperature", 0.0),
                          top_p=getattr(args, "top_p", 1.0), seed=getattr(args, "seed", 0), stop_token_ids=stops)


def cmd_generate(args) -> int:
    cfg, params, tokenizer = _load(args.model, args.dtype)
    replies = _chat(cfg, params, tokenizer, args.prompt, args.system, args.raw, _sampling(args, tokenizer))
    for prompt, reply in zip(args.prompt, replies):
        print(f"\n>>> {prompt}\n{reply}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "sampling": vars(_sampling(args, tokenizer)),
                  "results": [{"prompt": p, "reply": r} for p, r in zip(args.prompt, replies)]}
        args.json.write_text(json.dumps(record, indent=2, default=list) + "\n")
    return 0


def cmd_convert(args) -> int:
    from safetrade.models import io
    from safetrade.tokenizer import load_tokenizer

    cfg, params = io.load_model(args.source, param_dtype=args.dtype)
    try:
        tokenizer = load_tokenizer(args.source)
    except SafetradeError as err:
        print(f"warning: no tokenizer written ({err})", file=sys.stderr)
        tokenizer = None
    io.save_hf(args.output, cfg, params, tokenizer=tokenizer)
    print(f"wrote {args.output} ({cfg.family}, {cfg.num_params / 1e6:.1f}M params, {args.dtype})")
    return 0


def cmd_demo(args) -> int:
    from safetrade.demo import QUICK, DemoJob, run_demo

    if args.quick:  # --quick sets the small sizes; explicit overrides still win
        args.overrides = [f"{k}={v}" for k, v in QUICK.items()] + list(args.overrides)
    job = _resolved_config(DemoJob, args)
    if job is None:
        return 0
    run_demo(job, log=lambda message: print(message, flush=True))
    return 0


def _resolved_config(cls, args):
    """`cls` from --config and KEY=VALUE overrides; with --print-config, print it as YAML and return None."""
    from safetrade import config

    resolved = config.load(cls, args.config, args.overrides)
    if not args.print_config:
        return resolved
    import yaml

    print(yaml.safe_dump(config.to_dict(resolved), sort_keys=False))
    return None


def _saved_job(cls, args):
    """`_resolved_config`, then the resolved job written to OUT_DIR/config.yaml (re-run with --config)."""
    from safetrade import config

    job = _resolved_config(cls, args)
    if job is not None:
        config.save(job, Path(job.out_dir) / "config.yaml")
    return job


def cmd_train_job(args) -> int:
    from safetrade import config
    from safetrade.train.jobs import run_train_job

    job = _resolved_config(config.TrainJob, args)
    if job is None:
        return 0
    summary = run_train_job(job)
    print(json.dumps({k: summary[k] for k in ("out_dir", "strategy", "eval_before", "eval_after", "seconds")},
                     indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from safetrade import config
    from safetrade.evaluate import report, suite

    if args.compare:
        print(report.compare(args.compare, plot=args.plot, reference=args.reference, markdown=args.markdown))
        if args.plot:
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    # `judge=` reads as well as the field's own name, `judges=`
    args.overrides = [f"judges={o[len('judge='):]}" if o.startswith("judge=") else o for o in args.overrides]
    eval_cfg = _resolved_config(suite.EvalConfig, args)
    if eval_cfg is None:
        return 0
    out = args.out or Path("runs/eval") / f"{Path(eval_cfg.model).name or 'model'}.json"
    config.save(eval_cfg, out.with_suffix(".config.yaml"))
    record = suite.run_evaluation(eval_cfg, out=out)
    print(report.table([record], [Path(out).stem]))
    for name, t in record["timing"].items():
        if "prompts_per_second" in t:
            print(f"throughput {name}: {t['prompts_per_second']:.2f} prompts/s, "
                  f"{t['new_tokens_per_second']:.0f} new tokens/s", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_safedelta(args) -> int:
    from safetrade.safedelta.job import SafeDeltaJob, nest_method_overrides, run_safe_delta_job

    args.overrides = nest_method_overrides(args.overrides)
    job = _saved_job(SafeDeltaJob, args)
    if job is None:
        return 0
    summary = run_safe_delta_job(job)
    print(json.dumps({k: summary[k] for k in ("timings", "kept_fraction", "calibration")}, indent=2))
    if summary["damping_fallbacks"]:
        print(f"{len(summary['damping_fallbacks'])} layer(s) needed more damping; see report.json", file=sys.stderr)
    print(f"wrote {Path(job.out_dir) / 'hf'} and {Path(job.out_dir) / 'report.json'}", file=sys.stderr)
    return 0


def cmd_defend(args) -> int:
    from safetrade.defenses.job import DefendJob, nest_method_overrides, run_defend_job

    args.overrides = nest_method_overrides(args.overrides)
    job = _saved_job(DefendJob, args)
    if job is None:
        return 0
    summary = run_defend_job(job)
    report = summary["report"]
    if job.method == "safe_lora":
        print(f"safe_lora ({report['delta']} delta, {report['mode']} mode): projected {report['layers_projected']} "
              f"of {report['layers_total']} layers")
    else:
        print(f"resta: gamma={report.get('gamma')} dare_p={report.get('dare_p')}")
    print(json.dumps(summary["timings"], indent=2))
    print(f"wrote {Path(job.out_dir) / 'hf'} and {Path(job.out_dir) / 'report.json'}", file=sys.stderr)
    return 0


def cmd_theory(args) -> int:
    from theory.real import TheoryJob, run_theory_job

    job = _saved_job(TheoryJob, args)
    if job is None:
        return 0
    result = run_theory_job(job)
    print((Path(job.out_dir) / "bounds.md").read_text())
    print(f"{result['violations']} violation(s); wrote result.json, bounds.md, bounds.png to {job.out_dir}",
          file=sys.stderr)
    return 0


def cmd_sqsd(args) -> int:
    from safetrade import config
    from safetrade.sqsd.job import SQSDJob, run_sqsd_job

    job = _resolved_config(SQSDJob, args)
    if job is None:
        return 0
    if job.out:
        config.save(job, Path(job.out).with_suffix(".config.yaml"))
    _, scores, windows = run_sqsd_job(job)
    print(scores.summary())
    print(f"{len(windows)} windows of {len(windows[0])} samples" + (f"; wrote {job.out}" if job.out else ""))
    return 0


COMMANDS = {"defend": cmd_defend, "safedelta": cmd_safedelta, "sqsd": cmd_sqsd, "theory": cmd_theory, "evaluate": cmd_evaluate, "generate": cmd_generate, "convert": cmd_convert, "demo": cmd_demo, "align": cmd_train_job,
            "finetune": cmd_train_job}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except SafetradeError as err:
        print(f"safetrade {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
