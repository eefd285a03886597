"""The torch-free detector specs agree with the constructors, and params.yaml errors about
detectors are caught by `load_params` (naming the key path and what is expected) without torch."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normalcy.detectors import accepted_params, available_detectors, create_detector
from normalcy.detectors.registry import PACKAGE, _factory
from normalcy.detectors.specs import describe, spec_for, spec_names

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def builtin_detectors() -> list[str]:
    """Registered names whose class lives in normalcy (tests may register toys of their own)."""
    return [
        name
        for name in available_detectors()
        if _factory(name).__module__.startswith(f"{PACKAGE}.")
    ]


def constructor_defaults(name: str) -> dict:
    """Each accepted param's default, from the first class in the MRO that declares it."""
    defaults: dict = {}
    for cls in inspect.getmro(_factory(name)):
        if "__init__" in vars(cls) and cls is not object:
            for param in inspect.signature(cls.__init__).parameters.values():
                if param.default is not inspect.Parameter.empty:
                    defaults.setdefault(param.name, param.default)
    return defaults


def plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_every_builtin_detector_has_a_spec():
    assert sorted(builtin_detectors()) == spec_names()


@pytest.mark.parametrize("name", spec_names())
def test_spec_fields_are_the_constructor_params(name):
    assert set(spec_for(name).model_fields) == set(accepted_params(name))


@pytest.mark.parametrize("name", spec_names())
def test_spec_defaults_are_the_constructor_defaults(name):
    fields = spec_for(name).model_fields
    defaults = constructor_defaults(name)
    for key in sorted(set(fields) & set(defaults)):
        assert plain(fields[key].default) == plain(defaults[key]), f"{name}.{key}"


def test_spec_choices_are_the_modules_choices():
    from normalcy.detectors.deep_svdd import OBJECTIVES
    from normalcy.detectors.flow import COUPLINGS
    from normalcy.detectors.vae import SCORINGS

    for name, field, choices in (
        ("deep_svdd", "objective", OBJECTIVES),
        ("flow", "coupling", COUPLINGS),
        ("vae", "scoring", SCORINGS),
    ):
        info = spec_for(name).model_fields[field]
        assert describe(info.annotation) == f"one of {list(choices)}"


def test_spec_preprocessing_kinds_are_the_built_kinds():
    from normalcy.detectors.preprocessing import PREPROCESSING
    from normalcy.detectors.specs import PREPROCESSING_OPTIONS

    assert set(PREPROCESSING_OPTIONS) == set(PREPROCESSING)


def test_preprocessing_is_checked_before_any_network_is_built():
    with pytest.raises(
        ValueError, match="preprocessing is invalid: unknown preprocessing 'zscore'"
    ):
        create_detector("autoencoder", preprocessing="zscore")
    with pytest.raises(ValueError, match="does not accept option 'size'"):
        create_detector("knn", preprocessing={"kind": "image", "size": 3})
    detector = create_detector("vae", preprocessing={"kind": "image", "image_size": 16})
    assert detector.preprocessing == {"kind": "image", "image_size": 16}


def test_create_detector_checks_types_and_ranges_through_the_spec():
    with pytest.raises(ValueError, match="autoencoder: latent_dim must be an integer >= 1, got -1"):
        create_detector("autoencoder", latent_dim=-1)
    with pytest.raises(ValueError, match=r"hidden_dims must be a list of integers >= 1"):
        create_detector("autoencoder", hidden_dims=[64, 0])
    with pytest.raises(ValueError, match="latent_dim must be an integer >= 1, got True"):
        create_detector("vae", latent_dim=True)
    with pytest.raises(ValueError, match=r"member_params.vae.scoring must be one of"):
        create_detector(
            "ensemble", members=["autoencoder", "vae"], member_params={"vae": {"scoring": "x"}}
        )
    assert create_detector("autoencoder", hidden_dims=(5,), latent_dim=2).hidden_dims == [5]


# Each kind of params error, as `--set` overrides, with what the message must say. Run in a
# fresh interpreter: load_params must find them all without importing torch.
TD = "train.detectors"
BAD_PARAMS = [
    (["train.candidates=[autoencoder, autoencodr]"], "train.candidates: unknown detector"),
    ([f"{TD}.autoencodr.latent_dim=3"], f"{TD}.autoencodr: unknown detector 'autoencodr'"),
    (["clean.detector=nope"], "clean.detector: unknown detector 'nope'; expected one of"),
    ([f"{TD}.autoencoder.latnt_dim=3"], f"{TD}.autoencoder.latnt_dim: is not a parameter"),
    ([f"{TD}.vae.latent_dim=eight"], f"{TD}.vae.latent_dim: must be an integer >= 1, got 'eight'"),
    (
        [f"{TD}.autoencoder.latent_dim=-1"],
        "autoencoder.latent_dim: must be an integer >= 1, got -1",
    ),
    ([f"{TD}.deep_svdd.nu=1.5"], f"{TD}.deep_svdd.nu: must be in (0, 1], got 1.5"),
    ([f"{TD}.vae.scoring=nll"], "vae.scoring: must be one of ['elbo', 'likelihood_ratio'], got"),
    ([f"{TD}.flow.hidden_dims=[64, -2]"], "flow.hidden_dims: must be a list of integers >= 1"),
    (
        [f"{TD}.knn.coreset_fraction=0.1", f"{TD}.knn.coreset_size=50"],
        f"{TD}.knn.coreset_size: must be null when coreset_fraction is set",
    ),
    (
        [
            f"{TD}.ensemble.member_params={{vae: {{latent_dim: 0}}}}",
            f"{TD}.ensemble.members=[knn, vae]",
        ],
        f"{TD}.ensemble.member_params.vae.latent_dim: must be an integer >= 1, got 0",
    ),
    ([f"{TD}.autoencoder=5"], f"{TD}.autoencoder: Input should be a valid dictionary"),
    (
        ["clean.detector=autoencoder", "clean.detector_params={latent_dim: 2.5}"],
        "clean.detector_params.latent_dim: must be an",
    ),
    (["clean.detector_params={k_fraction: 5}"], "clean.detector_params.k_fraction: must be"),
    (["clean.detector=knn", "clean.detector_params={k: 0}"], "clean.detector_params.k: must be"),
]

CHECK_WITHOUT_TORCH = """
import json, sys
from normalcy.config import ConfigError, load_params
results = []
for overrides in json.loads(sys.argv[1]):
    try:
        load_params(sys.argv[2], overrides)
        results.append(None)
    except ConfigError as exc:
        results.append(str(exc))
results.append(load_params(sys.argv[2]).train.candidates)
print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""


def test_load_params_names_every_detector_error_without_torch():
    overrides = [case for case, _ in BAD_PARAMS]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK_WITHOUT_TORCH,
            json.dumps(overrides),
            str(ROOT / "params.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    report = json.loads(done.stdout)
    assert report["torch"] is False, "checking params imported torch"
    *results, candidates = report["results"]
    assert "autoencoder" in candidates  # the repository's params.yaml itself is valid
    for (case, fragment), message in zip(BAD_PARAMS, results, strict=True):
        assert message is not None, f"{case} was accepted"
        assert fragment in message, f"{case}: {message}"


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("autoencoder", {"latent_dim": -1}),
        ("autoencoder", {"latnt_dim": 3}),
        ("deep_svdd", {"nu": 1.5}),
        ("knn", {"coreset_fraction": 0.1, "coreset_size": 50}),
        ("iforest", {"max_samples": 1}),
        ("anogan", {"betas": [0.5, 1.0]}),
    ],
)
def test_create_detector_and_load_params_refuse_the_same(name, params):
    from normalcy.config import ConfigError, load_params

    with pytest.raises(ValueError):
        create_detector(name, **params)
    overrides = [
        f"train.detectors.{name}.{key}={json.dumps(value)}" for key, value in params.items()
    ]
    with pytest.raises(ConfigError, match=f"train.detectors.{name}."):
        load_params(PARAMS, overrides)


def test_cli_refuses_a_bad_detector_param_before_any_work(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "normalcy.cli", "train", "--params", str(PARAMS)]
        + ["--set", "train.detectors.autoencoder.latent_dim=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 2
    assert "train.detectors.autoencoder.latent_dim: must be an integer >= 1, got -1" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no artifacts, no MLflow store, no prepared data
