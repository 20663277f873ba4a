"""``python -m flows.variant_process SPEC_JSON VARIANT ROW_JSON [PARENT_RUN_ID]``: one ablation variant
in a fresh process (started by flows/ablation.py under a GPU lease); writes its metrics row to ROW_JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from spo_core.ablation import AblationSpec, run_variant
from spo_core.runner import run_entrypoint
from spo_core.utils import atomic_file


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (3, 4):
        print(__doc__.split(":")[0], file=sys.stderr)
        return 2
    spec_file, variant, row_file = args[:3]
    parent = args[3] if len(args) == 4 and args[3] else None

    def body() -> int:
        spec = AblationSpec.model_validate_json(Path(spec_file).read_text())
        row = run_variant(spec, variant, parent)
        with atomic_file(Path(row_file), "w") as fh:
            json.dump(row, fh, default=float)
        return 0

    return run_entrypoint(body)


if __name__ == "__main__":
    raise SystemExit(main())
