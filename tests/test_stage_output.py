"""flows.stage_output: a stage's output as leveled log records, progress bars rate-limited.

The bar, warning and traceback cases run real tqdm / warnings / Python in a subprocess writing to a
pipe (non-tty, as under ``dvc repro``), so the parser is tested on what a stage really writes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from flows.stage_output import StageOutput, iter_records, progress_env
from spo_core.errors import InputError

INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _clean_env(**extra: str) -> dict[str, str]:
    # The test process imported spo_core, which sets TQDM_MININTERVAL off a terminal: start from none.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    return {**env, **extra}


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:  # a file, so that warnings and tracebacks show source lines
        script = Path(tmp) / "stage.py"
        script.write_text(textwrap.dedent(code))
        return subprocess.run([sys.executable, str(script)], check=False, capture_output=True,
                              env=env or _clean_env(), timeout=60)


def _records(data: bytes, chunk: int = 4096, **kw) -> list[tuple[int, str]]:
    out = StageOutput(clock=FakeClock(), **kw)
    recs = []
    for i in range(0, len(data), chunk):
        recs += out.feed(data[i:i + chunk])
    return recs + out.close()


BAR_1000 = """
    import sys
    from tqdm import tqdm
    for _ in tqdm(range(1000), desc="toy pretrain", file=sys.stderr):
        pass
"""


def test_levels_of_each_kind_of_line():
    out = StageOutput(clock=FakeClock())
    text = ("2026-12-01 17:00:00,123 WARNING spo_core.x: something odd\n"
            "2026-12-01 17:00:00,124 DEBUG spo_core.y: detail\n"
            "2026-12-01 17:00:00,125 ERROR spo_core.z: broke\n"
            "2026-12-01 17:00:00,126 CRITICAL spo_core.z: very broke\n"
            "2026-12-01 17:00:00,127 INFO spo_core.training: round 1/4\n"
            "WARNING: Some of the outputs are not cached\n"
            "ERROR: failed to reproduce 'train_spo': failed to run: python -m spo_core.cli, exited with 1\n"
            "Running stage 'train_spo':\n"
            "\n   \n"
            "> python -m spo_core.cli train\n")
    assert out.feed(text) + out.close() == [
        (WARNING, "spo_core.x: something odd"),
        (logging.DEBUG, "spo_core.y: detail"),
        (ERROR, "spo_core.z: broke"),
        (logging.CRITICAL, "spo_core.z: very broke"),
        (INFO, "spo_core.training: round 1/4"),
        (WARNING, "WARNING: Some of the outputs are not cached"),
        (ERROR, "ERROR: failed to reproduce 'train_spo': failed to run: python -m spo_core.cli, exited with 1"),
        (INFO, "Running stage 'train_spo':"),
        (INFO, "> python -m spo_core.cli train"),
    ]


def test_partial_lines_wait_for_their_end():
    out = StageOutput(clock=FakeClock())
    assert out.feed(b"2026-12-01 17:00:00,123 WARN") == []
    assert out.feed(b"ING spo_core.x: caf\xc3") == []  # a UTF-8 character split between reads
    assert out.feed(b"\xa9\nnext") == [(WARNING, "spo_core.x: caf\u00e9")]
    assert out.close() == [(INFO, "next")]


def test_real_tqdm_through_a_pipe_gives_a_handful_of_records():
    # TQDM_MININTERVAL=0: every one of the 1,000 iterations redraws the bar (the flood to tame).
    proc = _run(BAR_1000, _clean_env(TQDM_MININTERVAL="0", TQDM_MINITERS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(b"\r") >= 1000
    recs = _records(proc.stderr)
    assert [lvl for lvl, _ in recs] == [INFO, INFO]
    assert recs[0][1].startswith("toy pretrain:   0%|") and "0/1000 [" in recs[0][1]
    assert recs[1][1].startswith("toy pretrain: 100%|") and "1000/1000 [" in recs[1][1]


def test_bar_is_logged_once_per_interval_with_a_fake_clock():
    proc = _run(BAR_1000, _clean_env(TQDM_MININTERVAL="0", TQDM_MINITERS="1"))
    data = proc.stderr
    clock = FakeClock()
    out = StageOutput(progress_interval_s=30, clock=clock)
    recs = []
    # 1,001 refreshes spread over 100 s of fake time: one record per 30 s after the first, plus the final.
    for i, piece in enumerate(data.split(b"\r")):
        clock.t = i * 0.1
        recs += out.feed(b"\r" + piece)
    recs += out.close()
    counts = [int(re.search(r" (\d+)/1000 \[", m)[1]) for _, m in recs]
    assert counts == [0, 300, 600, 900, 1000]


def test_bar_without_total_and_closed_bar_log_their_final_state():
    proc = _run("""
        import sys
        from tqdm import tqdm
        for _ in tqdm(iter(range(500)), desc="noisy pairs", unit="pair"):
            pass
        with tqdm(total=100, desc="stopped early") as bar:
            bar.update(40)
    """, _clean_env(TQDM_MININTERVAL="0", TQDM_MINITERS="1"))
    msgs = [m for _, m in _records(proc.stderr, chunk=7)]  # tiny reads: splits everywhere
    assert msgs[0].startswith("noisy pairs: 0pair [")
    assert msgs[1].startswith("noisy pairs: 500pair [")
    assert msgs[2].startswith("stopped early:   0%|") and msgs[3].startswith("stopped early:  40%|")
    assert len(msgs) == 4


def test_status_is_logged_without_waiting_for_the_next_refresh():
    # tqdm writes "\r" + status: a status ends only when the next one starts.
    out = StageOutput(clock=FakeClock())
    assert out.feed("\rtrain_pm aware:  10%|#         | 10/100 [00:01<00:09, 9.9step/s]") == [
        (INFO, "train_pm aware:  10%|#         | 10/100 [00:01<00:09, 9.9step/s]")]
    # a log line written while the bar is shown lands after its status, on the same line
    got = out.feed("\rtrain_pm aware:  10%|#         | 11/100 [00:01<00:09, 9.9step/s]"
                   "2026-12-01 17:00:00,123 WARNING spo_core.preference.train: loss is nan\n")
    assert got == [(WARNING, "spo_core.preference.train: loss is nan")]


def test_warning_from_a_subprocess_is_a_warning():
    proc = _run("""
        import warnings
        warnings.warn("the scheduler has no timesteps attribute")
    """)
    recs = _records(proc.stderr)
    assert recs[0][0] == WARNING and recs[0][1].endswith("UserWarning: the scheduler has no timesteps attribute")
    assert recs[1] == (WARNING, 'warnings.warn("the scheduler has no timesteps attribute")')
    assert len(recs) == 2


def test_traceback_from_a_subprocess_is_one_error_record():
    proc = _run("""
        import logging
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        def stage():
            raise ValueError("boom")
        try:
            stage()
        except ValueError as e:
            raise RuntimeError("stage failed") from e
    """)
    assert proc.returncode == 1
    recs = _records(proc.stderr, chunk=16)
    assert [lvl for lvl, _ in recs] == [ERROR, ERROR, ERROR]
    first, link, second = (m for _, m in recs)
    assert first.startswith("Traceback (most recent call last):\n") and first.endswith("\nValueError: boom")
    assert 'raise ValueError("boom")' in first
    assert link == "The above exception was the direct cause of the following exception:"
    assert second.startswith("Traceback") and second.endswith("RuntimeError: stage failed")


def test_iter_records_reads_a_binary_pipe_and_a_newline_text_pipe(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(BAR_1000) + "import warnings\nwarnings.warn('w')\n")
    cmd = [sys.executable, str(script)]
    env = _clean_env(TQDM_MININTERVAL="0", TQDM_MINITERS="1")
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env) as proc:
        binary = list(iter_records(proc.stderr, StageOutput(clock=FakeClock())))
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env) as proc:
        stream = io.TextIOWrapper(proc.stderr, encoding="utf-8", errors="replace", newline="")
        text = list(iter_records(stream, StageOutput(clock=FakeClock())))
    for recs in (binary, text):
        assert [lvl for lvl, _ in recs] == [INFO, INFO, WARNING, WARNING]
        assert "1000/1000" in recs[1][1] and recs[3][1] == "warnings.warn('w')"


def test_progress_env_makes_tqdm_write_fewer_bytes():
    # 1,000 iterations over ~0.6 s: tqdm's default redraws every 0.1 s.
    code = """
        import sys, time
        from tqdm import tqdm
        for _ in tqdm(range(1000), desc="sampling"):
            time.sleep(0.0006)
    """
    default = _run(code).stderr
    sparse = _run(code, _clean_env(**progress_env(30))).stderr
    assert default.count(b"\r") >= 4  # the first, a few refreshes, the final
    assert sparse.count(b"\r") == 2  # the first and the final
    assert len(sparse) < len(default) / 2
    assert b"1000/1000" in sparse


def test_interval_from_env(monkeypatch):
    monkeypatch.setenv("SPO_PROGRESS_LOG_S", "5")
    assert StageOutput().interval == 5.0
    assert progress_env() == {"TQDM_MININTERVAL": "5", "TQDM_MAXINTERVAL": "5"}
    assert StageOutput(progress_interval_s=2).interval == 2.0
    monkeypatch.setenv("SPO_PROGRESS_LOG_S", "often")
    with pytest.raises(InputError, match="SPO_PROGRESS_LOG_S='often' is not a number of seconds"):
        StageOutput()
