"""What every torch detector shares: settings, preprocessing, training, fitted state."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from normalcy.detectors.attribution import explained_by_leaving_features_out
from normalcy.detectors.base import (
    Detector,
    FitData,
    require_fitted,
    saved_parts,
    under_prefix,
)
from normalcy.detectors.networks import ScoringModule
from normalcy.detectors.preprocessing import fit_preprocessing, load_preprocessing, output_shape
from normalcy.detectors.specs import parse_preprocessing
from normalcy.detectors.training import (
    LossTrimming,
    Rows,
    TrainingHistory,
    epoch_batches,
    forward_data,
    seed_everything,
    train_network,
)
from normalcy.threads import checked_threads, count_parameters, torch_threads, training_threads


class TorchDetector(Detector):
    """A method supplies `build_network`, `loss` and `score_head`; this class does the rest.

    `preprocessing` (see `detectors.preprocessing`) is the first layer of the scoring graph,
    fitted on the training rows and applied per training batch. What a method learns beyond
    its networks' weights is named in `fitted_attributes` (tensors, numbers, or modules that
    `build_fitted_module` rebuilds), which is all persistence needs."""

    # Attributes set by fit besides `preprocess` and `network`: saved and restored by name.
    fitted_attributes: ClassVar[tuple[str, ...]] = ()
    # A method whose score does not split over input features sets this: with the
    # `leave_feature_out` param its graph then adds `feature_contributions` by leave-feature-out
    # (see `detectors.attribution`), replacing a feature by `feature_baseline`, the preprocessed
    # training mean that `fit` keeps. Opt-in: it costs d + 1 score passes per row.
    explains_by_leaving_features_out: ClassVar[bool] = False
    # A method whose `loss` returns one loss per row `[N]` (not their mean) sets this: then
    # `trim_fraction` can leave each batch's worst-fitted rows out (`training.LossTrimming`).
    loss_per_row: ClassVar[bool] = False

    def __init__(
        self,
        epochs: int = 40,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-6,
        patience: int = 8,
        seed: int = 0,
        preprocessing: str | Mapping[str, Any] = "standardize",
        threads: int | None = None,
        leave_feature_out: bool = False,
        trim_fraction: float = 0.0,
        trim_after: int = 5,
    ) -> None:
        parse_preprocessing(preprocessing)  # an unknown kind fails here, before any work
        self.trimming = LossTrimming(trim_fraction, trim_after)  # checks both
        if trim_fraction > 0 and not self.loss_per_row:
            raise ValueError(
                f"{self.name}: trim_fraction needs a training loss per row, and {self.name}'s "
                "training loss is not one (it couples a batch's rows or has its own loop); "
                "leave trim_fraction at 0"
            )
        self.trim_fraction, self.trim_after = trim_fraction, trim_after
        self.threads = checked_threads(self.name, threads)
        self.leave_feature_out = leave_feature_out
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.patience = patience
        self.seed = seed
        self.preprocessing = preprocessing
        self.preprocess: nn.Module | None = None
        self.network: nn.Module | None = None
        self.network_input_shape: tuple[int, ...] | None = None
        self.history: TrainingHistory | None = None
        self.generator: torch.Generator | None = None
        self.train_labels: np.ndarray | None = None  # only for `uses_labels` methods
        self.val_labels: np.ndarray | None = None
        self.feature_baseline: torch.Tensor | None = None

    @abstractmethod
    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """The method's trainable network for preprocessed rows of `input_shape`."""

    @abstractmethod
    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Training loss of a preprocessed batch: its mean, or (with `loss_per_row`) one loss
        per row `[N]`, which the training loop averages or trims."""

    @abstractmethod
    def score_head(self) -> nn.Module:
        """Preprocessed input -> `Prediction` (or a score `[N]`)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Hook after each training epoch (Deep SVDD's soft-boundary radius update)."""

    def before_training(self, train: Dataset) -> None:
        """Hook for methods that fix something from the untrained network (Deep SVDD's c)."""

    def rows(self, data: np.ndarray, *aligned: Any) -> Rows:
        """`data` as a dataset of preprocessed batches (with `aligned` arrays beside them)."""
        return Rows(data, *aligned, transform=self.preprocess)

    def forward_data(self, function: Callable[[Any], Any], data: Dataset) -> Any:
        """`function` over every batch of `data`, in order, without gradients, joined."""
        return forward_data(function, data)

    def loop_settings(self, description: str) -> dict[str, Any]:
        """This detector's training settings as the training loops' keyword arguments."""
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "patience": self.patience,
            "generator": self.generator,
            "description": description,
        }

    def fit_network(
        self,
        network: nn.Module,
        loss: Callable[[Any], torch.Tensor],
        train: Dataset,
        val: Dataset | None,
        *,
        description: str,
        **overrides: Any,
    ) -> TrainingHistory:
        """The shared loop with this detector's settings (`overrides` win): for the main
        network and for auxiliary ones (pretraining, a background model, an encoder)."""
        settings = {**self.loop_settings(description), **overrides}
        return train_network(network, loss, train, val, **settings)

    def train_network(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        """Fit `self.network` on the preprocessed datasets; methods with several optimizers
        (GANs) or a closed-form step (DAGMM's GMM) override this and reuse training.py."""
        return self.fit_network(
            self.network,
            self.loss,
            train,
            val,
            description=self.name,
            on_epoch_end=self.on_epoch_end,
            trimming=self.trimming,
        )

    def _fit(self, data: FitData) -> None:
        self.generator = seed_everything(self.seed)
        self.preprocess = fit_preprocessing(self.preprocessing, data.train)
        self.val_labels, self.train_labels = data.val_labels, data.train_labels
        self.network_input_shape = output_shape(self.preprocess, data.train.shape[1:])
        self.network = self.build_network(self.network_input_shape)
        train_rows = self.rows(data.train)
        if self.explains_by_leaving_features_out:
            self.feature_baseline = mean_row(train_rows)
        n_threads = training_threads(count_parameters(self.network), self.threads)
        with torch_threads(n_threads):
            self.before_training(train_rows)
            val_rows = self.rows(data.val) if data.val is not None else None
            self.history = self.train_network(train_rows, val_rows)

    def scoring_module(self) -> ScoringModule:
        head = self.score_only_module().head
        if self.explains_by_leaving_features_out and self.leave_feature_out:
            head = explained_by_leaving_features_out(head, self.feature_baseline)
        return ScoringModule(self.preprocess, head).eval()

    def score_only_module(self) -> ScoringModule:
        require_fitted(self.name, "scoring_module()", self.preprocess, self.network)
        return ScoringModule(self.preprocess, self.score_head()).eval()

    def build_fitted_module(self, name: str) -> nn.Module:
        """An auxiliary module named in `fitted_attributes`, untrained, to load weights into."""
        raise NotImplementedError(f"{self.name}: no way to rebuild fitted module {name!r}")

    def fitted_state(self) -> dict[str, torch.Tensor]:
        require_fitted(self.name, "saving", self.preprocess, self.network)
        extras = {}
        for name in (*self.fitted_attributes, "feature_baseline"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, nn.Module | torch.Tensor):
                value = torch.tensor(float(value), dtype=torch.float64)  # a number, 0-d float64
            if value is not None:
                extras[name] = value
        return saved_parts(preprocess=self.preprocess, network=self.network, **extras)

    def load_fitted_state(
        self, state: dict[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> None:
        self.preprocess = load_preprocessing(self.preprocessing, input_shape, state)
        self.network_input_shape = output_shape(self.preprocess, input_shape)
        self.network = self.build_network(self.network_input_shape)
        self.network.load_state_dict(under_prefix("network", state))
        self.network.eval()
        for name in (*self.fitted_attributes, "feature_baseline"):
            if name in state:
                value = state[name]
                setattr(self, name, value.item() if value.dim() == 0 else value)
            elif under_prefix(name, state):
                module = self.build_fitted_module(name)
                module.load_state_dict(under_prefix(name, state))
                setattr(self, name, module.eval())
        self.input_shape = tuple(input_shape)


def mean_row(rows: Rows, batch_size: int = 4096) -> torch.Tensor:
    """The mean preprocessed row, flattened `[d]` (float64 sums, batch by batch)."""
    total, count = None, 0
    for batch in epoch_batches(rows, batch_size):
        flat = batch.flatten(1).double()
        total = flat.sum(dim=0) if total is None else total + flat.sum(dim=0)
        count += len(flat)
    return (total / count).to(torch.float32)
