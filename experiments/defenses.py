"""One comparison of defenses against harmful fine-tuning, on the same model, data, steps and judges.

    python experiments/defenses.py --aligned runs/defenses/align/hf --out runs/defenses
    python experiments/defenses.py ... --scenarios harmful --defenses sft safeinstr lisa --alt    # a subset

Scenarios (the rows fine-tuned on, written to OUT/data/): `harmful` -- the 100 harmful Q+A pairs of the attack
set; `benign` -- --pool GSM8K worked answers from the capability set; `dirty` -- the same pool with 10 % of its
rows replaced by harmful pairs (Safe Delta's "dirty" pattern). Every fine-tune is the same LoRA SFT (rank 8 on
all linear layers, AdamW, --steps steps of batch 8 at --max-len tokens, one seed) of the aligned model, and a
defense changes one thing:

  training data  safeinstr (refusal examples mixed in), bea (the same under a secret trigger, which is then the
                 system prompt of every evaluation prompt), sqsd_filter (the pool minus its top-k SQSD risk rows;
                 the scores use the scenario's SFT adapter as SQSD's "initial" and the harmful SFT adapter as its
                 "danger" direction)
  training rule  lisa (alignment-set steps interleaved, proximal term), case1 (+ λ proxy safety loss),
                 case2 (‖ΔW‖ ≤ r on the merged update)
  after training safe_lora, resta (need the unaligned model: --unaligned), safe_delta -- on the SFT run

Each defense runs at its main knob's default and, with --alt, at one other value (DEFENSES below). Every model
is judged on the same prompts: ASR by the keyword and classifier judges (and --guard, a Llama Guard / HarmBench
spec) on --n-harmful held-out harmful prompts, over-refusal on --n-benign held-out benign prompts, GSM8K accuracy
on --gsm8k held-out questions, and the loss on held-out GSM8K answers; each rate with its 95 % Wilson interval and
an exact McNemar test against SFT on the same prompts. "extra s" is a defense's wall time beyond plain SFT's.

Everything is cached in OUT: a finished run (hf/ present), a finished evaluation (same config) and the scenario
data are reused, so a killed study is re-run with the same command and a new --defenses / --alt only adds runs.
Writes OUT/result.json, OUT/summary.md, OUT/<scenario>/table.md and OUT/<scenario>/pareto.png. A study split by
--scenarios over several invocations with otherwise the same flags accumulates in one result.json and summary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from safetrade.data import write_rows

SCENARIOS = ("harmful", "benign", "dirty")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# defense -> (main knob, its default, the other value run with --alt). Training schedule knobs that do not scale
# to a 20-step run are set in `_finetune_overrides` (Lisa's cycle) and said in the README.
DEFENSES = {
    "sft": (None, None, None),
    "safeinstr": ("fraction", 0.1, 0.3),
    "bea": ("fraction", 0.1, 0.3),
    "lisa": ("rho", 1.0, 10.0),
    "case1": ("lam", 1.0, 4.0),
    "case2": ("radius", 0.5, 0.25),
    "safe_lora": ("num_layers", 10, 30),
    "resta": ("gamma", 1.0, 0.5),
    "safe_delta": ("s", 0.1, 0.5),
    "sqsd_filter": ("k_fraction", 0.1, 0.2),
}
POST_HOC = ("safe_lora", "resta", "safe_delta")


def label(defense: str, value) -> str:
    knob, default, _ = DEFENSES[defense]
    return defense if knob is None or value == default else f"{defense}-{knob}{value}"


# ----------------------------------------------------------------------------------------------------------------
# Data


def scenario_rows(scenario: str, pool: int, seed: int) -> list[dict]:
    from safetrade.config import DataSection
    from safetrade.data.sets import rows_for
    from safetrade.data.splits import stable_order, take

    attack = rows_for("attack", DataSection(seed=seed))
    if scenario == "harmful":
        return attack
    benign = take([r for r in rows_for("capability", DataSection(seed=seed)) if r.get("response")], pool, seed)
    if scenario == "benign":
        return benign
    n_harmful = pool // 10
    return stable_order(benign[: pool - n_harmful] + take(attack, n_harmful, seed), seed=f"dirty-{seed}")


# ----------------------------------------------------------------------------------------------------------------
# Stages (each reused when its output exists)


def _finetune_overrides(args, train: Path, defense: str, value) -> list[str]:
    common = [f"model.name={args.aligned}", f"data.train={train}", "data.eval_rows=0", "data.eval_sets=[]",
              f"data.max_len={args.max_len}", "data.batch_size=8", "data.bad_rows=truncate", f"data.seed={args.seed}",
              "lora.enabled=true", "lora.rank=8", "lora.alpha=16", f"lora.targets=[{','.join(ALL_LINEAR)}]",
              "optim.name=adamw", f"optim.lr={args.lr}", "optim.schedule=constant", f"steps={args.steps}",
              "eval_every=0", "save_every=0", "log_every=5", f"seed={args.seed}"]
    extra = {
        "safeinstr": ["defense.name=safeinstr", f"defense.fraction={value}"],
        "bea": ["defense.name=bea", f"defense.fraction={value}", f"defense.trigger_seed={args.bea_secret}",
                f"defense.trigger_tokens={args.bea_trigger_tokens}"],
        # the official 100 / 900 cycle at a 20-step scale: the same 1 : 9 share, two cycles
        "lisa": ["strategy.name=lisa", f"strategy.rho={value}", f"strategy.alignment_steps={max(1, args.steps // 20)}",
                 f"strategy.finetune_steps={max(1, 9 * args.steps // 20)}"],
        "case1": ["strategy.name=case1_penalty", f"strategy.lam={value}"],
        "case2": ["strategy.name=case2_projection", f"strategy.radius={value}"],
    }.get(defense, [])
    return common + extra


def finetune(args, run_dir: Path, train: Path, defense: str = "sft", value=None) -> dict:
    from safetrade import config
    from safetrade.train.jobs import run_train_job

    summary_path = run_dir / "summary.json"
    if (run_dir / "hf" / "config.json").exists() and summary_path.exists():
        return json.loads(summary_path.read_text())
    job = config.load(config.TrainJob, None, [f"out_dir={run_dir}", *_finetune_overrides(args, train, defense, value)])
    print(f"training {run_dir} ({defense} {value if value is not None else ''})", flush=True)
    return run_train_job(job)


def post_hoc(args, run_dir: Path, sft_dir: Path, defense: str, value) -> dict:
    """Safe LoRA (on the SFT adapter: its LoRA form), Resta or Safe Delta (on the merged SFT model)."""
    report_path = run_dir / "stage.json"
    if (run_dir / "hf" / "config.json").exists() and report_path.exists():
        return json.loads(report_path.read_text())
    print(f"{defense} {value} on {sft_dir}", flush=True)
    started = time.perf_counter()
    if defense == "safe_delta":
        from safetrade.safedelta import SafeDeltaConfig
        from safetrade.safedelta.job import SafeDeltaJob, run_safe_delta_job

        run_safe_delta_job(SafeDeltaJob(aligned=args.aligned, finetuned=str(sft_dir / "hf"), out_dir=str(run_dir),
                                        n_calibration=args.n_calibration, max_len=args.max_len, seed=args.seed,
                                        safedelta=SafeDeltaConfig(s=value, seed=args.seed)))
    else:
        from safetrade.defenses import RestaConfig, SafeLoraConfig
        from safetrade.defenses.job import DefendJob, run_defend_job

        knobs = ({"safe_lora": SafeLoraConfig(num_layers=value)} if defense == "safe_lora"
                 else {"resta": RestaConfig(gamma=value)})
        finetuned = sft_dir / ("adapter" if defense == "safe_lora" else "hf")
        run_defend_job(DefendJob(method=defense, aligned=args.aligned, unaligned=args.unaligned,
                                 finetuned=str(finetuned), out_dir=str(run_dir), **knobs))
    record = {"seconds": time.perf_counter() - started}
    report_path.write_text(json.dumps(record))
    return record


def sqsd_scores(args, out: Path, pool_file: Path, initial: Path, danger: Path, safety: Path):
    """SQSD risk score per pool row (cached as scores.jsonl)."""
    from safetrade.sqsd import SQSDConfig
    from safetrade.sqsd.job import SQSDJob, run_sqsd_job

    path = out / "scores.jsonl"
    if path.exists():
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [float("nan") if line.get("score") is None else line["score"] for line in lines], \
            json.loads((out / "stage.json").read_text())["seconds"]
    rows = [json.loads(line) for line in pool_file.read_text().splitlines()]
    started = time.perf_counter()
    _, scores, _ = run_sqsd_job(SQSDJob(model=args.aligned, method="sqsd", initial=str(initial), danger=str(danger),
                                        safety=str(safety), windows=5, seed=args.seed, out=str(path),
                                        sqsd=SQSDConfig(batch_size=8, max_len=args.max_len)), rows=rows)
    seconds = time.perf_counter() - started
    (out / "stage.json").write_text(json.dumps({"seconds": seconds}))
    return [float(s) for s in scores.score], seconds


def evaluate(args, model: str, out: Path, system: str | None = None) -> dict:
    """The evaluation suite with the study's settings; an existing record of the same config is reused."""
    from safetrade.evaluate.suite import EvalConfig, run_evaluation

    judges = ("keyword", "classifier", *([args.guard] if args.guard else []))
    config = EvalConfig(model=model, harmful=("heldout",), n_harmful=args.n_harmful, benign="heldout",
                        n_benign=args.n_benign, gsm8k=args.gsm8k, gsm8k_max_new_tokens=args.gsm8k_tokens,
                        loss_sets=("gsm8k_eval",), loss_rows=args.loss_rows, judges=judges,
                        max_new_tokens=args.max_new_tokens, batch_size=16, max_len=256, system=system,
                        margin=args.margin, seed=args.seed)
    if out.exists():
        try:
            record = json.loads(out.read_text())
        except ValueError:
            record = {}
        if record.get("config") == json.loads(json.dumps(dataclasses.asdict(config))):
            return record
    print(f"evaluating {model}" + (" (with the BEA trigger)" if system else ""), flush=True)
    return run_evaluation(config, out=out)


# ----------------------------------------------------------------------------------------------------------------
# Summary


def headline(record: dict) -> dict:
    """ASR per judge, over-refusal, GSM8K accuracy and answer loss, each rate with its 95 % interval."""
    m = record["metrics"]
    judges = m["detail/harmful/heldout"]["judges"]
    out = {f"asr_{name}": j["asr"] for name, j in judges.items() if "asr" in j}
    out.update({f"asr_{name}_ci": j["asr_ci"] for name, j in judges.items() if "asr_ci" in j})
    out["over_refusal"] = m.get("over_refusal/heldout")
    out["over_refusal_ci"] = m.get("intervals", {}).get("over_refusal/heldout")
    if "gsm8k_accuracy" in m:
        out["gsm8k_accuracy"], out["gsm8k_accuracy_ci"] = m["gsm8k_accuracy"], m["intervals"]["gsm8k_accuracy"]
    out["gsm8k_loss"] = m.get("loss/gsm8k_eval")
    return out


def pareto_plot(scenario: str, rows: list[dict], aligned: dict, path: Path) -> None:
    """ASR (keyword judge, 95 % interval) against utility (held-out GSM8K answer loss, lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for k, row in enumerate([{"label": "aligned (no fine-tune)", **aligned}, *rows]):
        lo, hi = row["asr_keyword_ci"]
        y = 100 * row["asr_keyword"]
        # aligned: hollow black circle; SFT (no defense): black square; a second knob value: hollow
        ax.errorbar(row["gsm8k_loss"], y, yerr=[[y - 100 * lo], [100 * hi - y]], fmt="s" if k == 1 else "o",
                    capsize=3, color="k" if k <= 1 else f"C{(k - 2) % 10}",
                    mfc="none" if k == 0 or (k > 1 and row["label"] not in DEFENSES) else None)
        ax.annotate(row["label"], (row["gsm8k_loss"], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("held-out GSM8K answer loss (lower = more utility)")
    ax.set_ylabel("ASR, keyword judge [%] (95 % Wilson)")
    ax.set_title(f"defenses, {scenario} fine-tune: lower-left is better")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _refused(record: dict, sample_set: str, judge: str = "keyword") -> list[bool | None]:
    out = []
    for sample in record["samples"][sample_set]:
        verdict = (sample.get("verdicts") or {}).get(judge)
        out.append(None if sample.get("error") or not verdict or verdict.get("error") else bool(verdict["refused"]))
    return out


def _pct(rate, ci) -> str:
    return f"{100 * rate:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _p(p: float) -> str:
    return ("<0.001" if p < 0.001 else f"{p:.3f}") + ("" if p < 0.05 else " ns")


def summary_markdown(out: Path, result: dict) -> str:
    """One table over scenarios: each defense's rates with 95 % intervals and exact McNemar p against SFT on the
    same prompts (keyword judge), the loss change against SFT and the extra wall time."""
    from safetrade.evaluate import stats

    lines = ["| scenario | defense | ASR keyword [95 %] | p vs SFT | ASR classifier [95 %] | over-refusal [95 %] | "
             "p vs SFT | GSM8K loss (Δ vs SFT) | extra s | ASR p vs aligned | utility gain kept |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    aligned_record = json.loads((out / "eval_aligned.json").read_text())

    def asr_of(record):
        return [None if r is None else not r for r in _refused(record, "harmful:heldout")]

    for scenario, sc in result["scenarios"].items():
        records = {row["label"]: json.loads((out / scenario / "eval" / f"{row['label']}.json").read_text())
                   for row in sc["rows"]}
        sft_row = next(r for r in sc["rows"] if r["label"] == "sft")
        sft = records["sft"]
        a = sc["aligned"]
        lines.append(f"| {scenario} | aligned (no fine-tune) | {_pct(a['asr_keyword'], a['asr_keyword_ci'])} | | "
                     f"{_pct(a['asr_classifier'], a['asr_classifier_ci'])} | "
                     f"{_pct(a['over_refusal'], a['over_refusal_ci'])} | | {a['gsm8k_loss']:.3f} | | | |")
        aligned_asr = [None if r is None else not r for r in _refused(aligned_record, "harmful:heldout")]
        gain = a["gsm8k_loss"] - sft_row["gsm8k_loss"]
        for row in sc["rows"]:
            rec = records[row["label"]]
            name = row["label"] if row["knob"] is None else f"{row['defense']} ({row['knob']} = {row['value']})"
            if row["label"] == "sft":
                p_asr = p_over = ""
            else:
                p_asr = _p(stats.mcnemar_exact(asr_of(sft), asr_of(rec))["p_value"])
                p_over = _p(stats.mcnemar_exact(_refused(sft, "benign:heldout"),
                                                _refused(rec, "benign:heldout"))["p_value"])
            delta = row["gsm8k_loss"] - sft_row["gsm8k_loss"]
            lines.append(f"| {scenario} | {name} | {_pct(row['asr_keyword'], row['asr_keyword_ci'])} | {p_asr} | "
                         f"{_pct(row['asr_classifier'], row['asr_classifier_ci'])} | "
                         f"{_pct(row['over_refusal'], row['over_refusal_ci'])} | {p_over} | "
                         f"{row['gsm8k_loss']:.3f} ({delta:+.3f}) | {row['extra_seconds']:+.0f} | "
                         f"{_p(stats.mcnemar_exact(aligned_asr, asr_of(rec))['p_value'])} | "
                         # the share of SFT's loss drop a defense keeps; none when SFT gained nothing
                         + (f"{100 * (a['gsm8k_loss'] - row['gsm8k_loss']) / gain:.0f} %" if gain > 0.01 else "")
                         + " |")
    return "\n".join(lines) + "\n"


def versus_markdown(out: Path, result: dict, name: str) -> str:
    """`name` (a row label, e.g. safe_delta or safe_delta-s0.5) against every other fine-tuned row of each scenario
    that has it, on the same harmful prompts (paired by prompt id; keyword judge): the prompts attacked successfully
    on one model only, each way, and the exact McNemar p."""
    from safetrade.evaluate import stats

    def attacked(scenario: str, label: str) -> dict:
        record = json.loads((out / scenario / "eval" / f"{label}.json").read_text())
        ids = [sample["id"] for sample in record["samples"]["harmful:heldout"]]
        return {i: None if r is None else not r for i, r in zip(ids, _refused(record, "harmful:heldout"))}

    lines = [f"| scenario | other | attacked only on {name} | attacked only on other | p |", "|---|---|---:|---:|---:|"]
    for scenario, sc in result["scenarios"].items():
        labels = [row["label"] for row in sc["rows"]]
        if name not in labels:
            continue
        mine = attacked(scenario, name)
        for other in labels:
            if other == name:
                continue
            theirs = attacked(scenario, other)
            if set(theirs) != set(mine):
                raise SystemExit(f"--versus {name}: {scenario}/{other} was evaluated on other prompts than {name}")
            ids = sorted(mine)
            t = stats.mcnemar_exact([mine[i] for i in ids], [theirs[i] for i in ids])
            lines.append(f"| {scenario} | {other} | {t['n_a_only']} | {t['n_b_only']} | {_p(t['p_value'])} |")
    if len(lines) == 2:
        raise SystemExit(f"--versus {name}: no scenario has a row of that label")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def run_scenario(args, scenario: str, aligned_eval: Path, shared: dict) -> dict:
    from safetrade.evaluate import report

    out = args.out / scenario
    pool_file = write_rows(scenario_rows(scenario, args.pool, args.seed), args.out / "data" / f"{scenario}.jsonl")
    sft = out / "sft"
    results = {"sft": {"run": finetune(args, sft, pool_file), "dir": sft}}
    sft_seconds = results["sft"]["run"]["seconds"]
    for defense in args.defenses:
        knob, default, alt = DEFENSES[defense]
        for value in ([default, alt] if args.alt and alt is not None else [default]):
            name = label(defense, value)
            if name in results:
                continue
            run_dir = out / name
            if defense in POST_HOC:
                extra = post_hoc(args, run_dir, sft, defense, value)["seconds"]
            elif defense == "sqsd_filter":
                scores, score_seconds = sqsd_scores(args, out / "sqsd", pool_file, sft / "adapter",
                                                    shared["danger"] / "adapter", shared["safety"] / "adapter")
                order = sorted(range(len(scores)), key=lambda i: -scores[i] if scores[i] == scores[i] else 0.0)
                k = int(round(value * len(scores)))
                rows = [json.loads(line) for line in pool_file.read_text().splitlines()]
                kept = [rows[i] for i in sorted(order[k:])]
                run = finetune(args, run_dir, write_rows(kept, out / "data" / f"{name}.jsonl"))
                extra = score_seconds + run["seconds"] - sft_seconds
            else:
                run = finetune(args, run_dir, pool_file, defense, value)
                extra = run["seconds"] - sft_seconds
            results[name] = {"dir": run_dir, "extra_seconds": extra, "defense": defense, "knob": knob,
                             "value": value}
    labels = ["aligned", *results]
    paths = [aligned_eval]
    for name, r in results.items():
        system_file = r["dir"] / "inference_system.txt"
        system = system_file.read_text() if system_file.exists() else None
        paths.append(out / "eval" / f"{name}.json")
        evaluate(args, str(r["dir"] / "hf"), paths[-1], system)
    records, _ = report.load_records(paths)
    table = report.markdown_table(records, labels, reference="sft")
    (out / "table.md").write_text(table + "\n")
    rows = []
    for name, record in zip(labels[1:], records[1:]):
        r = results[name]
        rows.append({"label": name, "defense": r.get("defense", "sft"), "knob": r.get("knob"),
                     "value": r.get("value"), "extra_seconds": r.get("extra_seconds", 0.0), **headline(record)})
    aligned = headline(records[0])
    pareto_plot(scenario, rows, aligned, out / "pareto.png")
    print(f"\n## {scenario}\n\n{table}\n", flush=True)
    return {"pool": str(pool_file), "n_rows": len(pool_file.read_text().splitlines()),
            "sft_seconds": sft_seconds, "rows": rows, "aligned": aligned, "table": str(out / "table.md")}


def args_record(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def earlier_scenarios(path: Path, args) -> dict:
    """Scenarios an earlier invocation wrote to the same OUT with the same settings (all but --scenarios), so a study
    split over several runs (`--scenarios harmful`, then `--scenarios benign dirty`) ends with one result.json and
    one summary.md over all of them. Scenarios named now are re-run (from the cache) and replace the earlier ones.
    --versus only adds a table, so it may differ."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    now = args_record(args)
    differ = sorted(k for k in set(now) | set(earlier["args"])
                    if k not in ("scenarios", "versus") and now.get(k) != earlier["args"].get(k))
    kept = {k: v for k, v in earlier["scenarios"].items() if k not in args.scenarios}
    if differ and kept:
        print(f"{path}: dropping earlier scenarios {sorted(kept)}: settings differ ({', '.join(differ)})", flush=True)
        return {}
    return kept


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligned", required=True, help="the aligned model (HF dir)")
    p.add_argument("--unaligned", default="smollm2-135m-instruct",
                   help="the model before alignment, for Safe LoRA and Resta (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--defenses", nargs="+", choices=list(DEFENSES), default=list(DEFENSES))
    p.add_argument("--alt", action="store_true", help="also run each defense's second knob value")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--pool", type=int, default=160, help="rows of the benign and dirty scenarios")
    p.add_argument("--bea-secret", type=int, default=20261202, help="BEA's trigger seed (the provider's secret)")
    p.add_argument("--bea-trigger-tokens", type=int, default=40,
                   help="random tokens in BEA's trigger (official 150: a prompt that long does not fit --max-len 128, "
                        "and rows whose prompt does not fit are dropped)")
    p.add_argument("--n-calibration", type=int, default=64, help="Safe Delta's calibration rows")
    p.add_argument("--safety-steps", type=int, default=10, help="steps of SQSD's safety-direction adapter")
    p.add_argument("--n-harmful", type=int, default=200)
    p.add_argument("--n-benign", type=int, default=100)
    p.add_argument("--gsm8k", type=int, default=20, help="held-out GSM8K questions solved (0 skips)")
    p.add_argument("--gsm8k-tokens", type=int, default=256)
    p.add_argument("--loss-rows", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--margin", action=argparse.BooleanOptionalAction, default=False,
                   help="also the refusal margin per harmful prompt (as long again as judging the replies)")
    p.add_argument("--guard", default=None, help="a guard judge spec, e.g. llama_guard:/models/Llama-Guard-3-1B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--versus", nargs="+", default=[], metavar="LABEL",
                   help="also a paired table of each LABEL (a row label: safe_delta, lisa-rho10.0, ...) against every "
                        "other fine-tuned row, in summary.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    shared = {}
    if "sqsd_filter" in args.defenses:
        from safetrade.demo import _write_refusal_rows

        harmful_file = write_rows(scenario_rows("harmful", args.pool, args.seed), args.out / "data" / "harmful.jsonl")
        shared["danger"] = args.out / "harmful" / "sft"
        finetune(args, shared["danger"], harmful_file)
        shared["safety"] = args.out / "sqsd_safety"
        refusals = _write_refusal_rows(args.out / "data" / "sqsd_safety.jsonl", args.seed)
        finetune(argparse.Namespace(**{**vars(args), "steps": args.safety_steps}), shared["safety"], refusals)
    aligned_eval = args.out / "eval_aligned.json"
    evaluate(args, args.aligned, aligned_eval)
    result = {"args": args_record(args), "scenarios": earlier_scenarios(args.out / "result.json", args)}
    for scenario in args.scenarios:
        result["scenarios"][scenario] = run_scenario(args, scenario, aligned_eval, shared)
        (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (args.out / "summary.md").write_text(summary_markdown(args.out, result))
    if args.versus:
        (args.out / "summary.md").write_text(summary_markdown(args.out, result) + "".join(
            f"\n## {name} against the other defenses (harmful prompts, paired)\n\n"
            + versus_markdown(args.out, result, name) for name in args.versus))
    print(f"wrote {args.out / 'result.json'} and {args.out / 'summary.md'}", flush=True)


if __name__ == "__main__":
    main()
