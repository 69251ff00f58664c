"""Write safetrade's own HF export of each tiny golden model to tests/golden/data/roundtrip/<variant>/.

`make golden` then has transformers load these directories (make_golden.py --phase roundtrip) and record its
logits; tests/test_io.py checks that today's exporter still writes exactly these tensors.
Run with the project venv: python -m tests.golden.export_roundtrip
"""

from __future__ import annotations

import shutil

from safetrade.models import io
from tests.conftest import GOLDEN, TINY_VARIANTS


def main() -> None:
    for variant in TINY_VARIANTS:
        cfg, params = io.load_hf(GOLDEN / f"tiny_{variant}")
        out = GOLDEN / "roundtrip" / variant
        shutil.rmtree(out, ignore_errors=True)
        io.save_hf(out, cfg, params)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
