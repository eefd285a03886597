"""What every torch detector shares: settings, standardization, training, batched scoring."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch import nn

from normalcy.detectors.base import Detector
from normalcy.detectors.networks import (
    ScoringModule,
    Standardize,
    fit_standardize,
    score_in_batches,
)
from normalcy.detectors.training import TrainingHistory, seed_everything, train_network


class TorchDetector(Detector):
    """A method supplies `build_network`, `loss` and `score_head`; this class does the rest."""

    def __init__(
        self,
        epochs: int = 40,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-6,
        patience: int = 8,
        seed: int = 0,
    ) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.patience = patience
        self.seed = seed
        self.standardize: Standardize | None = None
        self.network: nn.Module | None = None
        self.history: TrainingHistory | None = None
        self.generator: torch.Generator | None = None
        self.train_labels: np.ndarray | None = None  # only for `uses_labels` methods
        self.val_labels: np.ndarray | None = None

    @abstractmethod
    def build_network(self, n_features: int) -> nn.Module:
        """The method's trainable network for flattened inputs of `n_features`."""

    @abstractmethod
    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean training loss of a standardized batch."""

    @abstractmethod
    def score_head(self) -> nn.Module:
        """Standardized input -> score `[N]`."""

    def on_epoch_end(self, epoch: int) -> None:
        """Hook after each training epoch (Deep SVDD's soft-boundary radius update)."""

    def before_training(self, train: torch.Tensor) -> None:
        """Hook for methods that fix something from the untrained network (Deep SVDD's c)."""

    def train_network(self, train: torch.Tensor, val: torch.Tensor | None) -> TrainingHistory:
        """Fit `self.network` on standardized tensors; methods with several optimizers (GANs)
        or a closed-form step (DAGMM's GMM) override this and reuse the pieces of training.py."""
        return train_network(
            self.network,
            self.loss,
            train,
            val,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            patience=self.patience,
            generator=self.generator,
            description=self.name,
            on_epoch_end=self.on_epoch_end,
        )

    def _fit(
        self,
        train: np.ndarray,
        val: np.ndarray | None,
        val_labels: np.ndarray | None,
        train_labels: np.ndarray | None,
    ) -> None:
        self.generator = seed_everything(self.seed)
        self.standardize = fit_standardize(np.asarray(train, dtype=np.float64))
        train_t = self.standardize(torch.as_tensor(train, dtype=torch.float32))
        val_t = (
            self.standardize(torch.as_tensor(val, dtype=torch.float32)) if val is not None else None
        )
        self.val_labels, self.train_labels = val_labels, train_labels
        self.network = self.build_network(int(np.prod(train.shape[1:])))
        self.before_training(train_t)
        self.history = self.train_network(train_t, val_t)

    def scoring_module(self) -> ScoringModule:
        if self.standardize is None or self.network is None:
            raise RuntimeError(f"{self.name}: call fit() before scoring_module()")
        return ScoringModule(self.standardize, self.score_head()).eval()

    def _score(self, x: np.ndarray) -> np.ndarray:
        return score_in_batches(self.scoring_module(), x)
