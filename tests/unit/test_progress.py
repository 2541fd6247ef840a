"""The progress helper: a bar on a terminal, periodic log lines elsewhere, nothing when turned off."""

from __future__ import annotations

import logging
import time

import pytest

from kdlib.progress import Progress, configured, phase, progress


@pytest.fixture
def progress_lines(caplog):
    caplog.set_level(logging.INFO, logger="kdlib.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "kdlib.progress"]


def test_without_a_terminal_a_line_every_interval_and_one_at_the_end(progress_lines, capsys):
    with Progress("evaluating", total=4, unit="batch", terminal=False, interval=0.05) as bar:
        for _ in range(4):
            time.sleep(0.08)
            bar.update(1)
            bar.set_postfix(kl=0.123456)
    lines = progress_lines()
    periodic, final = lines[:-1], lines[-1]
    assert len(periodic) >= 3  # ~0.32 s at one line per 0.05 s
    assert all(line.startswith("evaluating: ") and "elapsed" in line for line in periodic)
    assert any("/4 batch (" in line and " left" in line and "kl=0.1235" in line for line in periodic)
    assert final.startswith("evaluating done: 4/4 batch (100%), took 0:00") and "kl=0.1235" in final
    assert capsys.readouterr().err == ""  # no bar drawn into a log


def test_a_phase_without_a_count_shows_the_time_spent(progress_lines):
    with phase("loading the teacher", enabled=True) as bar:
        bar.terminal = False
        time.sleep(0.01)
    assert progress_lines()[-1] == "loading the teacher done: took 0:00"
    with phase("writing checkpoint step_3", enabled=True, summary=False):
        pass
    assert progress_lines()[-1] == "loading the teacher done: took 0:00"  # no summary asked


def test_on_a_terminal_a_tqdm_bar_and_no_log_lines(progress_lines, capsys):
    with Progress("distilling", total=3, unit="step", terminal=True, interval=0.01) as bar:
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(loss=1.5)
        time.sleep(0.05)
    err = capsys.readouterr().err
    assert "distilling" in err and "3/3" in err and "loss=1.5" in err
    assert progress_lines() == []


def test_turned_off_shows_nothing_and_starts_no_thread(progress_lines, capsys):
    for terminal in (True, False):
        with Progress("evaluating", total=2, terminal=terminal, interval=0.01, enabled=False) as bar:
            assert bar._ticker is None and bar._bar is None
            bar.update(2)
            time.sleep(0.03)
    assert progress_lines() == [] and capsys.readouterr().err == ""


def test_the_runs_setting_is_the_default(progress_lines):
    with configured(False):
        with progress("generating", total=1) as bar:
            assert not bar.enabled
    with progress("generating", total=1) as bar:
        assert bar.enabled


def test_log_lines_do_not_tear_a_terminal_bar(capsys):
    """While a bar is on the screen a console handler writes through tqdm.write."""
    import sys

    logger = logging.getLogger("kdlib")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        with Progress("distilling", total=2, terminal=True):
            assert handler not in logger.handlers  # replaced for the bar's lifetime
            logger.warning("a message during the bar")
        assert handler in logger.handlers
    finally:
        logger.removeHandler(handler)
    assert "a message during the bar" in capsys.readouterr().err
