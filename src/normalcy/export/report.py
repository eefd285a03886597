"""The parity report: torch vs an exported file, every output, and the verdict of a policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from normalcy.artifact.names import ANOMALY_MAP_NAME, DECISION_NAME, P_VALUE_NAME, SCORE_NAME

HEAD_ROLES = {SCORE_NAME: "score", DECISION_NAME: "decision", P_VALUE_NAME: "p_value"}


@dataclass
class OutputParity:
    """One output, torch vs the file: how many values differ beyond what the policy allows
    (`gated`: whether they fail the gate) and the largest differences."""

    name: str
    role: str  # score | decision | p_value | float | exact (integer/bool)
    n_values: int
    n_mismatches: int
    max_abs_diff: float
    max_rel_diff: float
    gated: bool


@dataclass
class ParityReport:
    """torch eager vs onnxruntime on the same rows, every output; `message()` is for people.

    The score, decision and p_value figures are the headline; `outputs` has every output's
    comparison by name. `figures` (shown when it passes) and `problems` (each a reason it
    failed) are written by the policy that judged it."""

    gate: str  # "ONNX" (the float graph) or "INT8"
    max_abs_diff: float
    max_rel_diff: float
    spearman: float
    is_anomaly_agreement: float
    n_rows: int
    passed: bool
    tolerances: dict
    n_score_mismatches: int = 0  # rows outside the policy's score tolerance
    n_decision_mismatches: int = 0  # rows whose is_anomaly differs
    worst_row: dict = field(default_factory=dict)
    n_p_value_mismatches: int = 0  # rows whose p_value differs more than their scores explain
    max_p_value_diff: float = 0.0
    outputs: dict[str, OutputParity] = field(default_factory=dict)
    outputs_compared: list[str] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)  # torch has them, the file not
    figures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        if self.passed:
            compared = ", ".join(self.outputs_compared)
            return f"{self.gate} parity passed on {self.n_rows} rows ({compared}): " + ", ".join(
                self.figures
            )
        return f"{self.gate} parity FAILED on {self.n_rows} rows: " + "; ".join(self.problems)

    def _map(self) -> OutputParity | None:
        return self.outputs.get(ANOMALY_MAP_NAME)

    @property
    def n_map_mismatches(self) -> int:
        """anomaly_map pixels outside the tolerances (0 without a map)."""
        return self._map().n_mismatches if self._map() else 0

    @property
    def max_map_abs_diff(self) -> float:
        return self._map().max_abs_diff if self._map() else 0.0

    @property
    def max_map_rel_diff(self) -> float:
        return self._map().max_rel_diff if self._map() else 0.0


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model; `.report` has the numbers."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(report.message())
        self.report = report


def require_parity(report: ParityReport) -> None:
    """Gate for the pipeline: a graph that does not match torch must not be registered."""
    if not report.passed:
        raise ParityError(report)
