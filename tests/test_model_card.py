"""The model card and the readable metadata summary: pure functions of the ONNX metadata."""

from __future__ import annotations

import re

from normalcy.model_card import model_card

META = {
    "model_name": "fraud",
    "model_version": 3,
    "detector": "autoencoder",
    "detector_params": {"hidden_dims": [128, 64], "latent_dim": 8},
    "input": {
        "name": "input",
        "dtype": "float32",
        "shape": ["N", 10],
        "feature_names": [f"f{i}" for i in range(10)],
    },
    "outputs": [
        {"name": "score", "dtype": "float32", "shape": ["N"]},
        {"name": "is_anomaly", "dtype": "bool", "shape": ["N"]},
        {"name": "p_value", "dtype": "float32", "shape": ["N"]},
    ],
    "threshold": 0.123456789,
    "target_fpr": 0.01,
    "n_calibration_scores": 180,
    "n_p_value_scores": 180,
    "data_version": "abc123.dir",
    "mlflow_run_id": "run42",
    "normalcy_version": "0.1.0",
    "opset": 18,
}
METRICS = {"test_auroc": 0.987654, "test_auprc": 0.91, "selection_metric": "val_auprc"}
DATA = {
    "source": "csv",
    "path": "/data/tx.csv",
    "rows": {"train": 900, "val": 200, "test": 200},
    "anomaly_share": {"val": 0.1, "test": 0.1},
    "removed_by_cleaning": 12,
}


def test_card_has_every_section_and_the_numbers() -> None:
    card = model_card(META, METRICS, DATA)
    headings = re.findall(r"^#+ (.+)$", card, flags=re.M)
    assert headings == [
        "Model card: fraud v3",
        "What it is for",
        "Data",
        "Metrics",
        "Limits",
        "How to score it",
    ]
    for text in (
        "An anomaly detector (`autoencoder`)",
        "score > 0.123457",
        "1.00%",
        "180 held-out normal scores",
        "`abc123.dir`",
        "| test rows | 200, 10.0% labelled anomalous |",
        "| training rows removed by cleaning | 12 |",
        "| test_auroc | 0.987654 |",
        "| selection_metric | val_auprc |",
        "f0, f1, f2, f3, f4, f5, f6, f7, ... (10 in all)",
        "hidden_dims=[128, 64], latent_dim=8",
        "smallest possible value is 0.0055",
        "`run42`",
        "| `p_value` | float32 [N] |",
        "score, is_anomaly, p_value = session.run(",
        "['score', 'is_anomaly', 'p_value'], {'input': np.asarray(X, dtype=np.float32)}",
    ):
        assert text in card, text
    assert "INT8" not in card and card.endswith("\n")


def test_card_for_an_int8_recalibrated_image_model() -> None:
    meta = {
        **META,
        "quantized": "int8",
        "recalibrated_from_version": 2,
        "input": {"name": "input", "dtype": "float32", "shape": ["N", 1, 8, 8]},
        "outputs": [
            *META["outputs"],
            {"name": "anomaly_map", "dtype": "float32", "shape": ["N", 8, 8]},
        ],
    }
    card = model_card(meta)
    assert "# Model card: fraud v3 (INT8)" in card
    assert "Recalibrated from version 2" in card
    assert "This is the INT8 version" in card
    assert "`anomaly_map`: where in the image" in card
    assert "No metrics were recorded" in card
    assert "features" not in card.split("## Data")[1].split("## Metrics")[0]


def test_card_tolerates_missing_keys() -> None:
    legacy = {"detector": "deep_svdd", "threshold": 1.5, "outputs": ["score", "is_anomaly"]}
    card = model_card(legacy)
    assert "unregistered model (no registry version)" in card
    assert "p_value" not in card.split("## Limits")[0]


def test_card_shows_the_promotion_decision_and_its_evidence() -> None:
    promotion = {
        "promotion_decision": "not_promoted",
        "promotion_reason": "The challenger does not beat the champion version 2.",
        "promotion_metric_delta_interval": "-0.01..0.02",
    }
    card = model_card(META, METRICS, DATA, promotion)
    headings = re.findall(r"^## (.+)$", card, flags=re.M)
    assert headings.index("Promotion") == headings.index("Metrics") + 1
    assert "| decision | not_promoted |" in card
    assert "| metric_delta_interval | -0.01..0.02 |" in card
    assert "does not beat the champion version 2" in card
    assert "## Promotion" not in model_card(META, METRICS, DATA)


def test_card_says_how_to_read_the_explanations_when_the_graph_has_them() -> None:
    def with_outputs(detector: str, *names: str) -> dict:
        extra = [{"name": name, "dtype": "float32", "shape": ["N", 10]} for name in names]
        return {**META, "detector": detector, "outputs": [*META["outputs"], *extra]}

    card = model_card(with_outputs("autoencoder", "feature_contributions"), METRICS, DATA)
    explained = card.split("## Explanations")[1]
    assert "`feature_contributions` [N, d]" in explained
    assert "squared reconstruction error" in explained and "--explain K" in explained
    svdd = model_card(with_outputs("deep_svdd", "feature_contributions"), METRICS, DATA)
    assert "set to its training mean" in svdd.split("## Explanations")[1]
    older = model_card(with_outputs("memae", "feature_errors", "nearest_row"), METRICS, DATA)
    assert "`feature_errors` [N, d]" in older and "nearest stored normal row" in older
    goad = model_card(with_outputs("goad", "transformation_log_probs"), METRICS, DATA)
    assert "log p(m | T_m x) for each random transformation" in goad
    assert "## Explanations" not in model_card(META, METRICS, DATA)
