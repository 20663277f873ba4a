"""Serve the pipeline's flows to the local Prefect server (a long-running process).

    python flows/serve.py        # started by `bash scripts/services.sh start`

Deployments: ``spo/full`` (the whole DVC pipeline; parameters target, force, params),
``stage/single`` (one stage: ``-p stage=train_spo``) and ``ablation/table`` (``-p spec=k``).
Flow runs execute in subprocesses of this process with the repository root as working directory.
This process keeps the code it loaded: restart it after editing flows (`services.sh stop/start`);
a process work pool + ``prefect worker start`` reloads code per run and is the way to GPU hosts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python flows/serve.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from prefect import serve

from flows.ablation import ablation, variant
from flows.spo import spo, stage
from spo_core.runner import run_entrypoint


def main() -> int:
    return run_entrypoint(_serve)


def _serve() -> None:
    os.chdir(ROOT)  # entrypoints (flows/spo.py:spo) and the default repository root are relative to it
    os.environ.setdefault("SPO_REPO_ROOT", str(ROOT))
    serve(
        spo.to_deployment(name="full", description="The DVC pipeline stage by stage (dvc repro --single-item)."),
        stage.to_deployment(name="single", description="One DVC stage: -p stage=NAME."),
        ablation.to_deployment(name="table", description="An ablation table: -p spec=NAME."),
        variant.to_deployment(name="variant", description="One ablation variant (ablation/table with dispatch=pool)."),
    )


if __name__ == "__main__":
    raise SystemExit(main())
