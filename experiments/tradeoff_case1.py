"""Case I sweep: fine-tune the aligned model with the penalty L_f + λ·L_proxy over λ × proxy sets, then check the
project's penalty bound and the λ / proxy-similarity trends on the results (theory/real.py).

    python experiments/tradeoff_case1.py --aligned runs/align/hf --out runs/tradeoff_case1
    python experiments/tradeoff_case1.py --aligned runs/align/hf --out runs/tradeoff_case1 steps=40 --lams 0.5 2

Runs (experiments/configs/finetune.yaml: the harmful Q+A attack set as fine-tuning data, strategy case1_penalty,
plus the short-run overrides of tradeoff_runs.SHORT_RUN) go to OUT/<proxy>/lam<λ>; a run whose hf/ exists is
reused, so the script resumes after an interruption. Proxy sets (--proxies):
  proxy          the project's proxy: held-out AdvBench prompts with the same templated refusals as the alignment
                 set (close to the original safety data);
  pyrit_refusal  refusal-labelled replies of other chat models from pyrit, prompts in the alignment set removed,
                 written to OUT/data/pyrit_refusals.jsonl (a different writer: further from the original data).
Any other value is passed as data.proxy (a built set, registry name or file).
Then `safetrade theory` on every run: OUT/theory/{result.json,bounds.md,bounds.png,case1_trends.png}.
At power (the λ grid 0.1-30, two training seeds, every run trained until its held-out penalised objective is below
the aligned model's, as the penalty bound assumes):
    python experiments/tradeoff_case1.py --aligned runs/align/hf --out runs/case1_power \
        --lams 0.1 0.3 1 3 10 30 --seeds 0 1 --until-descent 160 steps=10 --theory n_rows=16
Trailing KEY=VALUE overrides go to every fine-tune; --theory KEY=VALUE (repeatable) to the check.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tradeoff_runs  # noqa: E402

DEFAULT_LAMS = (0.25, 1.0, 4.0, 16.0)
DEFAULT_PROXIES = ("proxy", "pyrit_refusal")


def proxy_source(name: str, out: Path, align_config: str) -> str:
    if name != "pyrit_refusal":
        return name
    from safetrade import config

    align_data = config.load(config.TrainJob, align_config).data
    return str(tradeoff_runs.write_pyrit_refusal_proxy(out / "data" / "pyrit_refusals.jsonl", align_data))


def main(argv=None) -> int:
    p = tradeoff_runs.sweep_parser(__doc__.split("\n")[0])
    p.add_argument("--lams", type=float, nargs="+", default=list(DEFAULT_LAMS), help="penalty weights λ")
    p.add_argument("--proxies", nargs="+", default=list(DEFAULT_PROXIES), help="proxy safety sets (see above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds (data.seed: batch order and which fine-tuning / proxy rows are held out; full "
                        "fine-tuning has no other randomness; L_s is always measured on the alignment run's held-out "
                        "rows); each (proxy, λ) runs once per seed, the first at OUT/<proxy>/lam<λ>, others at "
                        "lam<λ>-seed<s>")
    p.add_argument("--until-descent", type=int, default=0, metavar="MAX_STEPS",
                   help="double a run's steps (resuming) until its held-out L_f + λ·L_proxy is below the aligned "
                        "model's, up to MAX_STEPS (0: train the given steps once); history in <run>/descent.json")
    args = p.parse_intermixed_args(argv)  # overrides may sit before or after options
    align_config = args.align_config or str(Path(args.aligned).parent / "config.yaml")

    runs = []
    for proxy in args.proxies:
        source = proxy_source(proxy, args.out, align_config)
        for lam in args.lams:
            for seed in args.seeds:
                name = f"lam{lam:g}" if seed == args.seeds[0] else f"lam{lam:g}-seed{seed}"
                overrides = ["strategy.name=case1_penalty", f"strategy.lam={lam}", f"data.proxy={source}",
                             *([f"data.seed={seed}"] if seed != 0 else []), *args.overrides]
                run_dir = args.out / Path(proxy).stem / name
                if args.until_descent:
                    runs.append(tradeoff_runs.launch_until_descent(args.aligned, run_dir, args.config, overrides,
                                                                   args.until_descent))
                else:
                    runs.append(tradeoff_runs.launch(args.aligned, run_dir, args.config, overrides))
    if not args.no_check:
        tradeoff_runs.check(args.aligned, runs, args.out, [f"align_config={align_config}", *args.theory])
    return 0


if __name__ == "__main__":
    sys.exit(main())
