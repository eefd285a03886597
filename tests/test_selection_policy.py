"""Label-free selection: the consensus of IForest and two kNNs, overruled only by unanimous
evidence."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_auc_score

from normalcy.config import TrainParams
from normalcy.data.splits import Split
from normalcy.detectors import create_detector
from normalcy.detectors.ensemble import Ensemble
from normalcy.evaluation.selection import (
    CONSENSUS,
    SYNTHETIC_ANOMALIES,
    CandidateResult,
    beats_beyond_noise,
    choose_label_free,
    select_winner,
    synthetic_auroc,
    validation_metric,
)
from normalcy.export import export_onnx
from normalcy.pipeline import artifacts, train
from normalcy.scoring import SCORE_NAME


def evidence(*gains: float, base: float = 0.8, spread: float = 0.0) -> dict[str, np.ndarray]:
    """Per-type AUROCs over 3 draws: `base + gain` for each type, `spread` between draws."""
    jitter = np.array([-spread, 0.0, spread])
    return {kind: base + g + jitter for kind, g in zip(SYNTHETIC_ANOMALIES, gains, strict=True)}


def test_a_challenger_must_win_on_every_type_beyond_the_draw_noise():
    default = evidence(0, 0, 0)
    assert beats_beyond_noise(evidence(0.05, 0.05, 0.05), default, margin=0.0)
    assert not beats_beyond_noise(evidence(0.05, 0.05, -0.01), default, margin=0.0)  # not all
    assert not beats_beyond_noise(evidence(0.05, 0.05, 0.05), default, margin=0.1)  # too small
    noisy = {k: v + np.array([0.1, -0.1, 0.06]) for k, v in evidence(0.02, 0.02, 0.02).items()}
    assert not beats_beyond_noise(noisy, default, margin=0.0)  # within the noise of the draws


def results_for(names: list[str], metrics: list[float]) -> list[CandidateResult]:
    pairs = zip(names, metrics, strict=True)
    rows = [CandidateResult(name, "val_synthetic_auroc", m, True, 0.0) for name, m in pairs]
    rows[-1].extra["members"] = ["iforest", "knn"]
    return rows


def test_the_consensus_is_kept_unless_the_evidence_is_unanimous():
    results = results_for(["pca", "knn", CONSENSUS], [0.95, 0.90, 0.85])
    # pca has the best mean criterion but loses on one type: the argmax would take it.
    found = {"pca": evidence(0.2, 0.2, -0.02), "knn": evidence(0.01, 0.0, 0.0)}
    winner, why = choose_label_free(results, {**found, CONSENSUS: evidence(0, 0, 0)}, 0.0)
    assert winner.name == CONSENSUS and "so the consensus is kept" in why
    found["pca"] = evidence(0.2, 0.2, 0.05)
    winner, why = choose_label_free(results, {**found, CONSENSUS: evidence(0, 0, 0)}, 0.0)
    assert winner.name == "pca" and "pca beats the consensus" in why


@pytest.fixture(scope="module")
def unlabelled():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0], [0, 0, 1.0, 0.5], [0, 0, 0.5, 1.0]])
    X = rng.multivariate_normal(np.zeros(4), cov, size=600).astype(np.float32)
    return Split(X[:450], None, np.arange(450)), Split(X[450:], None, np.arange(450, 600))


def test_without_labels_the_pipeline_adds_the_consensus_and_says_why(
    unlabelled, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    fit_rows, val = unlabelled
    params = TrainParams(candidates=["iforest", "knn", "knn_wide", "pca"])
    detectors, results, winner = train.train_candidates(fit_rows, val, params)
    assert [r.name for r in results] == ["iforest", "knn", "knn_wide", "pca", CONSENSUS]
    consensus = detectors[CONSENSUS]
    assert isinstance(consensus, Ensemble) and consensus.members == ["iforest", "knn", "knn_wide"]
    assert consensus.combine == "max" and results[-1].extra["combine"] == "max"
    for r in results:
        assert set(r.extra["synthetic_auroc_by_type"]) == set(SYNTHETIC_ANOMALIES)
    table = json.loads((tmp_path / artifacts.CANDIDATES).read_text())
    assert table["winner"] == winner.name and table["why"].startswith("label-free validation")
    # Whatever won is what was saved, and it scores like the fitted one.
    saved = train.load_winner(tmp_path / artifacts.WINNER)
    np.testing.assert_allclose(saved.score(val.X), detectors[winner.name].score(val.X), rtol=1e-5)


def test_best_validation_restores_the_plain_argmax(unlabelled):
    fit_rows, val = unlabelled
    params = TrainParams(
        candidates=["iforest", "knn", "knn_wide", "pca"], selection="best_validation"
    )
    _, results, winner = train.fit_candidates(fit_rows, val, params)
    assert CONSENSUS not in [r.name for r in results]
    assert winner.metric == max(r.metric for r in results)
    assert winner.extra["selection"] == "best val_synthetic_auroc on the validation split"


def test_without_its_members_among_the_candidates_the_consensus_gives_way(unlabelled):
    """A run narrowed to other candidates (`--set train.candidates=[pca]`) is not refused: it
    takes the best validation metric and says why."""
    fit_rows, val = unlabelled
    params = TrainParams(candidates=["pca", "knn"])
    _, results, winner = train.fit_candidates(fit_rows, val, params)
    assert CONSENSUS not in [r.name for r in results]
    needs = "the consensus needs the candidates ['iforest', 'knn', 'knn_wide']"
    assert needs in winner.extra["selection"]


def contaminated_by_a_cluster(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training rows with a 30-row cluster of anomalies, held-out normal rows, held-out rows
    of the cluster): the cleaning-resistant contamination that masks itself from a small k."""
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(700, 4)).astype(np.float32)
    cluster = (2.0 + 0.1 * rng.normal(size=(40, 4))).astype(np.float32)
    return np.concatenate([normal[:600], cluster[:30]]), normal[600:], cluster[30:]


def test_the_max_consensus_sees_what_one_member_sees_and_the_mean_dilutes(tmp_path):
    """Held-out rows of a contaminating cluster: the k=5 kNN learned them as normal, the wide
    kNN did not. The maximum of the standardized scores keeps the wide kNN's verdict; in the
    mean the blind member pulls them back among the normal rows. The exported graph of the max
    consensus scores as the fitted one does."""
    train_rows, normal, anomalies = contaminated_by_a_cluster(0)
    knn = create_detector("knn").fit(train_rows)
    wide = create_detector("knn_wide", k_fraction=0.1).fit(train_rows)
    assert np.median(knn.score(anomalies)) < np.median(knn.score(normal))  # masked
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalies))]
    rows = np.concatenate([normal, anomalies])
    auroc = {}
    for combine in ("max", "mean"):
        consensus = Ensemble.from_fitted([knn, wide], normal[:50], combine)
        auroc[combine] = roc_auc_score(labels, consensus.score(rows))
    assert auroc["max"] > 0.95 and auroc["mean"] < 0.8  # (seed 0: 0.98 and 0.72)
    consensus = Ensemble.from_fitted([knn, wide], normal[:50], "max")
    export_onnx(consensus.scoring_module(), 1.0, rows[:2], tmp_path / "max.onnx")
    session = ort.InferenceSession(str(tmp_path / "max.onnx"), providers=["CPUExecutionProvider"])
    (scores,) = session.run([SCORE_NAME], {session.get_inputs()[0].name: rows})
    np.testing.assert_allclose(scores, consensus.score(rows), rtol=1e-4, atol=1e-4)


def test_an_unknown_combination_rule_is_refused_early():
    with pytest.raises(ValueError, match=r"combine must be one of \('mean', 'max'\), got 'median'"):
        Ensemble(members=["knn", "iforest"], combine="median")
    with pytest.raises(ValueError, match="consensus_combine"):
        TrainParams(consensus_combine="median")


def test_a_candidate_with_non_finite_validation_scores_cannot_win(caplog):
    """A NaN or inf on a held-out row leaves no threshold to set: the metric is NaN, with or
    without labels, so `select_winner` and the ensemble pass the candidate over; the warning
    names the candidate."""
    val_X = np.random.default_rng(0).normal(size=(60, 3))
    labels = np.r_[np.zeros(50), np.ones(10)]

    def broken(X: np.ndarray) -> np.ndarray:
        scores = np.abs(X).sum(axis=1)
        scores[0] = np.inf if len(X) == len(val_X) else scores[0]
        return scores

    for val_y in (None, labels):
        name, metric = validation_metric(broken, val_X, val_y, seed=0, candidate="broken")
        assert np.isnan(metric), (name, metric)
    assert "broken: 1 of 60 validation scores are NaN or infinite" in caplog.text
    results = results_for(["broken", "fine"], [float("nan"), 0.6])
    assert select_winner(results).name == "fine"


def test_an_infinite_score_on_a_synthetic_anomaly_ranks_it_first():
    """An overflowing score on a far-out synthetic row is a sound ranking, not a failure."""
    val_X = np.random.default_rng(0).normal(size=(80, 3))

    def overflowing(X: np.ndarray) -> np.ndarray:
        scores = np.abs(X).sum(axis=1)
        return scores if X is val_X else np.where(scores > 0, np.inf, scores)

    assert synthetic_auroc(overflowing, val_X, seed=0, kind="global") == 1.0
    name, metric = validation_metric(overflowing, val_X, None, seed=0)
    assert metric == 1.0


def test_a_consensus_with_non_finite_validation_scores_gives_way(unlabelled):
    """A validation row at 1e20 overflows the standardized kNN member's float32 distances: its
    metric, and the consensus', are NaN, so the best finite validation metric wins and says
    why (the synthetic anomalies made from such rows stay finite: they are drawn in float64)."""
    fit_rows, val = unlabelled
    extreme = val.X.copy()
    extreme[0, 0] = 1e20
    params = TrainParams(candidates=["iforest", "knn", "knn_wide", "pca"])
    _, results, winner = train.fit_candidates(fit_rows, Split(extreme, None, val.ids), params)
    metrics = {r.name: r.metric for r in results}
    assert np.isnan(metrics["knn"]) and np.isnan(metrics[CONSENSUS]), metrics
    assert winner.name not in ("knn", CONSENSUS) and np.isfinite(winner.metric)
    assert winner.metric == max(m for m in metrics.values() if np.isfinite(m))
    assert "the consensus' validation scores are not all finite" in winner.extra["selection"]
