"""The one training loop: seeding, mini-batches, early stopping on validation loss, progress."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a generator for shuffling and noise."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class TrainingHistory:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


class EarlyStopping:
    """Remembers the weights of the best monitored epoch; says when `patience` epochs in a row
    brought no improvement. Shared by every training loop (plain and adversarial)."""

    def __init__(self, network: nn.Module, patience: int, min_delta: float = 1e-7) -> None:
        self.network, self.patience, self.min_delta = network, patience, min_delta
        self.best, self.best_epoch, self.stale = float("inf"), 0, 0
        self.best_state = copy.deepcopy(network.state_dict())

    def should_stop(self, epoch: int, monitored: float) -> bool:
        """Record this epoch's monitored value; True when training should end."""
        if monitored < self.best - self.min_delta:
            self.best, self.best_epoch, self.stale = monitored, epoch, 0
            self.best_state = copy.deepcopy(self.network.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore_best(self) -> None:
        self.network.load_state_dict(self.best_state)
        self.network.eval()


def mean_loss(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, batch_size: int
) -> float:
    with torch.no_grad():
        total = sum(loss_fn(batch).item() * len(batch) for batch in data.split(batch_size))
    return total / max(len(data), 1)


def train_network(
    network: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    train: torch.Tensor,
    val: torch.Tensor | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    patience: int,
    generator: torch.Generator,
    description: str = "train",
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainingHistory:
    """Adam on `loss_fn(batch)` (mean over the batch); keeps the weights of the best val epoch.

    `on_epoch_end(epoch)` runs after each epoch's updates, before the validation loss (Deep
    SVDD's soft boundary refits its radius there)."""
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    history = TrainingHistory()
    stopping = EarlyStopping(network, patience)
    progress = tqdm(range(epochs), desc=description, leave=False, mininterval=1.0, disable=None)
    for epoch in progress:
        network.train()
        order = torch.randperm(len(train), generator=generator)
        running = 0.0
        for index in order.split(batch_size):
            batch = train[index]
            optimizer.zero_grad()
            loss = loss_fn(batch)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(batch)
        network.eval()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        history.train_loss.append(running / len(train))
        monitored = (
            mean_loss(loss_fn, val, batch_size) if val is not None else history.train_loss[-1]
        )
        history.val_loss.append(monitored)
        progress.set_postfix(loss=f"{history.train_loss[-1]:.4f}", val=f"{monitored:.4f}")
        stop = stopping.should_stop(epoch, monitored)
        history.best_epoch = stopping.best_epoch
        if stop:
            break
    stopping.restore_best()
    log.info(
        "%s: %d epochs, best epoch %d, val loss %.5f",
        description,
        len(history.train_loss),
        history.best_epoch,
        stopping.best,
    )
    return history
