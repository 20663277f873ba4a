"""``spo ablation SPEC [SPEC ...]``: ablation tables one after another in this process.

No Prefect server is needed and the variants run sequentially, so the wall times in the
efficiency plots are not shared with other variants. ``python -m flows.ablation SPEC`` (or the
``ablation/table`` deployment) runs the same :func:`spo_core.ablation.run_ablation` with the
variants as parallel Prefect tasks on GPU slots instead.

    spo ablation toy_methods                       # Table 2 shape -> reports/toy_methods.md
    spo ablation toy_methods toy_resampler toy_pm toy_k toy_inner_steps toy_kappa toy_pair
    spo ablation toy_k --variant k2 --params params.yaml
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

from .runner import run_entrypoint
from .ablation import available_specs, load_spec, run_ablation

log = logging.getLogger(__name__)


RunTable = Callable[[str, "str | None", "list[str] | None"], object]


def run_here(spec: str, params: str | None, variants: list[str] | None) -> None:
    """One table in this process, its variants one after another."""
    loaded = load_spec(spec)
    if params:
        loaded = loaded.model_copy(update={"params": params})
    run_ablation(loaded, variants=variants)


def main(argv: list[str] | None = None, prog: str = "spo ablation", run_table: RunTable = run_here) -> int:
    """Parse ``SPEC [SPEC ...] [--params P] [--variant V ...]``, validate every spec, then run each
    with ``run_table`` (here by default; ``flows/ablation.py`` passes its Prefect flow)."""
    parser = argparse.ArgumentParser(prog=prog, description="Run ablation tables, one after another.",
                                     epilog=f"packaged specs: {', '.join(available_specs())}")
    parser.add_argument("specs", nargs="+", help="spec names (spo_core/ablations/<name>.yaml) or YAML paths")
    parser.add_argument("--params", help="params file or profile instead of each spec's")
    parser.add_argument("--variant", action="append", dest="variants", help="run only this variant (repeatable)")
    args = parser.parse_args(argv)

    def body() -> int:
        for name in args.specs:  # every spec validated before the first runs
            load_spec(name)
        for name in args.specs:
            t0 = time.perf_counter()
            run_table(name, args.params, args.variants)
            log.info("table %s done in %.1f min", name, (time.perf_counter() - t0) / 60)
        return 0

    return run_entrypoint(body)


if __name__ == "__main__":
    raise SystemExit(main())
