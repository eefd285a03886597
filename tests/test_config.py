import re
from pathlib import Path

import pytest

from normalcy.config import ConfigError, apply_override, load_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_yaml_is_valid_and_complete():
    params = load_params(PARAMS)
    assert params.calibration.target_fpr == 0.01
    assert {"autoencoder", "deep_svdd", "ensemble"} <= set(params.train.candidates)
    assert params.validate_.range_tolerance == 0.1
    assert "train.epochs" in params.flat()


def test_set_overrides_any_key_with_yaml_values():
    params = load_params(
        PARAMS, ["train.epochs=5", "data.normal_digits=[0, 1]", "clean.top_fraction=null"]
    )
    assert params.train.epochs == 5
    assert params.data.normal_digits == [0, 1]
    assert params.clean.top_fraction is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochs=-3", "train.epochs: Input should be greater than or equal to 1"),
        ("train.epochs=many", "train.epochs"),
        ("train.epochz=3", "train.epochz: unknown key"),
        ("calibration.target_fpr=0.9", "calibration.target_fpr"),
        ("train.candidates=[autoencoder, no_such_method]", "unknown detector 'no_such_method'"),
        ("clean.detector=nope", "clean.detector: unknown detector 'nope'"),
        (
            "train.consensus_members=[iforest, knnn]",
            "train.consensus_members: unknown detector 'knnn'",
        ),
        ("train.consensus_combine=median", "train.consensus_combine"),
        ("data.source=excel", "data.source"),
        ("data.source=csv", "data.path is required"),
        ("prepare.val_fraction=0.75", "prepare.val_fraction + prepare.test_fraction"),
        ("monitor.alpha=0", "monitor.alpha: Input should be greater than 0"),
        ("monitor.alpha=0.5", "monitor.alpha: Input should be less than 0.5"),
        ("monitor.fdr=0.05", "monitor.fdr: unknown key"),
    ],
)
def test_bad_params_name_the_key_path(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, [override])
    assert fragment in str(info.value)


def test_bad_yaml_file_and_bad_override_syntax(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(broken)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.detectors.knn.preprocessing=[]", "an empty list"),
        ("train.detectors.knn.preprocessing=[none, bogus]", "unknown preprocessing 'bogus'"),
        ("clean.detector_params.preprocessing=[none]", "only for train.detectors.NAME"),
        ("train.detectors.iforest.preprocessing=[none, minmax]", "preprocessing"),
    ],
)
def test_bad_preprocessing_choices_are_refused_before_any_work(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_params(tmp_path / "absent.yaml", [override])


def test_a_list_of_preprocessings_is_accepted_for_a_candidate(tmp_path):
    params = load_params(
        tmp_path / "absent.yaml", ["train.detectors.knn.preprocessing=[none, robust]"]
    )
    assert params.train.detectors["knn"]["preprocessing"] == ["none", "robust"]


def test_cleaning_knn_k_fraction_is_checked_before_any_work():
    wide = ["clean.detector=knn", "clean.detector_params={k_fraction: 0.05, preprocessing: minmax}"]
    assert load_params(PARAMS, wide).clean.detector_params["k_fraction"] == 0.05
    with pytest.raises(ConfigError, match=r"clean\.detector_params\.k_fraction"):
        load_params(PARAMS, ["clean.detector=knn", "clean.detector_params={k_fraction: 1.5}"])
