"""Machine-readable progress of a multi-stage job (``precompute demo|build --progress-file PATH``).

The explorer starts the demo build as a separate process and shows its progress in the page; this
module is the contract between the two. The job side wraps each stage in :func:`stage` under a
:func:`reporting` block. Stage code draws its progress bars with this module's :class:`tqdm` (a
drop-in subclass of ``tqdm.auto.tqdm``), which registers each bar with the active reporter while it is
open; a background thread samples the running stage's registered bars (counts, rate) twice a second.
A bar made with plain ``tqdm`` is not reported. The reader side is :func:`read_progress`.

The file is JSON lines, rewritten atomically (temp file + rename) on every change, so a reader never
sees a torn file::

    {"kind": "job", "job": "demo", "status": "running", "pid": 4242, "started": 1700000000.0,
     "updated": 1700000042.5, "elapsed_s": 42.5, "message": null, "n_stages": 9}
    {"kind": "stage", "stage": "extract", "label": "CLIP features of the photos", "index": 1,
     "status": "done", "done": 6, "total": 6, "unit": "img", "elapsed_s": 8.1, "eta_s": 0.0}
    {"kind": "stage", "stage": "train-sae", "label": "...", "index": 2, "status": "running",
     "done": 120, "total": 800, "unit": "step", "elapsed_s": 20.0, "eta_s": 113.3}
    ...

Job status: ``running`` | ``done`` | ``failed`` (``message`` says why); stage status: ``pending`` |
``running`` | ``done`` | ``failed``. ``done``/``total``/``eta_s`` are null when the stage has no
progress bar (yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm as _tqdm

from insight_core.io import atomic_write

log = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the running stage's progress bars are sampled (seconds)."""


@dataclasses.dataclass(frozen=True)
class StageProgress:
    """One stage of a job, as last reported."""

    stage: str
    """Stage name (``train-sae``)."""
    label: str
    """What the stage does, for people."""
    index: int
    """1-based position in the job."""
    status: str = "pending"
    """``pending`` | ``running`` | ``done`` | ``failed``."""
    done: float | None = None
    """Units finished in the stage's current progress bar (None: no bar)."""
    total: float | None = None
    """Units of that bar (None: unknown)."""
    unit: str = ""
    """The bar's unit (``img``, ``step``, ``batch``)."""
    elapsed_s: float | None = None
    """Seconds since the stage started (final duration once done)."""
    eta_s: float | None = None
    """Estimated seconds left in the current bar (None: unknown)."""

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1], or None."""
        if self.done is None or not self.total:
            return None
        return max(0.0, min(1.0, float(self.done) / float(self.total)))


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """A job's progress file, read back."""

    job: str
    status: str
    """``running`` | ``done`` | ``failed``."""
    stages: tuple[StageProgress, ...]
    pid: int | None = None
    started: float | None = None
    """Unix time the job started."""
    updated: float | None = None
    """Unix time of the last write."""
    elapsed_s: float | None = None
    message: str | None = None
    """Why it failed (or a closing note)."""

    @property
    def current(self) -> StageProgress | None:
        """The running stage, else the first failed one, else None."""
        for wanted in ("running", "failed"):
            for s in self.stages:
                if s.status == wanted:
                    return s
        return None

    @property
    def n_done(self) -> int:
        return sum(s.status == "done" for s in self.stages)


class tqdm(_tqdm):  # lower-case: a drop-in for tqdm.auto.tqdm
    """``tqdm.auto.tqdm`` whose counts the active :class:`ProgressReporter` (if any) reports while the
    bar is open: stage code uses it instead of tqdm's own class and reports nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reporter = _current
        if self._reporter is not None and not self.disable:
            self._reporter.track(self)

    def close(self) -> None:
        super().close()
        reporter = getattr(self, "_reporter", None)  # close() also runs from __del__, once more
        self._reporter = None
        if reporter is not None:
            reporter.untrack(self)


def _bar_snapshot(bars: Sequence[Any], since: float) -> dict[str, Any] | None:
    """Counts of the most recently started open bar among ``bars`` that started after ``since`` (or None)."""
    best, best_start = None, since
    for bar in bars:
        start = float(getattr(bar, "start_t", 0.0) or 0.0)
        if getattr(bar, "disable", False) or start < since:
            continue
        if best is None or (bar.total is not None, start) >= (best.total is not None, best_start):
            best, best_start = bar, start
    if best is None:
        return None
    try:
        d = best.format_dict
    except (AttributeError, RuntimeError):
        return None
    n, total, elapsed = float(d.get("n") or 0), d.get("total"), float(d.get("elapsed") or 0.0)
    rate = d.get("rate") or (n / elapsed if elapsed > 0 and n > 0 else None)
    eta = (float(total) - n) / rate if total and rate else None
    return {"done": n, "total": float(total) if total else None, "unit": str(d.get("unit") or ""),
            "eta_s": None if eta is None else max(0.0, eta)}  # fmt: skip


class ProgressReporter:
    """Writes a job's progress file; one per job (see :func:`reporting`)."""

    def __init__(self, path: str | Path, stages: Sequence[tuple[str, str]], job: str = "job") -> None:
        self.path = Path(path)
        self.job = job
        self.started = time.time()
        self.status = "running"
        self.message: str | None = None
        self.stages = {
            name: StageProgress(stage=name, label=label, index=i + 1)
            for i, (name, label) in enumerate(stages)
        }
        self._t0: dict[str, float] = {}
        self._running: str | None = None
        self._bars: list[tqdm] = []
        """The open bars (:class:`tqdm` registers and unregisters itself)."""
        self._lock = threading.RLock()  # a bar closed by GC while the lock is held re-enters it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="progress-file", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> ProgressReporter:
        self.write()
        self._thread.start()
        return self

    def close(self, status: str, message: str | None = None) -> None:
        """Stop sampling and write the final status (``done`` or ``failed``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            self.status, self.message = status, message
            if self._running is not None and status == "failed":
                self._set(self._running, status="failed")
        self.write()

    # -- bars ---------------------------------------------------------------------------------
    def track(self, bar: tqdm) -> None:
        with self._lock:
            self._bars.append(bar)

    def untrack(self, bar: tqdm) -> None:
        with self._lock:
            self._bars = [b for b in self._bars if b is not bar]

    # -- stages -------------------------------------------------------------------------------
    def begin(self, name: str) -> None:
        with self._lock:
            if name not in self.stages:  # an unplanned stage: append it
                self.stages[name] = StageProgress(stage=name, label=name, index=len(self.stages) + 1)
            self._t0[name] = time.time()
            self._running = name
            self._set(name, status="running", elapsed_s=0.0)
        self.write()

    def end(self, name: str, ok: bool = True) -> None:
        with self._lock:
            snap = _bar_snapshot(self._bars, self._t0.get(name, self.started))
            cur = self.stages[name]
            done = {"done": cur.total, "eta_s": 0.0} if ok and cur.total else {}
            if snap and ok:
                done = {**snap, "done": snap["total"] or snap["done"], "eta_s": 0.0}
            self._set(name, status="done" if ok else "failed",
                      elapsed_s=time.time() - self._t0.get(name, self.started), **done)  # fmt: skip
            if self._running == name:
                self._running = None
        self.write()

    def _set(self, name: str, **changes: Any) -> None:
        self.stages[name] = dataclasses.replace(self.stages[name], **changes)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                name = self._running
                if name is None:
                    continue
                t0 = self._t0.get(name, self.started)
                snap = _bar_snapshot(self._bars, t0) or {}
                self._set(name, elapsed_s=time.time() - t0, **snap)
            self.write()

    # -- file ---------------------------------------------------------------------------------
    def lines(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            head = {"kind": "job", "job": self.job, "status": self.status, "pid": os.getpid(),
                    "started": self.started, "updated": now, "elapsed_s": now - self.started,
                    "message": self.message, "n_stages": len(self.stages)}  # fmt: skip
            body = [{"kind": "stage", **dataclasses.asdict(s)} for s in self.stages.values()]
        return [head, *body]

    def write(self) -> None:
        text = "".join(json.dumps(line) + "\n" for line in self.lines())
        try:
            atomic_write(self.path, lambda tmp: tmp.write_text(text), durable=False)  # rewritten often
        except OSError as err:  # progress is a courtesy: never fail the job over it
            log.debug("progress file %s not written: %s", self.path, err)


_current: ProgressReporter | None = None


@contextlib.contextmanager
def reporting(
    path: str | Path | None, stages: Sequence[tuple[str, str]], job: str = "job"
) -> Iterator[ProgressReporter | None]:
    """Report the stages run inside the block to ``path`` (nothing when ``path`` is None, or when an
    outer block already reports: a job run by another job reports into the outer file)."""
    global _current
    if path is None or _current is not None:
        yield _current
        return
    reporter = _current = ProgressReporter(path, stages, job).start()
    try:
        yield reporter
    except BaseException as err:
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
        reporter.close("failed", reason)
        raise
    else:
        reporter.close("done")
    finally:
        _current = None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage as running for the active reporter (a no-op without one)."""
    reporter = _current
    if reporter is None:
        yield
        return
    reporter.begin(name)
    ok = False
    try:
        yield
        ok = True
    finally:
        reporter.end(name, ok)


def read_progress(path: str | Path) -> JobProgress | None:
    """The job progress in ``path``; None when the file does not exist (yet) or is not a progress file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    head: dict[str, Any] | None = None
    stages: list[StageProgress] = []
    fields = {f.name for f in dataclasses.fields(StageProgress)}
    for raw in text.splitlines():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "job":
            head = doc
        elif doc.get("kind") == "stage" and isinstance(doc.get("stage"), str):
            try:
                stages.append(StageProgress(**{k: v for k, v in doc.items() if k in fields}))
            except TypeError:
                continue
    if head is None:
        return None
    return JobProgress(
        job=str(head.get("job", "job")),
        status=str(head.get("status", "running")),
        stages=tuple(sorted(stages, key=lambda s: s.index)),
        pid=head.get("pid"),
        started=head.get("started"),
        updated=head.get("updated"),
        elapsed_s=head.get("elapsed_s"),
        message=head.get("message"),
    )
