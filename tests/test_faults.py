"""Faults and bad input, as a hostile user meets them: one line naming the problem and the fix, the
right exit code (2 bad input, 1 failure), and nothing lost or half-written afterwards.

Each test names the finding it pins (the list in the faults-and-bad-input issue). The DVC findings
run through ``dvc repro`` in tests/test_pipeline_micro.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spo_core.checkpoints import CheckpointStore
from spo_core.config import LoraConfig, ModelConfig, OptimConfig, SamplerConfig, SPOLossConfig, Strict, TrainConfig
from spo_core.data.pickapic import encode_image, write_preference_dataset
from spo_core.methods.spo import SPOMethod
from spo_core.models.diffusion import load_policy
from spo_core.models.lora import attach_lora, save_lora
from spo_core.preference.noisy_pairs import BuildSettings, NoisyPairsError, build_noisy_pairs, open_source, train_plan
from spo_core.scorers.simple import BrightnessScorer
from spo_core.stages import common
from spo_core.stages.common import execute
from spo_core.training import TrainingError, train_rounds
from spo_core.utils import atomic_dir

ROOT = Path(__file__).resolve().parents[1]


def _input_error():
    from spo_core.errors import InputError  # imported here: the module also loads on older code

    return InputError


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("SPO_DISABLE_MLFLOW", "1")
    monkeypatch.delenv("SPO_METRICS_DIR", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class _Cfg(Strict):
    output_dir: str
    value: str = "new"


def _write_stage(cfg: _Cfg) -> dict:
    with atomic_dir(cfg.output_dir) as tmp:
        (tmp / "result.txt").write_text(cfg.value)
    return {"score": 1.0}


# -- 1. divergence is caught before it is checkpointed ------------------------------------------


class _Explodes(SPOMethod):
    """A step that leaves finite but exploded weights in round 1 (as lr=100 did: |w| = 256)."""

    def loss(self, ctx, batch):
        loss, m = super().loss(ctx, batch)
        if ctx.round == 1:
            with torch.no_grad():
                next(p for n, p in ctx.policy.unet.named_parameters() if "lora_A" in n).mul_(1000.0)
        return loss, m


def test_1_exploding_but_finite_weights_are_not_checkpointed(tmp_path):
    policy = load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16))
    sampler = SamplerConfig(num_steps=4, kappa=1000, k=2, threshold=0.0)
    train = TrainConfig(rounds=3, prompts_per_round=2, output_dir=str(tmp_path / "run"), export_kohya=False)
    with pytest.raises(TrainingError, match=r"diverged in round 1 \(largest \|weight\| .* > train.max_lora_weight 20\)"
                                            r".*last good checkpoint is round-000000.*--resume --set optim.lr="):
        train_rounds(policy, _Explodes(sampler, SPOLossConfig(), BrightnessScorer()), ["a cat", "a dog"],
                     LoraConfig(rank=2), OptimConfig(lr=1e-3), train, device="cpu")
    assert [p.name for p in CheckpointStore(tmp_path / "run" / "checkpoints", prefix="round").list()] == ["round-000000"]


# -- 2. a profile switch never empties params.yaml -----------------------------------------------


def test_2_profile_switch_with_a_typo_keeps_params_yaml(tmp_path, capsys):
    from spo_core.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("toy_world: {}\n")
    assert main(["params", "mcro", "-o", str(params)]) == 2
    assert "unknown profile 'mcro'" in _one_line(capsys.readouterr().err)
    assert params.read_text() == "toy_world: {}\n"
    assert main(["params", "micro", "-o", str(params)]) == 0
    assert "toy_world:" in params.read_text() and "train_spo:" in params.read_text()


# -- 3. runs that would train nothing or the wrong thing fail ----------------------------------


def test_3_no_scorer_and_a_nan_lora_fail_with_exit_2(tmp_path, capsys, make_policy, perturb_lora):
    from spo_core.stages import generate, train_spo

    assert train_spo.main(["--params", "tiny", "--set", "scorer=null"]) == 2
    assert "scorer" in capsys.readouterr().err
    policy = make_policy("sd15")
    cfg = LoraConfig(rank=2)
    attach_lora(policy, cfg)
    perturb_lora(policy)
    with torch.no_grad():
        next(p for n, p in policy.unet.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    lora = save_lora(policy, tmp_path / "nan_lora", cfg)
    out = tmp_path / "images"
    assert generate.main(["--model", "tiny:sd15", "--resolution", "16", "--steps", "2", "--prompt", "a cat",
                          "--lora", str(lora), "--out", str(out)]) == 2
    assert "NaN/inf values" in _one_line(capsys.readouterr().err)
    assert not out.exists()  # no empty output folder, no black images


# -- 4. outputs, metrics and the MLflow record are committed together -----------------------------


def test_4_a_late_failure_keeps_the_previous_outputs_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "metrics"))
    cfg = _Cfg(output_dir=str(tmp_path / "out"), value="old")
    execute("demo", cfg, _write_stage)
    old_metrics = (tmp_path / "metrics/demo.json").read_text()

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(common.tracking, "log_metrics", locked)
    with pytest.raises(sqlite3.OperationalError):
        execute("demo", _Cfg(output_dir=str(tmp_path / "out"), value="new"), _write_stage)
    assert (tmp_path / "out/result.txt").read_text() == "old"
    assert (tmp_path / "metrics/demo.json").read_text() == old_metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "metrics", "out"]  # no temporaries left

    monkeypatch.setattr(common, "write_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    monkeypatch.setattr(common.tracking, "log_metrics", lambda *a, **k: None)
    with pytest.raises(OSError):
        execute("demo", _Cfg(output_dir=str(tmp_path / "out"), value="new"), _write_stage)
    assert (tmp_path / "out/result.txt").read_text() == "old"


# -- 5. resumable data is fingerprinted by content; the failing row and file are named ------------


def _bmp_pairs(n: int = 6) -> pd.DataFrame:
    # BMP: the same image size always has the same byte length, so only a content hash sees a change.
    rng = np.random.default_rng(0)
    return pd.DataFrame([dict(caption=f"shape {i}", label_0=1.0, label_1=0.0,
                              jpg_0=encode_image(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), format="BMP"),
                              jpg_1=encode_image(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), format="BMP"))
                         for i in range(n)])


def _indexed(path):
    src = open_source(str(path))
    return src, src.index(digest=True).frame


def test_5_noisy_pairs_see_changed_images_of_equal_length_and_name_a_bad_row(tmp_path):
    policy = load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16))
    settings = BuildSettings(image_size=16, batch_size=3, shard_size=3, seed=0)
    frame = _bmp_pairs()
    src = tmp_path / "pairs.parquet"
    write_preference_dataset(frame, src)
    out = tmp_path / "noisy"
    build_noisy_pairs(policy, *_indexed(src), out, train_plan(len(frame)), settings)
    shards = {p.name: p.read_bytes() for p in out.glob("shard-*")}

    changed = frame.copy()
    img = bytearray(changed.at[4, "jpg_0"])
    img[-1] ^= 0xFF  # one pixel value: same length, other content
    changed.at[4, "jpg_0"] = bytes(img)
    write_preference_dataset(changed, src)
    with pytest.raises(NoisyPairsError, match=r"built from other data: rows 0-5 differ\. Fix: if the data change is intended"):
        build_noisy_pairs(policy, *_indexed(src), out, train_plan(len(frame)), settings)

    broken = frame.copy()
    broken.at[2, "jpg_1"] = b"\x00" * len(frame.at[2, "jpg_1"])  # undecodable, same length
    write_preference_dataset(broken, src)
    with pytest.raises(NoisyPairsError, match=rf"jpg_1 of file {src}, row 2 does not decode"):
        build_noisy_pairs(policy, *_indexed(src), out, train_plan(len(frame)), settings)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == shards  # good data kept

    # A fresh build skips the undecodable row and counts it (a bad row never stops a long stage).
    fresh = tmp_path / "fresh"
    stats = build_noisy_pairs(policy, *_indexed(src), fresh, train_plan(len(frame)), settings)
    assert (stats.pairs_total, stats.pairs_stored, stats.pairs_skipped) == (6, 5, 1)
    skipped = json.loads((fresh / "shard-00000.json").read_text())["skipped"]
    assert [(e["entry"], e["origin"]) for e in skipped] == [(2, f"file {src}, row 2")]
    assert "cannot decode image bytes" in skipped[0]["reason"]


# -- 6. one runner: one line and an exit code for every documented error and infrastructure fault -


def test_6_stage_entry_points_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from spo_core.stages import evaluate, prompts, train_spo

    monkeypatch.chdir(tmp_path)
    assert prompts.main(["--params", str(ROOT / "spo_core/profiles/micro.yaml"), "--set", "train.path=missing.txt"]) == 2
    assert "prompt file 'missing.txt': the file does not exist. Fix:" in _one_line(capsys.readouterr().err)
    assert train_spo.main(["--params", "tiny", "--set", "model.pretrained=/nowhere/sd15"]) == 2
    assert "model path '/nowhere/sd15' does not exist" in _one_line(capsys.readouterr().err)
    assert evaluate.main(["--params", str(ROOT / "spo_core/profiles/micro.yaml"), "--set", "loras.spo=nowhere"]) == 2
    assert "LoRA 'spo' not found at 'nowhere'" in _one_line(capsys.readouterr().err)
    assert train_spo.main(["--params", "tiny", "--set", "prompts.path=["]) == 2
    assert "not valid YAML" in _one_line(capsys.readouterr().err)


def test_6_infrastructure_faults_are_named_with_their_fix(tmp_path):
    from spo_core.runner import describe_fault, run_entrypoint

    full = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    assert "the disk is full" in describe_fault(full) and "--resume" in describe_fault(full)
    assert "the disk is full while writing /x/y" in describe_fault(OSError(errno.ENOSPC, "No space left on device", "/x/y"))
    ro = describe_fault(PermissionError(errno.EACCES, "Permission denied", "/ro/metrics.json"))
    assert "cannot write /ro/metrics.json" in ro
    assert describe_fault(ValueError("a bug")) is None  # real bugs keep their traceback
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as exc:
        assert "tracking database" in describe_fault(exc) and "SPO_DISABLE_MLFLOW=1" in describe_fault(exc)

    def boom():
        raise full

    assert run_entrypoint(boom) == 1


def _stage_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_core.stages.prompts", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_6_a_corrupt_or_unreachable_tracking_store_gives_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SPO_DISABLE_MLFLOW", "SPO_METRICS_DIR")}
    env.update(SPO_LOG_LEVEL="ERROR", PYTHONPATH=str(ROOT))  # this checkout's code, from any working directory
    args = ["--params", str(ROOT / "spo_core/profiles/micro.yaml"), "--set", "train.source=list",
            "--set", "train.prompts=[a cat, a dog]", "--set", "train.path=null", "--set", "eval.source=list",
            "--set", "eval.prompts=[a cow, a hen]", "--set", "eval.path=null", "--set", f"output_dir={tmp_path / 'p'}"]
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database" * 100)
    res = _stage_cli(args, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, tmp_path)
    assert res.returncode == 1, res.stderr
    assert "is unreadable (corrupt" in res.stderr and "Traceback" not in res.stderr
    res = _stage_cli(args, {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, tmp_path)
    assert res.returncode == 1, res.stderr
    assert "tracking server http://127.0.0.1:9 is unreachable" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "p").exists()


# -- 7. inputs are checked before compute starts --------------------------------------------------


def test_7_an_unwritable_output_folder_fails_before_any_compute(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    called = []
    with pytest.raises(_input_error(), match=r"output folder '.*a_file(/\w+)?' is not writable \(Not a directory\)"):
        execute("demo", _Cfg(output_dir=str(blocker / "out")), lambda cfg: called.append(1) or {})
    assert called == []


def test_7_a_lora_of_another_model_fails_before_the_base_is_evaluated(tmp_path, make_policy, monkeypatch):
    from spo_core import evaluation

    xl = make_policy("sdxl")
    cfg = LoraConfig(rank=2)
    attach_lora(xl, cfg)
    lora = save_lora(xl, tmp_path / "xl_lora", cfg)
    generated = []
    real = evaluation.iter_images
    monkeypatch.setattr(evaluation, "iter_images", lambda *a, **k: generated.append(1) or real(*a, **k))
    with pytest.raises(Exception, match="does not fit this sd15 UNet"):
        evaluation.evaluate_models(make_policy("sd15"), evaluation.model_specs({"xl": str(lora)}), ["a", "b"],
                                   {"brightness": BrightnessScorer()}, sampler=evaluation.EvalSamplerConfig(num_steps=2))
    assert generated == []


# -- 8. only the pipeline writes the pipeline's metrics; one run per output folder ----------------


def test_8_ad_hoc_runs_write_metrics_beside_their_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/demo.json").write_text('{"tracked": 1}\n')
    execute("demo", _Cfg(output_dir="runs/out"), _write_stage)
    assert (tmp_path / "metrics/demo.json").read_text() == '{"tracked": 1}\n'
    assert json.loads((tmp_path / "runs/metrics/demo.json").read_text())["score"] == 1.0
    monkeypatch.setenv("DVC_STAGE", "demo")  # what `dvc repro` sets for a stage's command
    execute("demo", _Cfg(output_dir="runs/out"), _write_stage)
    assert json.loads((tmp_path / "metrics/demo.json").read_text())["score"] == 1.0


def test_8_a_second_run_into_the_same_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"

    def nested(cfg):
        with pytest.raises(_input_error(), match=rf"output folder '{out}' is in use by another run \(pid {os.getpid()}"):
            execute("demo", _Cfg(output_dir=str(out)), _write_stage)
        return _write_stage(cfg)

    execute("demo", _Cfg(output_dir=str(out)), nested)
    assert (out / "result.txt").read_text() == "new"


# -- 9. the smaller ones ---------------------------------------------------------------------------


def test_9_prompt_files_with_nul_bytes_and_overlong_lines(tmp_path, caplog):
    from spo_core.data.prompts import PromptFileError, load_prompts

    f = tmp_path / "p.txt"
    f.write_bytes(b"\x00\x00\x00\na red cube\n\x00\n")
    assert load_prompts("text", path=str(f)) == ["a red cube"]
    f.write_bytes(b"\x00\x00\n\x00\n")
    with pytest.raises(PromptFileError):
        load_prompts("text", path=str(f))
    f.write_text("a cat\n" + "word " * 2000 + "\n")
    with caplog.at_level(logging.WARNING):
        assert len(load_prompts("text", path=str(f))) == 2
    assert "1 prompt(s) have more than 1000 characters (the first: prompt 1" in caplog.text


def test_9_config_values_booleans_and_binary_files(tmp_path):
    from spo_core.config import ConfigError, load_spo_config, read_profile

    with pytest.raises(ConfigError, match="train.rounds: .*a number is needed, not true/false"):
        load_spo_config("tiny", ["train.rounds=true"])
    with pytest.raises(ConfigError, match="optim.lr: Input should be a finite number"):
        load_spo_config("tiny", ["optim.lr=.inf"])
    assert load_spo_config("tiny", ["train.resume=true"]).train.resume is True
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="is not a text file"):
        read_profile(binary)


def test_9_killed_runs_leave_no_temporaries_and_no_running_mlflow_run(tmp_path, monkeypatch):
    # A killed process leaves `.out.tmp-<pid>-*`; the next write removes it (its pid is gone).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}-live").mkdir()  # ours: still running, kept
    with atomic_dir(tmp_path / "out") as d:
        (d / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{os.getpid()}-live", "out"]

    import mlflow

    from spo_core import tracking

    monkeypatch.delenv("SPO_DISABLE_MLFLOW")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(tmp_path / "mlruns"))
    tracking.setup_mlflow()
    orphan = mlflow.start_run(run_name="demo", tags={"stage": "demo", "host": __import__("socket").gethostname(),
                                                     "pid": dead})
    mlflow.end_run(status="RUNNING")  # what SIGKILL leaves: never ended
    with tracking.stage_run("demo"):
        pass
    assert mlflow.get_run(orphan.info.run_id).info.status == "KILLED"
    mlflow.set_tracking_uri(None)


def test_9_metrics_json_has_no_bare_nan_and_weights_are_world_readable(tmp_path, monkeypatch, make_policy):
    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "m"))
    execute("demo", _Cfg(output_dir=str(tmp_path / "o")), lambda cfg: {"final_loss": float("nan"), "n": 1})
    text = (tmp_path / "m/demo.json").read_text()
    assert "NaN" not in text and json.loads(text)["final_loss"] is None
    policy = make_policy("sd15")
    attach_lora(policy, LoraConfig(rank=2))
    old = os.umask(0o022)
    try:
        out = save_lora(policy, tmp_path / "lora", LoraConfig(rank=2))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_6_the_prefect_server_down_points_at_services_sh(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "flows.spo", "--target", "prompts", "--repo", str(ROOT)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "the Prefect server (http://127.0.0.1:9/api) is unreachable" in _one_line(res.stderr)
    assert "scripts/services.sh start" in res.stderr


def test_loading_a_model_prints_no_empty_float32_warning():
    # A handler on diffusers' own logger sees what would reach the terminal (pytest's capture does not:
    # diffusers binds its stream handler to the stderr of the moment it was imported).
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    source = logging.getLogger("diffusers.models.modeling_utils")
    source.addHandler(handler)
    try:
        load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16, dtype="bfloat16"))
    finally:
        source.removeHandler(handler)
    assert not [m for m in seen if "should be kept in float32: []" in m]


def test_sigterm_stops_cleanly_with_exit_130(tmp_path):
    # A stage stopped by SIGTERM (a scheduler's preemption, Prefect's cancel) unwinds like Ctrl-C: the
    # transaction discards the unfinished outputs and the MLflow run ends KILLED; exit status 130.
    code = ("import sys, time\n"
            "from spo_core.runner import run_entrypoint\n"
            "def body():\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(120)\n"
            "sys.exit(run_entrypoint(body))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted: stopped by signal SIGTERM" in _one_line(err)
