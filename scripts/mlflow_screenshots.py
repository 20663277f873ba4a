"""Screenshots of the MLflow UI for the README, taken in headless Chromium (Debian's `chromium`).

    python scripts/mlflow_screenshots.py                    # after `dvc repro`: uses ./mlruns
    python scripts/mlflow_screenshots.py --ablation tiny_k  # runs that ablation first if it has no runs

Writes ``reports/img/mlflow_ablation_compare.png`` (MLflow's run comparison of an ablation
table's variant runs), ``reports/img/mlflow_samples.png`` (a training run's per-round sample
grid) and ``reports/img/mlflow_chart_sections.png`` (the experiment's chart view: one section of
charts per stage). It starts a temporary MLflow server on 127.0.0.1 (stopped at the end) and needs
Debian's Chromium, driven by Playwright: ``apt-get install chromium`` and
``pip install -e ".[screenshots]"`` (no browser download: Playwright uses /usr/bin/chromium).
Anyone can rerun it; the pictures depend only on the store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait(url: str, seconds: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: the MLflow server did not answer at {url} within {seconds:.0f} s")


def _shot(chromium: str, url: str, out: Path, size: tuple[int, int], full_page: bool = False) -> None:
    """Open ``url`` in headless Chromium (driven by Playwright), switch MLflow to its model-training
    view, close the assistant panel, and save a screenshot."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        page.goto(url, wait_until="load", timeout=60_000)
        page.wait_for_timeout(8000)  # the UI keeps polling: wait for it to render rather than for quiet
        for locator in (page.get_by_text("Model training", exact=True),
                        page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')):
            if locator.count():
                locator.first.click()
                page.wait_for_timeout(1500)
        page.goto(url, wait_until="load", timeout=60_000)  # the page again, in the chosen view
        page.wait_for_timeout(8000)
        page.screenshot(path=str(out), full_page=full_page)
        browser.close()
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlruns", default="mlruns", help="the store folder (holds mlflow.db); default ./mlruns")
    p.add_argument("--experiment", default="spo")
    p.add_argument("--ablation", default="tiny_k", help="ablation table whose variant runs are compared")
    p.add_argument("--out", default=str(ROOT / "reports" / "img"))
    p.add_argument("--port", type=int, default=5055)
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium is not installed. Fix: apt-get install chromium", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("error: playwright is not installed. Fix: pip install playwright", file=sys.stderr)
        return 2
    store = Path(args.mlruns).resolve()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SPO_MLRUNS_DIR": str(store), "SPO_EXPERIMENT": args.experiment}
    env.pop("SPO_DISABLE_MLFLOW", None)
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(args.experiment)

    def variants():
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=(
            f"tags.stage = 'ablation_variant' and tags.ablation = '{args.ablation}' and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"])

    if not variants():
        print(f"no runs of ablation {args.ablation}: running `spo ablation {args.ablation}` first")
        subprocess.run([sys.executable, "-m", "spo_core.cli", "ablation", args.ablation], cwd=ROOT, env=env, check=True)
        exp = client.get_experiment_by_name(args.experiment)
    runs = {r.data.tags["variant"]: r for r in variants()}  # the newest run of each variant
    trained = [r for r in client.search_runs([exp.experiment_id], filter_string="tags.stage = 'train_spo'",
                                             order_by=["attributes.start_time DESC"])
               if any(a.path.startswith("images") for a in client.list_artifacts(r.info.run_id))]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
                               "--backend-store-uri", uri], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{args.port}"
        _wait(f"{base}/health")
        ids = ",".join(f'"{r.info.run_id}"' for r in runs.values())
        _shot(chromium, f"{base}/#/compare-runs?runs=[{ids}]&experiments=[\"{exp.experiment_id}\"]",
              Path(args.out) / "mlflow_ablation_compare.png", (1500, 2200))
        if trained:
            run = trained[0]
            def step(path: str) -> int:  # MLflow names them `<key>+step+<N>+timestamp+...`
                return int(path.split("+step+")[1].split("+")[0])

            images = sorted((a.path for a in client.list_artifacts(run.info.run_id, "images")
                             if a.path.endswith(".png") and "+step+" in a.path), key=step)
            _shot(chromium, f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts/{images[-1]}",
                  Path(args.out) / "mlflow_samples.png", (1500, 800))
        else:
            print("no train_spo run with sample images in this store: run `dvc repro` first", file=sys.stderr)
        _shot(chromium, f"{base}/#/experiments/{exp.experiment_id}/runs?compareRunsMode=CHART",
              Path(args.out) / "mlflow_chart_sections.png", (1500, 1100))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
