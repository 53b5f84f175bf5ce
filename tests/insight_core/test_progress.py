"""The --progress-file contract: stages, live tqdm counts and ETA, final status, robust reading."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from insight_core import progress
from insight_core.progress import read_progress, reporting, stage, tqdm

STAGES = (("prepare", "getting ready"), ("train", "training"), ("finish", "writing"))


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "POLL_S", 0.02)


def _wait_for(path: Path, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = read_progress(path)
        if report is not None and check(report):
            return report
        time.sleep(0.01)
    pytest.fail(f"progress file never satisfied the check: {path.read_text() if path.exists() else None}")


def test_stages_counts_eta_and_final_status(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    with reporting(path, STAGES, job="demo"):
        first = read_progress(path)
        assert first is not None
        assert first.status == "running"
        assert [s.status for s in first.stages] == ["pending"] * 3
        with stage("prepare"):
            pass
        with stage("train"), tqdm(total=40, unit="step", disable=False, file=io.StringIO()) as bar:
            bar.update(10)
            time.sleep(0.05)
            bar.update(10)
            mid = _wait_for(path, lambda r: r.current is not None and r.current.done == 20)
            cur = mid.current
            assert (cur.stage, cur.label, cur.index, cur.status) == ("train", "training", 2, "running")
            assert cur.total == 40
            assert cur.unit == "step"
            assert cur.fraction == pytest.approx(0.5)
            assert cur.eta_s is not None
            assert 0 < cur.eta_s < 60
            assert mid.n_done == 1
    done = read_progress(path)
    assert done is not None
    assert done.status == "done"
    assert [s.status for s in done.stages] == ["done", "done", "pending"]  # 'finish' never ran
    assert done.stages[1].done == 40  # a finished stage reads as complete
    assert done.stages[1].eta_s == 0
    assert done.current is None
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["kind"] == "job"
    assert lines[0]["job"] == "demo"
    assert [x["stage"] for x in lines[1:]] == ["prepare", "train", "finish"]


def test_a_failing_stage_marks_the_job_failed_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    with pytest.raises(ValueError, match="boom"), reporting(path, STAGES), stage("prepare"):
        raise ValueError("boom")
    report = read_progress(path)
    assert report is not None
    assert report.status == "failed"
    assert report.message == "ValueError: boom"
    assert report.stages[0].status == "failed"
    assert report.current is report.stages[0]


def test_without_a_path_nothing_is_written_and_inner_jobs_report_into_the_outer_file(tmp_path: Path) -> None:
    with reporting(None, STAGES) as reporter, stage("prepare"):
        assert reporter is None
    assert list(tmp_path.iterdir()) == []
    outer = tmp_path / "outer.jsonl"
    with reporting(outer, STAGES), reporting(tmp_path / "inner.jsonl", (("x", "x"),)), stage("extra"):
        pass
    assert not (tmp_path / "inner.jsonl").exists()
    report = read_progress(outer)
    assert report is not None
    assert [s.stage for s in report.stages] == ["prepare", "train", "finish", "extra"]  # unplanned: appended
    assert report.stages[-1].status == "done"


def test_read_progress_tolerates_missing_and_foreign_files(tmp_path: Path) -> None:
    assert read_progress(tmp_path / "absent.jsonl") is None
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n[1, 2]\n")
    assert read_progress(junk) is None
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        '{"kind": "job", "job": "demo", "status": "running"}\n'
        '{"kind": "stage", "stage": "b", "label": "B", "index": 2, "unknown_field": 1}\n'
        "{truncated\n"
        '{"kind": "stage", "stage": "a", "label": "A", "index": 1, "status": "done"}\n'
    )
    report = read_progress(mixed)
    assert report is not None
    assert [s.stage for s in report.stages] == ["a", "b"]
    assert report.stages[1].fraction is None


def test_only_the_modules_open_bars_are_reported(tmp_path: Path) -> None:
    """Bars register themselves explicitly: tqdm's own class is not sampled, a closed bar is dropped."""
    from tqdm import tqdm as plain_tqdm

    path = tmp_path / "p.jsonl"
    with reporting(path, STAGES) as reporter, stage("train"):
        assert reporter is not None
        with plain_tqdm(total=5, disable=False, file=io.StringIO()) as other:
            other.update(5)
            time.sleep(0.1)  # several polls
            running = read_progress(path)
            assert running is not None
            assert running.current is not None
            assert running.current.done is None  # no reported bar yet
        with tqdm(total=8, unit="img", disable=False, file=io.StringIO()) as bar:
            bar.update(3)
            _wait_for(path, lambda r: r.current is not None and r.current.done == 3)
        assert reporter._bars == []  # closed bars are unregistered
        with tqdm(total=8, disable=True):
            assert reporter._bars == []  # disabled bars are never registered
