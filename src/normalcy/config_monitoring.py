"""params.yaml sections of the monitoring side: `monitor`, `recalibrate`, `schedule`.

Re-exported by normalcy.config, which builds the whole `Params` from them."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from normalcy.config_base import Section


class MonitorParams(Section):
    batch_path: str = "data/incoming/batch.csv"
    alpha: float = Field(0.01, gt=0, lt=0.5)  # false-alarm level of the whole drift decision
    cusum_allowance: float = Field(0.5, gt=0, le=5)  # CUSUM slack k, in standard deviations
    mmd: bool = True  # the MMD family on whole rows
    mmd_max_rows: int = Field(300, ge=10)  # rows of each sample the MMD uses (a seeded subsample)
    mmd_permutations: int = Field(1000, ge=1)

    @model_validator(mode="after")  # beside the keys it checks; the fields go on below
    def _check_permutations(self) -> MonitorParams:
        # five families at most share alpha; the MMD's p-value is never below 1 / (1 + B)
        needed = math.ceil(5 / self.alpha) - 1
        if self.mmd and self.mmd_permutations < needed:
            raise ValueError(
                f"monitor.mmd_permutations must be at least {needed} at monitor.alpha "
                f"{self.alpha:g} (the MMD's share is alpha / 5 and its smallest p-value "
                f"1 / (1 + permutations)); got {self.mmd_permutations}"
            )
        return self

    reference_size: int = Field(2000, ge=10)
    recalibrate_on_drift: bool = True
    retrain_on_drift: bool = False


class RecalibrateParams(Section):
    promotion: Literal["auto", "manual"] = "auto"
    min_rows: int = Field(200, ge=10)
    max_contamination: float = Field(0.2, gt=0, lt=0.5)
    max_scale_change: float = Field(4.0, gt=1)


class ScheduleParams(Section):
    monitor_cron: str = "0 * * * *"
    train_cron: str = "0 3 * * 0"
    timezone: str = "UTC"
