"""Pydantic models of params.yaml: a wrong key, type or range fails early, naming its path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from normalcy.config_base import ConfigError, Section
from normalcy.config_monitoring import MonitorParams, RecalibrateParams, ScheduleParams

if TYPE_CHECKING:
    from normalcy.retry import RetryPolicy

__all__ = ["ConfigError", "MonitorParams", "RecalibrateParams", "ScheduleParams"]
_Section = Section


DEFAULT_IMAGE_SIZE = 256


class DataParams(_Section):
    source: Literal["sklearn_digits", "npz", "csv", "parquet", "mvtec"] = "sklearn_digits"
    path: str | None = None
    # mvtec: `path` is one category folder in the MVTec-AD layout (see normalcy.data.mvtec)
    image_size: int | None = Field(None, ge=8, le=4096)  # pixels a side; mvtec default 256
    channels: Literal[1, 3] | None = None  # mvtec: None keeps what is stored
    validation_path: str | None = None  # mvtec: a folder of labelled images for validation
    feature_columns: list[str] | None = None
    label_column: str | None = None
    id_column: str | None = None
    time_column: str | None = None
    group_column: str | None = None
    window_dir: str | None = None
    normal_digits: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    anomaly_fraction: float = Field(0.1, gt=0, lt=1)
    as_images: bool = False

    @model_validator(mode="after")
    def _check_source(self) -> DataParams:
        if self.source != "sklearn_digits" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if not self.normal_digits or any(d < 0 or d > 9 for d in self.normal_digits):
            raise ValueError("data.normal_digits must be a non-empty list of digits 0-9")
        if len(set(self.normal_digits)) == 10:
            raise ValueError("data.normal_digits lists all ten digits: nothing is left as anomaly")
        image_keys = ("image_size", "channels", "validation_path")
        given = [key for key in image_keys if getattr(self, key) is not None]
        if self.source != "mvtec" and given:
            raise ValueError(
                f"data.{given[0]} applies to image folders only (data.source: mvtec); "
                f"data.source is {self.source!r}"
            )
        if self.source == "mvtec" and self.window_dir is not None:
            raise ValueError(
                "data.window_dir folds tabular batches into training; it does not apply to "
                "data.source mvtec (add images to train/good instead)"
            )
        return self

    @property
    def loaded_image_size(self) -> int:
        """The side length images are resized to on loading (mvtec)."""
        return self.image_size or DEFAULT_IMAGE_SIZE


class PrepareParams(_Section):
    split: Literal["random", "time", "group"] = "random"
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    train_contamination: float | None = Field(0.03, ge=0, lt=1)
    output_dir: str = "data/prepared"

    @model_validator(mode="after")
    def _check_fractions(self) -> PrepareParams:
        held_out = self.val_fraction + self.test_fraction + self.holdout_fraction
        if held_out >= 0.9:
            raise ValueError(
                "prepare.val_fraction + prepare.test_fraction + prepare.holdout_fraction must be "
                f"below 0.9 (got {held_out:.2f}), leaving data to train on"
            )
        return self


class RetryParams(_Section):
    """How I/O that fails for a moment is retried (normalcy.retry)."""

    attempts: int = Field(4, ge=1, le=20)  # tries in all, the first included (1: no retry)
    base_delay_s: float = Field(1.0, ge=0)  # wait before the second try; doubles each time
    max_delay_s: float = Field(30.0, ge=0)  # cap on one wait

    def policy(self) -> RetryPolicy:
        from normalcy.retry import RetryPolicy

        return RetryPolicy(self.attempts, self.base_delay_s, self.max_delay_s)


class VersioningParams(_Section):
    enabled: bool = True
    remote_name: str = "local"
    remote_url: str = ".dvc-remote"
    retry: RetryParams = Field(default_factory=RetryParams)  # of `dvc push`


class ValidateParams(_Section):
    range_tolerance: float = Field(0.1, ge=0)
    range_mostly: float = Field(0.95, gt=0, le=1)
    min_rows: int = Field(1, ge=1)
    report_path: str = "artifacts/validation_report.json"


class CleanParams(_Section):
    enabled: bool = True
    detector: str = "knn_wide"
    detector_params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    max_iter: int = Field(6, ge=1)
    mad_threshold: float = Field(2.5, gt=0)
    top_fraction: float | None = Field(None, gt=0, lt=0.5)
    epochs: int = Field(15, ge=1)
    threads: int | None = Field(None, ge=1)  # null: normalcy.threads' rule
    log_path: str = "artifacts/cleaning_log.json"


class ParallelParams(_Section):
    """How candidates are fitted: one after another, or as Prefect tasks on a Dask cluster."""

    backend: Literal["sequential", "dask"] = "sequential"
    workers: int | None = Field(None, ge=1)  # dask local cluster: processes (null: usable CPUs)
    scheduler_address: str | None = Field(None, pattern=r"^([a-z]+://)?[^\s:/]+:\d+$")
    connect_timeout_s: float = Field(10.0, gt=0)  # dask: give up on the scheduler after this

    @model_validator(mode="after")
    def _check_backend(self) -> ParallelParams:
        given = [key for key in ("workers", "scheduler_address") if getattr(self, key) is not None]
        if self.backend == "sequential" and given:
            raise ValueError(f"train.parallel.{given[0]} applies to backend dask only")
        if len(given) == 2:
            raise ValueError(
                "train.parallel.workers sizes the local cluster; with scheduler_address the "
                "remote cluster's workers are used: give one of them"
            )
        return self


class TrainParams(_Section):
    seed: int = 0
    candidates: list[str] = Field(
        default_factory=lambda: ["autoencoder", "deep_svdd"], min_length=1
    )
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    patience: int = Field(8, ge=1)
    threads: int | None = Field(None, ge=1)  # null: normalcy.threads' rule
    ensemble_top_k: int = Field(3, ge=2)
    # Without validation labels: keep the consensus of these fitted candidates unless another
    # beats it on every synthetic anomaly type beyond noise (`best_validation`: plain argmax).
    selection: Literal["consensus", "best_validation"] = "consensus"
    consensus_members: list[str] = Field(
        default_factory=lambda: ["iforest", "knn", "knn_wide"], min_length=2
    )
    consensus_combine: Literal["mean", "max"] = "max"
    selection_margin: float = Field(0.05, ge=0)
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    parallel: ParallelParams = Field(default_factory=ParallelParams)


class EvaluateParams(_Section):
    metrics_path: str = "artifacts/metrics.json"
    plots_dir: str = "artifacts/plots"


class CalibrationParams(_Section):
    mode: Literal["target_fpr", "alert_budget", "min_cost"] = "target_fpr"
    target_fpr: float = Field(0.01, gt=0, lt=0.5)
    alert_budget: float | None = Field(None, gt=0)
    rows_per_period: float | None = Field(None, gt=0)
    cost_false_alarm: float = Field(1.0, gt=0)
    cost_miss: float = Field(10.0, gt=0)
    expected_anomaly_rate: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _check_mode(self) -> CalibrationParams:
        if self.mode == "alert_budget":
            if self.alert_budget is None or self.rows_per_period is None:
                raise ValueError(
                    "calibration.mode alert_budget needs calibration.alert_budget (alerts per "
                    "period) and calibration.rows_per_period (rows scored per period)"
                )
            if self.alert_budget >= self.rows_per_period:
                raise ValueError(
                    f"calibration.alert_budget={self.alert_budget:g} must be below "
                    f"calibration.rows_per_period={self.rows_per_period:g}"
                )
        return self


class PromotionParams(_Section):
    confidence: float = Field(0.9, gt=0.5, lt=1)
    n_bootstrap: int = Field(1000, ge=100)
    min_gain: float = Field(0.0, gt=-1, lt=1)
    alert_rate_tolerance: float = Field(0.5, gt=0)


class ExportParams(_Section):
    path: str = "artifacts/model.onnx"
    opset: int = Field(18, ge=17)
    parity_max_abs: float = Field(1e-4, gt=0)
    parity_max_rel: float = Field(1e-3, gt=0)
    parity_min_agreement: float = Field(1.0, gt=0, le=1)
    max_calibration_scores: int = Field(5000, ge=1)
    quantize: bool = False
    quantized_max_rel: float = Field(0.1, gt=0)
    quantized_min_spearman: float = Field(0.99, ge=-1, le=1)
    quantized_min_agreement: float = Field(0.99, gt=0, le=1)


class MlflowParams(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "normalcy"
    model_name: str = "normalcy"
    retry: RetryParams = Field(default_factory=RetryParams)  # of logging and registration


class ScoringParams(_Section):
    """`normalcy score` / `normalcy serve`: onnxruntime session settings and batch sizes."""

    chunk_rows: int = Field(65536, ge=1)
    max_request_rows: int = Field(10000, ge=1)
    intra_op_threads: int | None = Field(None, ge=1)
    inter_op_threads: int = Field(1, ge=1)
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = False  # idle onnxruntime threads busy-wait (see SessionSettings)
    reload_interval_s: float = Field(30.0, gt=0)
    max_request_bytes: int = Field(16 * 2**20, ge=1)
    workers: int = Field(1, ge=1)
    batch_window_ms: float | None = Field(None, ge=0)  # null: no micro-batching
    batch_max_rows: int = Field(256, ge=1)
    batch_queue: int = Field(1024, ge=1)


class Params(_Section):
    data: DataParams = Field(default_factory=DataParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    versioning: VersioningParams = Field(default_factory=VersioningParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    clean: CleanParams = Field(default_factory=CleanParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)
    promotion: PromotionParams = Field(default_factory=PromotionParams)
    export: ExportParams = Field(default_factory=ExportParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams)
    recalibrate: RecalibrateParams = Field(default_factory=RecalibrateParams)
    schedule: ScheduleParams = Field(default_factory=ScheduleParams)
    scoring: ScoringParams = Field(default_factory=ScoringParams)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check_window(self) -> Params:
        if self.monitor.retrain_on_drift and self.data.window_dir is None:
            raise ValueError(
                "monitor.retrain_on_drift needs data.window_dir, the folder that vetted batches "
                "are folded into before retraining"
            )
        return self

    @model_validator(mode="after")
    def _check_split_columns(self) -> Params:
        key = {"time": "time_column", "group": "group_column"}.get(self.prepare.split)
        if key is not None:
            column = getattr(self.data, key)
            if column is None or self.data.source not in ("csv", "parquet"):
                raise ValueError(
                    f"prepare.split {self.prepare.split!r} needs data.{key}, a column of a csv "
                    f"or parquet source (got data.source {self.data.source!r}, data.{key} "
                    f"{column!r})"
                )
        return self

    @model_validator(mode="after")
    def _check_detectors(self) -> Params:
        problems = detector_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def flat(self) -> dict[str, Any]:
        """Every leaf as 'section.key' -> value, for MLflow params."""
        return _flatten(self.model_dump(by_alias=True))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def detector_problems(params: Params) -> list[str]:
    """'path: what is wrong' for every detector name and detector param of `params`: candidate
    and consensus member names, `clean.detector`, every key under `train.detectors.NAME` and
    `clean.detector_params` (names, types, ranges, from the torch-free specs; no network is
    built, torch not imported)."""
    from normalcy.detectors.registry import known_detectors, param_problems

    known = known_detectors()
    named = [("train.candidates", name) for name in params.train.candidates]
    named.append(("clean.detector", params.clean.detector))
    named += [(f"train.detectors.{name}", name) for name in params.train.detectors]
    named += [("train.consensus_members", name) for name in params.train.consensus_members]
    problems = [
        f"{where}: unknown detector {name!r}; expected one of {known}"
        for where, name in named
        if name not in known
    ]
    others = [name for name in params.train.candidates if name != "ensemble"]
    if "ensemble" in params.train.candidates and len(others) < 2:
        problems.append(
            f"train.candidates: 'ensemble' combines the other candidates, so it needs at "
            f"least 2 others; got {others}"
        )
    sections = [
        (f"train.detectors.{name}", name, given) for name, given in params.train.detectors.items()
    ]
    sections.append(("clean.detector_params", params.clean.detector, params.clean.detector_params))
    for where, name, given in sections:
        if name in known:
            choice_problems = preprocessing_choice_problems(where, given)
            if choice_problems:  # said once; the other params are still checked
                problems += choice_problems
                given = {key: value for key, value in given.items() if key != "preprocessing"}
            for variant in preprocessing_variants(given):
                problems += [f"{where}.{p.path}: {p.text}" for p in param_problems(name, variant)]
    return list(dict.fromkeys(problems))  # a problem shared by every variant is said once


def preprocessing_variants(given: dict[str, Any]) -> list[dict[str, Any]]:
    """A detector's params once per `preprocessing` choice when that key is a list (the train
    step picks one on validation data), else as given."""
    choices = given.get("preprocessing")
    if not isinstance(choices, list) or not choices:
        return [given]
    return [{**given, "preprocessing": choice} for choice in choices]


def preprocessing_choice_problems(where: str, given: dict[str, Any]) -> list[str]:
    """A list of preprocessing choices must be non-empty, for a candidate (only the train step
    chooses), and for a detector that has the param at all."""
    choices = given.get("preprocessing")
    if not isinstance(choices, list):
        return []
    if not choices:
        return [f"{where}.preprocessing: an empty list; expected a preprocessing or a list of them"]
    if not where.startswith("train.detectors."):
        return [f"{where}.preprocessing: a list of choices is only for train.detectors.NAME"]
    return []


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set 'a.b.c=value' in a nested dict; the value is parsed as YAML (so 5, [0,1], null work),
    or kept as text when it is not YAML; the pydantic models then check its type."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw_value = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        node[parts[-1]] = raw_value  # not YAML (e.g. a cron like */15 * * * *): keep the text


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "value_error" and not err["loc"]:
            lines.extend(f"  - {line}" for line in str(err["ctx"]["error"]).splitlines())
            continue
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see params.yaml for the keys)"
        elif "input" in err and err["type"] != "value_error":
            message = f"{message} (got {err['input']!r})"
        lines.append(f"  - {path}: {message}")
    return "\n".join(lines)


def params_from_dict(tree: dict[str, Any], source: str = "params") -> Params:
    """Validate a params tree; raises ConfigError listing every wrong key path."""
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def read_params_tree(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The params file as a tree with `--set key=value` overrides applied, not yet validated.

    A missing `params.yaml` (the default name) means the defaults; any other missing file is an
    error unless overrides alone are given."""
    path = Path(path)
    if path.exists():
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    elif not overrides and str(path) != "params.yaml":
        raise ConfigError(f"params file {path} does not exist")
    else:
        tree = {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return tree


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply `--set key=value` overrides, and validate the result."""
    tree = read_params_tree(path, overrides)
    source = f"{path}" + (" with --set overrides" if overrides else "")
    return params_from_dict(tree, source)


class ServingParams(BaseModel):
    """Only what `score`/`serve`/`inspect` read; other sections are ignored, so a scoring host
    is not held to the training sections."""

    model_config = ConfigDict(extra="ignore")
    scoring: ScoringParams = Field(default_factory=ScoringParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)


def load_serving_params(
    path: str | Path = "params.yaml", overrides: list[str] | None = None
) -> ServingParams:
    """The `scoring` and `mlflow` sections of the params file, validated, without torch."""
    tree = read_params_tree(path, overrides)
    try:
        return ServingParams.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
