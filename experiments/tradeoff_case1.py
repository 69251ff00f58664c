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
    args = p.parse_intermixed_args(argv)  # overrides may sit before or after options
    align_config = args.align_config or str(Path(args.aligned).parent / "config.yaml")

    runs = []
    for proxy in args.proxies:
        source = proxy_source(proxy, args.out, align_config)
        for lam in args.lams:
            run_dir = args.out / Path(proxy).stem / f"lam{lam:g}"
            runs.append(tradeoff_runs.launch(args.aligned, run_dir, args.config,
                                             ["strategy.name=case1_penalty", f"strategy.lam={lam}",
                                              f"data.proxy={source}", *args.overrides]))
    if not args.no_check:
        tradeoff_runs.check(args.aligned, runs, args.out, [f"align_config={align_config}", *args.theory])
    return 0


if __name__ == "__main__":
    sys.exit(main())
