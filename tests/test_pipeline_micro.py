"""The whole pipeline, end to end, at micro sizes: `dvc repro` in a fresh copy of the repository with
the `micro` profile as params.yaml (toy world -> base -> preferences -> toy PickScore -> prompts ->
noisy pairs -> preference models -> SPO -> evaluation), tracked in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml


def _sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.slow
def test_dvc_repro_micro_pipeline(tmp_path: Path, copy_checkout):
    repo = copy_checkout(tmp_path / "repo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "SPO_MLRUNS_DIR": str(tmp_path / "mlruns"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("SPO_DISABLE_MLFLOW", None)
    _sh(["python", "-m", "spo_core.cli", "params", "micro", "-o", "params.yaml"], repo, env)
    _sh(["git", "init", "-q"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "micro"], repo, env)
    _sh(["dvc", "pull", "-q", "data.dvc"], repo, env)
    assert (repo / "data/prompts/spo_4k_training_prompts.json").exists()
    _sh(["dvc", "repro"], repo, env)

    stages = ["toy_world", "toy_pretrain", "toy_prefs", "toy_pickscore", "prompts", "noisy_pairs", "train_pm",
              "train_spo", "evaluate_base", "evaluate"]
    for s in stages:
        m = json.loads((repo / "metrics" / f"{s}.json").read_text())
        assert m["wall_time_s"] > 0, s
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    for key in ("base/toy_reward/mean", "spo/toy_reward/mean", "spo/toy_reward/winrate_vs_base", "spo/toy_reward/diff_ci_low"):
        assert key in ev
    assert (repo / "artifacts/spo/lora/pytorch_lora_weights.safetensors").exists()
    history = json.loads((repo / "artifacts/spo/history.json").read_text())
    assert sum(h["optimizer_steps"] for h in history) > 0  # SPO really trained
    assert (repo / "artifacts/evaluate/table.md").read_text().startswith("#")
    monitored = json.loads((repo / "metrics/train_spo_monitor.json").read_text())
    assert monitored[0]["round"] == -1 and all("monitor_toy_reward" in m for m in monitored)
    assert "stages:" not in (repo / "dvc.lock").read_text() or "train_spo" in (repo / "dvc.lock").read_text()
    # DVC draws every training curve (rows of a plot file share their keys), one definition per figure.
    plots = json.loads(_sh(["dvc", "plots", "show", "--json"], repo, env))
    assert not plots.get("errors"), plots.get("errors")
    assert set(plots["data"]) == {"train_spo_loss", "train_spo_preference", "train_spo_keep_fraction", "train_spo_monitor"}
    assert all(plots["data"].values())
    # `dvc metrics show` prints headline metrics; the details sit in each output's metrics.json.
    assert len(json.loads((repo / "metrics/evaluate.json").read_text())) < 10
    assert "spo/toy_reward/ci_low" in json.loads((repo / "artifacts/evaluate/metrics.json").read_text())
    shown = _sh(["dvc", "metrics", "show"], repo, env).splitlines()
    assert max(map(len, shown)) < 900, max(map(len, shown))  # was 2,290 characters wide (181 columns before)
    # Nothing to do on a second repro: every stage is cached.
    out = _sh(["dvc", "status"], repo, env)
    assert "changed" not in out
    # dvc.yaml's params list only keys that change results: DVC itself ignores operational ones.
    clean = (repo / "params.yaml").read_text()
    edited = yaml.safe_load(clean)
    edited["train_spo"]["device"] = "cuda"
    edited["train_spo"]["train"]["checkpoint_every"] = 7
    edited["train_pm"]["log_every"] = 3
    edited["toy_pretrain"]["num_threads"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    assert "changed" not in _sh(["dvc", "status"], repo, env)
    edited["toy_pretrain"]["lr"] = 0.001
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    out = _sh(["dvc", "status", "toy_pretrain"], repo, env)
    assert "modified:           toy_pretrain.lr" in out, out
    (repo / "params.yaml").write_text(clean)
    # A variant as a DVC experiment: only the stages whose params changed (and what follows) rerun.
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "micro results"], repo, env)  # the workspace run, as a user commits it
    checkpoints = {p.relative_to(repo): p.read_bytes() for p in (repo / "artifacts/spo/checkpoints").rglob("*") if p.is_file()}
    assert checkpoints
    out = _sh(["dvc", "exp", "run", "-S", "train_spo.sampler.k=3", "-n", "k3"], repo, env)
    assert "Running stage 'train_spo'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'toy_pretrain'" not in out
    # The unchanged base model is neither regenerated nor rescored: evaluate reuses evaluate_base's results.
    assert "Running stage 'evaluate_base'" not in out
    assert json.loads((repo / "artifacts/evaluate/metrics.json").read_text())["base_reused"] == 1
    # The experiment replaced the workspace run's LoRA and checkpoints; DVC's cache still has them.
    _sh(["git", "checkout", "--", "params.yaml", "dvc.lock"], repo, env)
    _sh(["dvc", "checkout", "artifacts/spo"], repo, env)
    assert {p.relative_to(repo): p.read_bytes() for p in (repo / "artifacts/spo/checkpoints").rglob("*") if p.is_file()} == checkpoints
    assert "k3" in _sh(["dvc", "exp", "show", "--csv"], repo, env)
    # toy_pretrain resumes by default from checkpoints outside DVC's outputs; a changed configuration
    # starts fresh in a checkpoint folder of its own (it used to refuse the old run's checkpoints and
    # fail), and the old configuration's checkpoints are removed once it completes.
    out = _sh(["dvc", "exp", "run", "-S", "toy_pretrain.lr=0.001", "-n", "lr1e-3", "toy_pretrain"], repo, env)
    assert "Running stage 'toy_pretrain'" in out and "Running stage 'toy_prefs'" not in out
    details = json.loads((repo / "artifacts/toy/base/metrics.json").read_text())
    assert details["resumed_from_step"] == 0 and details["steps_run"] == 20
    assert len(list((repo / "artifacts/toy/checkpoints/base").iterdir())) == 1

    # A stage that fails under DVC keeps its previous outputs and metrics (DVC used to delete them
    # before running it), and says why in one line.
    kept = {p: (repo / p).read_bytes() for p in ("artifacts/prompts/train.txt", "metrics/prompts.json")}
    good = (repo / "params.yaml").read_text()
    broken = yaml.safe_load(good)
    broken["prompts"]["train"]["path"] = "data/missing.txt"
    (repo / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    res = subprocess.run(["dvc", "repro", "prompts"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "error: prompt file 'data/missing.txt': the file does not exist. Fix:" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr + res.stdout
    assert {p: (repo / p).read_bytes() for p in kept} == kept
    # A profile switch with a typo leaves params.yaml as it was.
    (repo / "params.yaml").write_text(good)
    res = subprocess.run(["python", "-m", "spo_core.cli", "params", "mcro", "-o", "params.yaml"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown profile 'mcro'" in res.stderr
    assert (repo / "params.yaml").read_text() == good

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["spo"])
    assert set(stages) <= set(runs["tags.stage"])
    unfinished = runs[runs["status"] != "FINISHED"]  # only the broken prompts run above, recorded as failed
    assert list(unfinished["tags.stage"]) == ["prompts"] and list(unfinished["status"]) == ["FAILED"]
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_dvc_repro_micro_flow_pipeline(tmp_path: Path, copy_checkout):
    # The flow toy world end to end: an SD3-architecture base pretrained with the rectified-flow
    # objective, noisy pairs from the flow forward process, SPO on the flow SDE, evaluation; then
    # Flow-GRPO on the same world (`spo train-grpo`, not a DVC stage).
    repo = copy_checkout(tmp_path / "repo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SPO_DISABLE_MLFLOW": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _sh(["python", "-m", "spo_core.cli", "params", "micro_flow", "-o", "params.yaml"], repo, env)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "micro_flow"],
                ["dvc", "pull", "-q", "data.dvc"], ["dvc", "repro"]):
        _sh(cmd, repo, env)

    index = json.loads((repo / "artifacts/toy/base/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["spo_max_sequence_length"] == 1
    base = json.loads((repo / "metrics/toy_pretrain.json").read_text())
    assert "transformer_parameters" in json.loads((repo / "artifacts/toy/base/metrics.json").read_text())
    assert base["final_loss"] > 0
    history = json.loads((repo / "artifacts/spo/history.json").read_text())
    assert sum(h["optimizer_steps"] for h in history) > 0  # SPO really trained on the flow process
    ev = json.loads((repo / "artifacts/evaluate/metrics.json").read_text())
    assert ev["spo/toy_reward/mean"] != ev["base/toy_reward/mean"]  # the LoRA changed the samples
    assert "changed" not in _sh(["dvc", "status"], repo, env)

    _sh(["python", "-m", "spo_core.cli", "train-grpo"], repo, env)
    grpo = json.loads((repo / "artifacts/grpo/history.json").read_text())
    assert sum(h["optimizer_steps"] for h in grpo) > 0
    assert (repo / "artifacts/grpo/lora/pytorch_lora_weights.safetensors").exists()
