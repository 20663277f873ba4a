"""A stage subprocess' output as log records: each line at its own level, progress bars sparse.

``dvc repro`` passes the stage's stdout/stderr through unchanged, so what reaches the flow is a mix of
the stage's ``logging`` lines (:data:`spo_core.runner.LOG_FORMAT`), DVC's own ``WARNING:``/``ERROR:``
lines, Python warnings and tracebacks, and tqdm progress bars, which redraw one terminal line by
writing ``'\\r' + status`` on every refresh. :class:`StageOutput` turns that text into
``(level, message)`` pairs; :func:`iter_records` wraps a subprocess stream.

The caller must keep the ``'\\r'`` of the bars: open the pipes in binary (``Popen(..., text=False)``,
the default) and hand the stream to :func:`iter_records`, or wrap it as text with ``newline=''``
(``io.TextIOWrapper(proc.stderr, encoding="utf-8", newline="")``). Text mode
with universal newlines (``text=True``) turns every refresh into a line of its own, and a bar can no
longer be told from a line that happens to look like one.

:func:`progress_env` is the environment for the stage process that makes tqdm write fewer refreshes
in the first place (tqdm reads ``TQDM_*`` variables as defaults of its arguments when it is imported).
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from spo_core.errors import InputError

DEFAULT_PROGRESS_INTERVAL_S = 30.0
PROGRESS_ENV = "SPO_PROGRESS_LOG_S"

Record = tuple[int, str]

# ``%(asctime)s %(levelname)s %(name)s: %(message)s`` (spo_core.runner.LOG_FORMAT)
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+: .*)")
_DVC_LINE = re.compile(r"(WARNING|ERROR): ")
# warnings.formatwarning: "path:lineno: Category: message", then the source line, indented
_WARNING_LINE = re.compile(r"\S.*:\d+: \w*Warning: ")
_TRACEBACK_START = ("Traceback (most recent call last):", "Exception Group Traceback (most recent call last):")
# Lines between the tracebacks of a chained exception.
_TRACEBACK_LINKS = ("The above exception was the direct cause of the following exception:",
                    "During handling of the above exception, another exception occurred:")
# tqdm's default format: "desc:  42%|####      | 42/100 [00:01<00:02, 41.0it/s, loss=1]" or, without a
# total, "desc: 42it [00:01, 41.0it/s]". The bracket must hold a clock time ([h:]mm:ss) first.
_NUM = r"\d+(?:\.\d+)?[kMGTPEZY]?"
_PROGRESS = re.compile(
    r"\s*(?:(?P<desc>.*?): )?"
    r"(?:\s*(?P<pct>\d{1,3})%\|[^|]*\| )?"
    rf"(?P<n>{_NUM})(?:/(?P<total>{_NUM}))?[^\s\[\]|]*"
    r" \[(?:\d+:)?\d\d:\d\d(?:<[^\],]*)?(?:, [^\]]*)?\]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # tqdm moves the cursor (ESC[A) for nested bars
_SEGMENT = re.compile(r"([^\r\n]*)(\r\n|\r|\n)")


def progress_interval_from_env(default: float = DEFAULT_PROGRESS_INTERVAL_S) -> float:
    raw = os.environ.get(PROGRESS_ENV)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise InputError(f"{PROGRESS_ENV}={raw!r} is not a number of seconds: set it to e.g. 30 (0 logs every refresh)")
    return value


def progress_env(interval_s: float | None = None) -> dict[str, str]:
    """Environment for a stage process: its tqdm bars redraw at most every ``interval_s`` seconds.

    ``maxinterval`` goes with it, else tqdm's monitor thread forces a redraw every 10 s anyway.
    The variables take effect when the stage imports tqdm (they are tqdm's argument defaults).
    """
    s = progress_interval_from_env() if interval_s is None else float(interval_s)
    value = f"{s:g}"
    return {"TQDM_MININTERVAL": value, "TQDM_MAXINTERVAL": value}


@dataclass
class _Bar:
    last_emit_t: float
    last_text: str
    emitted_text: str
    done: bool = False


@dataclass
class _Stream:
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    buffer: str = ""
    live: str | None = None  # the bar whose status line this stream shows now
    traceback: list[str] | None = None
    after_warning: bool = False


def _is_final(m: re.Match) -> bool:
    return m["total"] is not None and m["n"] == m["total"]


class StageOutput:
    """Log records of one stage subprocess, fed its stdout and stderr chunk by chunk.

    * ``<asctime> LEVEL name: message`` (the stage's logging) -> LEVEL, ``"name: message"``;
    * DVC's ``WARNING: ...`` / ``ERROR: ...`` -> WARNING / ERROR;
    * a Python warning (``file:12: UserWarning: text``) and its source line -> WARNING;
    * a traceback, up to its exception line -> one ERROR record of several lines;
    * a tqdm bar -> INFO, its first state, then at most once per ``progress_interval_s`` per bar
      (named by its description), and its final state (n == total, or closed) once;
    * blank lines are dropped, anything else is INFO.

    ``progress_interval_s`` defaults to ``$SPO_PROGRESS_LOG_S`` or 30 s; ``clock`` is injectable for tests.
    Safe to feed stdout and stderr from two threads (each stream keeps its own partial line).
    """

    def __init__(self, progress_interval_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.interval = progress_interval_from_env() if progress_interval_s is None else float(progress_interval_s)
        self.clock = clock
        self._streams: dict[str, _Stream] = {}
        self._bars: dict[str, _Bar] = {}
        self._lock = threading.Lock()

    def feed(self, chunk: bytes | str, stream: str = "stderr") -> list[Record]:
        """Records for ``chunk`` (bytes or text as read, any split); a partial last line waits for
        the next chunk, except a complete bar status, which tqdm writes in one piece."""
        with self._lock:
            st = self._streams.setdefault(stream, _Stream())
            text = st.decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
            out: list[Record] = []
            data = st.buffer + text
            pos = 0
            for m in _SEGMENT.finditer(data):
                self._segment(st, m[1], m[2], out)
                pos = m.end()
            st.buffer = data[pos:]
            # The status a bar shows now ends only when the next refresh starts (30 s later): take it now.
            if st.buffer and (p := _PROGRESS.fullmatch(_ANSI.sub("", st.buffer).rstrip())):
                self._progress(st, p, out)
                st.buffer = ""
            return out

    def close(self, stream: str | None = None) -> list[Record]:
        """Records still held for ``stream`` (every stream when None) at its end: the last partial
        line, an unfinished traceback, and the final state of bars whose last state was not logged."""
        with self._lock:
            out: list[Record] = []
            for name in [stream] if stream is not None else list(self._streams):
                st = self._streams.pop(name, None)
                if st is None:
                    continue
                rest = st.buffer + st.decoder.decode(b"", final=True)
                if rest:
                    self._segment(st, rest, "\n", out)
                self._flush_traceback(st, out)
            if stream is None or not self._streams:  # the bars outlive a stream only while another is open
                for bar in self._bars.values():
                    if not bar.done and bar.last_text != bar.emitted_text:
                        out.append((logging.INFO, bar.last_text))
                    bar.done = True
            return out

    # -- one line -------------------------------------------------------------------------------
    def _segment(self, st: _Stream, raw: str, end: str, out: list[Record]) -> None:
        line = _ANSI.sub("", raw).rstrip()
        if st.traceback is not None:
            if line[:1].isspace() or not line:
                st.traceback.append(line)
                return
            st.traceback.append(line)  # the exception line ends it
            self._flush_traceback(st, out)
            return
        if not line.strip():
            # a bar closed with leave=True writes its final status, then "\n"
            if end == "\n" and st.live is not None:
                self._close_bar(st.live, out)
                st.live = None
            return
        if st.traceback is None and line.startswith(_TRACEBACK_START):
            st.traceback = [line]
            return
        if st.after_warning and line[:1].isspace():  # the source line of the warning just logged
            out.append((logging.WARNING, line.strip()))
            st.after_warning = False
            return
        st.after_warning = False
        if m := _LOG_LINE.match(line):
            out.append((logging.getLevelName(m[1]), m[2]))
        elif m := _DVC_LINE.match(line):
            out.append((logging.getLevelName(m[1]), line))
        elif _WARNING_LINE.match(line):
            out.append((logging.WARNING, line))
            st.after_warning = True
        elif line.strip() in _TRACEBACK_LINKS:
            out.append((logging.ERROR, line.strip()))
        elif m := _PROGRESS.match(line):
            self._progress(st, m, out)
            rest = line[m.end():].strip()
            if rest:  # a line written while the bar was shown (e.g. a log line) follows on its line
                st.live = None
                self._segment(st, rest, end, out)
            elif end == "\n":
                self._close_bar(st.live, out)
                st.live = None
            return
        else:
            out.append((logging.INFO, line))
        st.live = None

    def _progress(self, st: _Stream, m: re.Match, out: list[Record]) -> None:
        text = m[0].strip()
        key = (m["desc"] or "").strip()
        now = self.clock()
        bar = self._bars.get(key)
        st.live = key
        if bar is not None and bar.done and _is_final(m):  # the final status again (tqdm.close redraws it)
            return
        if bar is None or bar.done:  # a new bar (or one of the same name again)
            self._bars[key] = _Bar(now, text, text, done=_is_final(m))
            out.append((logging.INFO, text))
            return
        bar.last_text = text
        if _is_final(m) or now - bar.last_emit_t >= self.interval:
            bar.last_emit_t, bar.emitted_text, bar.done = now, text, _is_final(m)
            out.append((logging.INFO, text))

    def _close_bar(self, key: str | None, out: list[Record]) -> None:
        bar = self._bars.get(key) if key is not None else None
        if bar is None or bar.done:
            return
        if bar.last_text != bar.emitted_text:
            out.append((logging.INFO, bar.last_text))
        bar.done = True

    @staticmethod
    def _flush_traceback(st: _Stream, out: list[Record]) -> None:
        if st.traceback:
            out.append((logging.ERROR, "\n".join(st.traceback).rstrip()))
        st.traceback = None


def iter_records(stream: IO, output: StageOutput, name: str = "stderr", chunk_size: int = 65536) -> Iterator[Record]:
    """Read ``stream`` (a subprocess pipe: binary, or text opened with ``newline=''``) to its end,
    yielding ``(level, message)`` as the output arrives; the held-back records come at the end."""
    if isinstance(stream, io.TextIOBase):
        for line in stream:  # newline='' keeps "\r" as a line end
            yield from output.feed(line, name)
    else:
        read = getattr(stream, "read1", None) or stream.read  # read1: what is there, without waiting for more
        while chunk := read(chunk_size):
            yield from output.feed(chunk, name)
    yield from output.close(name)


TAIL_LINES = 40


def run_logged(cmd: list[str], label: str, logger: logging.Logger | logging.LoggerAdapter, *, cwd=None,
               env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
               watch: Callable[[str], object] | None = None) -> tuple[int, dict[str, list[str]]]:
    """Run ``cmd`` with its output logged as ``[label] message`` records at their own levels, sparse
    progress bars (:func:`progress_env`); returns the exit status and the last lines of each stream.

    ``pass_fds`` stay open in the child (a GPU lease's lock files: the devices stay leased while it
    runs, even if this process dies). ``watch`` sees every message. Cancelled or interrupted, the
    child is killed, not left running.
    """
    import collections
    import subprocess

    output = StageOutput()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **progress_env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)  # binary: tqdm's \r
    tails = {"stdout": collections.deque(maxlen=TAIL_LINES), "stderr": collections.deque(maxlen=TAIL_LINES)}

    def pump(name: str, stream) -> None:
        for level, msg in iter_records(stream, output, name):
            tails[name].append(msg)
            if watch is not None:
                watch(msg)
            logger.log(level, "[%s] %s", label, msg)

    readers = [threading.Thread(target=pump, args=(n, getattr(proc, n)), daemon=True) for n in tails]
    for r in readers:
        r.start()
    try:
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        for r in readers:
            r.join(timeout=5)
    return rc, {k: list(v) for k, v in tails.items()}
