"""`search report`: a real study's report opened in headless Chromium, offline.

Chromium (Debian's `chromium`, installed with apt-get when missing, see tests/system_tools.py) is
required: without it these tests fail, they never skip.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import cli_env
from study_factory import make_finished_study
from system_tools import require

from search import record
from search.report import compute_summary, epochs_run, stopped_by

pytestmark = pytest.mark.slow
ARTIFACTS_ENV = "SEARCH_TEST_ARTIFACTS"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=20000",
)


def _chromium() -> str:
    return require("chromium", "chromium")


def open_in_chromium(page: Path, profile: Path, screenshot: Path | None = None
                     ) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran, and every console message it logged."""
    base = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    run = subprocess.run([*base, "--enable-logging=stderr", "--v=0", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        shot = subprocess.run([*base, "--window-size=1280,6000", f"--screenshot={screenshot}",
                               page.as_uri()], capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return run.stdout, console


class _Plots(html.parser.HTMLParser):
    """Each plotly div's id, and whether plotly drew its SVG inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: dict[str, bool] = {}
        self._stack: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("meta", "br", "img", "input", "link", "hr", "path", "rect", "line"):
            return
        classes = (dict(attrs).get("class") or "").split()
        current = dict(attrs).get("id") if "plotly-graph-div" in classes else None
        if current:
            self.plots[current] = False
        self._stack.append(current)
        if "main-svg" in classes:
            for owner in self._stack:
                if owner:
                    self.plots[owner] = True

    def handle_endtag(self, tag: str) -> None:
        if self._stack and tag not in ("meta", "br", "img", "input", "link", "hr", "path",
                                       "rect", "line"):
            self._stack.pop()


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("report") / "study.db"
    make_finished_study(f"sqlite:///{path}", "reported")
    return path, "reported"


def _digest(folder: Path) -> dict[str, str]:
    """Every file's hash; the WAL index (`-shm`, readers' shared memory) only by name."""
    return {
        p.name: "" if p.name.endswith("-shm") else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
    }


def test_report_renders_every_plot_offline_without_console_errors(study_db, tmp_path) -> None:
    db, name = study_db
    before = _digest(db.parent)
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "search", "report", name, "--storage",
                             f"sqlite:///{db}", "-o", str(out)], capture_output=True,
                            text=True, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _digest(db.parent) == before  # the report wrote nothing to the database folder
    page = out.read_text()
    assert "<script src=" not in page and page.count("plotly.js v") >= 1  # embedded, once
    shot = tmp_path / "report.png"
    dom, console = open_in_chromium(out, tmp_path / "profile", shot)
    if os.environ.get(ARTIFACTS_ENV):  # keep the screenshot beyond pytest's tmp rotation
        Path(os.environ[ARTIFACTS_ENV]).mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, Path(os.environ[ARTIFACTS_ENV]) / "report.png"))
    print(f"report screenshot: {shot}")
    assert console == []
    plots = _Plots()
    plots.feed(dom)
    assert len(plots.plots) == 6 and all(plots.plots.values()), plots.plots
    for title in ("Optimization history", "Learning curves by state and prune rule",
                  "Parameter importances", "Parallel coordinates", "Slice plots",
                  "Timeline of workers", "Compute summary", "Best trials"):
        assert title in dom


def test_console_errors_are_caught(tmp_path: Path) -> None:
    """The check above can fail: a page that logs an error is seen as one."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('boom')</script></body></html>")
    _, console = open_in_chromium(page, tmp_path / "profile")
    assert len(console) == 1 and "boom" in console[0]


def test_compute_summary_counts_what_pruning_saved_per_rule(study_db) -> None:
    db, name = study_db
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    summary = compute_summary(study)
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert pruned
    stopped = [t for t in study.trials if stopped_by(t) is not None]
    assert {t.number for t in stopped} >= {t.number for t in pruned}
    assert sum(s["trials"] for s in summary["pruning_saved"].values()) == len(stopped)
    for rule, saved in summary["pruning_saved"].items():
        mine = [t for t in stopped if stopped_by(t) == rule]
        assert saved["trials"] == len(mine)
        assert saved["epochs_saved"] == sum(6 - epochs_run(t) for t in mine)
        assert saved["seconds_saved"] >= 0.0
    assert summary["retries"] == 1
    assert summary["failures"]["heartbeat-stale"]["trials"] == 1
    complete = summary["per_state"]["COMPLETE"]
    assert complete["trials"] == 5 and complete["seconds"] > 0.0  # 10 = 5 complete + 5 pruned


def test_trials_ended_at_their_best_count_as_saved_by_their_rule(sqlite_url: str) -> None:
    """A trial ended at its best (COMPLETE, outcome `ended`) stopped early as a pruned one did:
    the end-don't-lose rules and early stopping save epochs too, listed as such."""
    study = optuna.create_study(storage=sqlite_url)
    study.set_user_attr(record.SPEC, {"epochs": 20})
    curve = {e: 1.0 / e for e in range(1, 9)}  # 8 of 20 epochs
    ended = {record.OUTCOME: "ended", record.PRUNE_RULE: "comparative"}
    patience = {record.OUTCOME: "ended", record.EARLY_STOPPED: "no improvement for 3 epochs"}
    for attrs, state in ((ended, "COMPLETE"), (patience, "COMPLETE"), ({}, "COMPLETE"),
                         ({record.PRUNE_RULE: "stall"}, "PRUNED")):
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], value=0.125 if state == "COMPLETE" else None,
            intermediate_values=curve, user_attrs=attrs))
    saved = compute_summary(study)["pruning_saved"]
    assert sorted(saved) == ["comparative (ended at its best)",
                             "early stopping (ended at its best)", "stall"]
    assert all((s["trials"], s["epochs_run"], s["epochs_saved"]) == (1, 8, 12)
               for s in saved.values())
