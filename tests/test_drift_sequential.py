"""The CUSUM across batches: its threshold, its steps, its state between monitor runs, and that it
catches a slow shift no single batch shows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normalcy.drift import detect_drift, score_shift
from normalcy.drift_sequential import (
    SequentialState,
    batch_correlation,
    cusum_step,
    cusum_threshold,
    load_sequential_state,
    rank_shift,
    save_sequential_state,
    siegmund_alarm_rate,
)


@pytest.mark.parametrize("level", [0.0025, 0.01])
def test_simulated_threshold_agrees_with_siegmund_for_independent_batches(level):
    h = cusum_threshold(level, 0.0, 0.5)
    assert siegmund_alarm_rate(h, 0.5) == pytest.approx(level, rel=0.15)
    assert 2.0 < h < 6.0  # the textbook h = 4 gives about 1 / 336 per batch at k = 0.5


def test_threshold_rises_with_the_correlation_one_reference_gives_the_batches():
    independent = cusum_threshold(0.0025, 0.0, 0.5)
    shared = cusum_threshold(0.0025, batch_correlation(200, 2000), 0.5)
    assert batch_correlation(200, 2000) == pytest.approx(200 / 2200)
    assert shared > independent + 1.0
    assert cusum_threshold(0.001, 0.0, 0.5) > cusum_threshold(0.01, 0.0, 0.5)


def test_cusum_step_by_hand():
    state = SequentialState("3")
    state, running, alarm = cusum_step(state, 3.0, 0.5, 4.0)  # 0 + 3 - 0.5
    assert (state.cusum, running, alarm, state.n_batches) == (2.5, 2.5, False, 1)
    state, running, alarm = cusum_step(state, -5.0, 0.5, 4.0)  # floored at 0
    assert (state.cusum, alarm) == (0.0, False)
    state, _, _ = cusum_step(state, 3.0, 0.5, 4.0)
    state, running, alarm = cusum_step(state, 2.5, 0.5, 4.0)  # 2.5 + 2.5 - 0.5 = 4.5 > 4
    assert running == 4.5 and alarm
    assert (state.cusum, state.n_batches, state.n_alarms) == (0.0, 4, 1)  # restarted
    with pytest.raises(ValueError, match="must be finite"):
        cusum_step(state, float("nan"), 0.5, 4.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 0.1, 0.5), "level"),
        ((1.0, 0.1, 0.5), "level"),
        ((0.01, 1.0, 0.5), "correlation"),
        ((0.01, 0.1, 0.0), "allowance"),
    ],
)
def test_threshold_refuses_bad_settings(args, message):
    with pytest.raises(ValueError, match=message):
        cusum_threshold(*args)


def test_state_is_kept_per_champion_version(tmp_path):
    path = tmp_path / "artifacts" / "state.json"
    assert load_sequential_state(path, "4") == SequentialState("4")  # nothing saved yet
    save_sequential_state(SequentialState("4", 2.5, 7, 1), path)
    assert load_sequential_state(path, "4") == SequentialState("4", 2.5, 7, 1)
    assert load_sequential_state(path, "5") == SequentialState("5")  # a new champion restarts
    path.write_text(json.dumps({"cusum": 1.0}))
    with pytest.raises(ValueError, match="not a sequential drift state"):
        load_sequential_state(path, "4")


def test_rank_shift_is_standard_normal_without_drift_and_positive_when_scores_rise():
    rng = np.random.default_rng(1)
    reference = rng.exponential(size=1000)
    z = [rank_shift(reference, rng.exponential(size=200)) for _ in range(300)]
    # one shared reference: the batches share a term of sd sqrt(200 / 1200), hence the margins
    assert abs(np.mean(z)) < 0.6 and 0.8 < np.std(z) < 1.2
    assert rank_shift(reference, rng.exponential(size=200) * 1.3) > 2.0
    assert rank_shift(np.ones(10), np.ones(5)) == 0.0  # all tied: no evidence


def test_slow_score_shift_missed_by_every_batch_is_caught_by_the_cusum():
    """Scores 0.08 sd higher in every batch: no single batch's score KS fires at its share of
    the level, the CUSUM does within 30 batches."""
    rng = np.random.default_rng(4)
    reference, reference_scores = rng.normal(size=(3000, 3)), rng.normal(size=3000)
    state = SequentialState("1")
    fired_at = None
    for t in range(1, 31):
        batch, batch_scores = rng.normal(size=(300, 3)), rng.normal(0.08, size=300)
        report = detect_drift(
            reference, batch, None, reference_scores, batch_scores, 0.01, sequential_state=state
        )
        state = report.sequential_state
        assert report.family_level == pytest.approx(0.01 / 3)
        assert not report.test("scores").rejected
        assert score_shift(reference_scores, batch_scores)[1] > report.family_level
        if report.test("sequential").rejected:
            fired_at = t
            break
    assert fired_at is not None, "the CUSUM never fired"
    assert report.drifted and report.fired() == ["sequential"]
    assert report.test("sequential").critical_value > 0 and state.n_alarms == 1
    assert state.cusum == 0.0 and state.n_batches == fired_at


def test_monitor_keeps_the_state_in_artifacts_between_runs(tmp_path, monkeypatch):
    from pathlib import Path

    from normalcy import monitoring
    from normalcy.pipeline import artifacts

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    champion = monitoring.ChampionBundle(
        "7", "run", Path("m.onnx"), {}, rng.normal(size=(500, 2)), rng.normal(size=500), [], {}
    )
    state = monitoring.sequential_state(champion)
    assert state == SequentialState("7")
    report = detect_drift(
        champion.reference_X,
        rng.normal(size=(100, 2)),
        None,
        champion.reference_scores,
        rng.normal(1.0, size=100),
        0.01,
        sequential_state=state,
    )
    monitoring.keep_sequential_state(report)
    saved = json.loads((tmp_path / artifacts.DRIFT_SEQUENTIAL_STATE).read_text())
    assert saved["champion_version"] == "7" and saved["n_batches"] == 1 and saved["cusum"] > 0
    assert monitoring.sequential_state(champion).cusum == saved["cusum"]
