"""The first seconds of the app: serve the page at once, build or load the atlas in the background.

With no atlas configured and no ``./demo_atlas``, :class:`DemoBuild` runs ``python -m precompute demo
--progress-file ...`` as a separate process (the app never imports ``precompute``), its output going
to a log file; the terminal gets one line per stage. :class:`Startup` waits for it, loads the atlas
into the running app's :class:`~app.views.Views` and tells the page (:meth:`Startup.status_html`,
polled by a ``gr.Timer``), which then reloads itself with the atlas: no restart.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from app import html as H
from app.components import internal_error, redact_paths
from app.state import AppState, load_state
from app.views import Views
from insight_core.atlas.layout import AtlasLayout
from insight_core.errors import InsightError
from insight_core.locks import is_locked
from insight_core.progress import JobProgress, read_progress

log = logging.getLogger(__name__)

LOG_LINES = 15
"""Lines of the build log shown in the page when the build fails."""


def demo_command(out: str | Path, progress_file: str | Path | None = None) -> list[str]:
    """The command line that builds the demo atlas into ``out`` (the ``precompute demo`` CLI)."""
    cmd = [sys.executable, "-m", "precompute", "demo", "--out", str(out)]
    if progress_file is not None:
        cmd += ["--progress-file", str(progress_file)]
    return cmd


class DemoBuild:
    """``precompute demo`` in a separate process, or one already running from an earlier start.

    Its output goes to ``AtlasLayout(out).demo_build_log``, its progress to ``.demo_progress``.
    """

    def __init__(self, out: str | Path, command: Sequence[str] | None = None) -> None:
        self.out = Path(out)
        self.layout = AtlasLayout(self.out)
        self.command = list(command) if command else demo_command(self.out, self.layout.demo_progress)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        """The build process this app started (None when attached)."""
        self.attached = False
        """True when another process (an earlier app start) is building; we only watch it."""

    def start(self) -> None:
        """Start the build (or attach to a running one); returns at once.

        A build is running when something holds ``demo_lock`` (``precompute demo`` holds it for its
        whole run; the OS drops it when the build dies), never because a PID in the progress file is
        alive: after a reboot or PID reuse that PID is an unrelated process.
        """
        if is_locked(self.layout.demo_lock):
            self.attached = True
            log.info("a demo build is running (%s is held); following its progress", self.layout.demo_lock)
            return
        self.layout.demo_work_dir.mkdir(parents=True, exist_ok=True)
        self.layout.demo_progress.unlink(missing_ok=True)
        with open(self.layout.demo_build_log, "wb") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)  # fmt: skip
        self.pid = self.proc.pid
        log.info(
            "building the demo atlas in the background: `%s` (log: %s); the page shows its progress",
            subprocess.list2cmdline(self.command),
            self.layout.demo_build_log,
        )

    def poll(self) -> int | None:
        """The exit code once finished (0 for an attached build that left a manifest), else None."""
        if self.proc is not None:
            return self.proc.poll()
        if self.attached and not is_locked(self.layout.demo_lock):
            return 0 if self.layout.manifest.is_file() else 1
        return None

    def progress(self) -> JobProgress | None:
        return read_progress(self.layout.demo_progress)

    def log_tail(self, n: int = LOG_LINES) -> str:
        try:
            with open(self.layout.demo_build_log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64_000))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.split("\r")[-1] for ln in text.splitlines()]  # progress bars: their last redraw
        return "\n".join([ln for ln in lines if ln.strip()][-n:])

    def terminate(self) -> None:
        """Stop a build this app started (a later start resumes it: every stage is idempotent)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Startup:
    """Builds (optionally) and loads the atlas in a background thread, for a page already served.

    ``phase``: ``building`` -> ``loading`` -> ``ready``, or ``failed`` (``error`` says why).
    """

    def __init__(
        self,
        views: Views,
        location: str | Path,
        build: DemoBuild | None = None,
        loader: Callable[[str | Path], AppState] = load_state,
        poll_s: float = 1.0,
    ) -> None:
        self.views = views
        self.location = str(location)
        self.build = build
        self.loader = loader
        self.poll_s = poll_s
        self.phase = "building" if build is not None else "loading"
        self.error: str | None = None
        self.started = time.time()
        self.ready_s: float | None = None
        self._thread = threading.Thread(target=self._run, name="atlas-startup", daemon=True)
        views.load_error = self._pending_message()

    def _pending_message(self) -> str:
        if self.phase == "building":
            return "the demo atlas is still being built (see the progress at the top of the page)"
        return f"the atlas {self.location} is still loading"

    def begin(self) -> Startup:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ready or failed (tests, CLI); True when ready."""
        self._thread.join(timeout)
        return self.phase == "ready"

    @property
    def done(self) -> bool:
        return self.phase in ("ready", "failed")

    def _fail(self, message: str) -> None:
        self.error = message
        self.views.load_error = message
        self.phase = "failed"
        log.error("%s", message)

    def _run(self) -> None:
        if self.build is not None:
            try:
                self.build.start()
            except OSError as err:
                cmd = subprocess.list2cmdline(self.build.command)
                self._fail(f"could not start the demo build `{cmd}`: {err}")
                return
            rc = self._watch_build(self.build)
            if rc != 0:
                self._fail(
                    f"building the demo atlas failed: `{subprocess.list2cmdline(self.build.command)}` exited "
                    f"with code {rc}; full log: {self.build.layout.demo_build_log}"
                )
                return
            self.phase = "loading"
            self.views.load_error = self._pending_message()
        try:
            state = self.loader(self.location)
        except (InsightError, OSError) as err:
            self._fail(f"{self.location}: {err}")
            return
        except Exception as err:  # keep serving the page; the log has the traceback, the page its id
            self._fail(f"{self.location}: {internal_error(err, f'loading the atlas {self.location}')}")
            return
        self.views.attach(state)
        self.ready_s = time.time() - self.started
        self.phase = "ready"
        log.info("atlas ready after %.0f s: %s", self.ready_s, self.location)

    def _watch_build(self, build: DemoBuild) -> int:
        """Wait for the build to exit, logging one line per stage; returns its exit code."""
        last = None
        while (rc := build.poll()) is None:
            report = build.progress()
            cur = report.current if report else None
            if report is not None and cur is not None and cur.stage != last:
                last = cur.stage
                log.info("demo build %d/%d: %s (%s)", cur.index, len(report.stages), cur.stage, cur.label)
            time.sleep(self.poll_s)
        report = build.progress()
        if rc == 0 and report is not None:
            log.info("demo atlas built in %.0f s", report.elapsed_s or 0)
        return rc

    def close(self) -> None:
        """Stop a build still running (the app is exiting)."""
        if self.build is not None:
            self.build.terminate()

    # -- the page -----------------------------------------------------------------------------
    def status_html(self) -> str:
        """The startup panel: build progress stage by stage, loading, the error, or the ready marker."""
        if self.phase == "ready":
            return ('<div class="insight-startup" data-insight-ready="1">'
                    f"{H.message('Atlas loaded; opening it…', 'info')}</div>")  # fmt: skip
        if self.phase == "failed":
            tail = self.build.log_tail() if self.build is not None else ""
            log_html = (
                "<details open><summary>last lines of the build log</summary><pre style='white-space:"
                f"pre-wrap;font-size:0.8em'>{H.esc(tail)}</pre></details>"
                if tail
                else ""
            )
            message = H.message(redact_paths(self.error or "failed"), "error")
            return f'<div class="insight-startup">{message}{log_html}</div>'
        if self.phase == "loading":
            return (
                '<div class="insight-startup" role="status">'
                f"<b>Loading the atlas</b> {H.esc(self.location)} (its backbone, SAE and indexes)…"
                "</div>"
            )
        return build_progress_html(self.build.progress() if self.build else None, self.build, self.started)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = round(seconds)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


_ICONS = {"done": "✓", "running": "▶", "failed": "✗", "pending": "○"}


def build_progress_html(report: JobProgress | None, build: DemoBuild | None, started: float) -> str:
    """Stage-by-stage progress of the demo build (which stage, counts, ETA), escaped."""
    log_path = H.esc(build.layout.demo_build_log) if build is not None else ""
    head = (
        "<h3 style='margin:0 0 4px'>Building the demo atlas (first run only)</h3>"
        "<p style='margin:0 0 6px'>No atlas is configured, so the app builds a small one from the example "
        "photos with <code>python -m precompute demo</code> in a separate process (a few minutes on 2 CPU "
        f"cores). This page opens it as soon as it is ready. Full log: <code>{log_path}</code></p>"
    )
    if report is None:
        body = f"<p>starting… ({_duration(time.time() - started)})</p>"
        return f'<div class="insight-startup" role="status">{head}{body}</div>'
    items = []
    for s in report.stages:
        detail = ""
        if s.status == "running":
            frac = s.fraction
            bar = (
                f'<progress max="1" value="{frac:.3f}" style="width:160px;vertical-align:middle" '
                f'aria-label="{H.esc(s.stage)} progress"></progress> '
                if frac is not None
                else ""
            )
            counts = (f"{int(s.done)}/{int(s.total)} {H.esc(s.unit)}" if s.done is not None and s.total
                      else "")  # fmt: skip
            eta = f" · about {_duration(s.eta_s)} left" if s.eta_s is not None and s.eta_s > 0 else ""
            detail = f"<br>{bar}{counts}{eta} · {_duration(s.elapsed_s)} so far"
        elif s.status == "done":
            detail = f" <small>({_duration(s.elapsed_s)})</small>"
        weight = "bold" if s.status == "running" else "normal"
        colour = {"done": "#15803d", "failed": "#b91c1c", "pending": "#6b7280"}.get(s.status, "#111827")
        items.append(
            f'<li data-stage="{H.esc(s.stage)}" data-status="{H.esc(s.status)}" '
            f'style="color:{colour};font-weight:{weight}">{_ICONS.get(s.status, "·")} '
            f"{H.esc(s.stage)}: {H.esc(s.label)}{detail}</li>"
        )
    summary = (f"<p style='margin:4px 0'>stage {min(report.n_done + 1, len(report.stages))} of "
               f"{len(report.stages)} · {_duration(report.elapsed_s)} elapsed</p>")  # fmt: skip
    return (
        '<div class="insight-startup" role="status" style="background:#f8fafc;border:1px solid #e2e8f0;'
        f'border-radius:8px;padding:10px 14px">{head}{summary}'
        f"<ol style='list-style:none;padding-left:0;margin:0'>{''.join(items)}</ol></div>"
    )
