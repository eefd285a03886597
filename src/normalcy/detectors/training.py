"""The one training loop: seeding, data through a Dataset/DataLoader, early stopping on
validation loss, progress. The adversarial loop reuses `epoch_batches` and `run_epochs`."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler
from tqdm.auto import tqdm

from normalcy.detectors.base import concatenate, inference

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a generator for shuffling and noise."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Rows(Dataset):
    """Rows of one or more arrays aligned on the first axis, read a batch of indices at a time.

    The first array is raw input (numpy, any row shape, e.g. uint8 images), turned into a float
    tensor and passed through `transform` (the detector's preprocessing) one batch at a time,
    so the preprocessed set never has to exist whole; the others (a row's kind, ...) come back
    as tensors beside it."""

    def __init__(
        self, rows: Any, *aligned: Any, transform: Callable[[torch.Tensor], Any] | None = None
    ) -> None:
        self.rows, self.aligned, self.transform = rows, aligned, transform
        for extra in aligned:
            if len(extra) != len(rows):
                raise ValueError(f"aligned arrays need {len(rows)} rows, got {len(extra)}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Sequence[int]) -> Any:
        index = list(index) if not isinstance(index, int) else [index]
        batch = torch.as_tensor(np.asarray(self.rows[index]))
        if batch.is_floating_point() or self.transform is not None:
            batch = batch.to(torch.float32)
        if self.transform is not None:
            with torch.no_grad():
                batch = self.transform(batch)
        if not self.aligned:
            return batch
        return (batch, *(torch.as_tensor(extra[index]) for extra in self.aligned))


class Permutation(Sampler):
    """One `torch.randperm` from the given generator per pass: the only draw an epoch makes."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def epoch_batches(
    data: Dataset, batch_size: int, generator: torch.Generator | None = None
) -> DataLoader:
    """Batches of `data` (shuffled by `generator`, in order without one) through a DataLoader,
    in this process (num_workers=0). The loader's own base-seed draw comes from a private
    generator, so the detector's generator and the global RNG see only the permutation."""
    order = SequentialSampler(data) if generator is None else Permutation(len(data), generator)
    return DataLoader(
        data,
        sampler=BatchSampler(order, batch_size, drop_last=False),
        batch_size=None,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )


def batch_rows(batch: Any) -> int:
    """Rows in a batch that is a tensor or a tuple led by one."""
    return len(batch[0] if isinstance(batch, tuple | list) else batch)


def forward_data(function: Callable[[Any], Any], data: Dataset, batch_size: int = 4096) -> Any:
    """`function` over every batch of `data` in order, under `inference`, the outputs joined
    along rows."""
    with inference(function):
        return concatenate([function(batch) for batch in epoch_batches(data, batch_size)])


@dataclass
class TrainingHistory:
    monitored: ClassVar[str] = "val loss"  # what `val_loss` holds, for the log
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


@dataclass(frozen=True)
class LossTrimming:
    """Loss truncation against the contamination that cleaning leaves in a training set.

    From epoch `after` on, each batch's loss is the mean of its rows' losses less the `fraction`
    highest. A network fits the many normal rows before the few anomalous ones (the inlier
    priority of Wang et al., NeurIPS 2019, "Effective End-to-end Unsupervised Outlier Detection
    via Inlier Priority of Discriminative Network"), so after a warm-up the rows it still fits
    worst are the likeliest anomalies; leaving them out keeps it from learning them. Validation
    batches are reduced the same way, so early stopping watches the trimmed objective."""

    fraction: float = 0.0
    after: int = 5

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.fraction!r}")
        if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 0:
            raise ValueError(f"trim_after must be an integer >= 0 (epochs), got {self.after!r}")

    def reduce(self, losses: torch.Tensor, epoch: int) -> torch.Tensor:
        """A batch's loss from `loss_fn`'s output: a scalar as it is, row losses `[N]` by their
        (trimmed, from epoch `after` on) mean."""
        if losses.dim() == 0:
            if self.fraction > 0:
                raise ValueError(
                    "trim_fraction needs a loss per row, but this loss is already a batch mean"
                )
            return losses
        if self.fraction == 0 or epoch < self.after:
            return losses.mean()
        return trimmed_mean(losses, self.fraction)


def trimmed_mean(losses: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of `losses` `[N]` without the `floor(fraction * N)` largest (at least one kept)."""
    keep = max(len(losses) - int(fraction * len(losses)), 1)
    return torch.topk(losses, keep, largest=False, sorted=False).values.mean()


def mean_loss(
    loss_fn: Callable[[Any], torch.Tensor],
    data: Dataset,
    batch_size: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] = torch.mean,
) -> float:
    """The row-weighted mean over every batch of `data` of `loss_fn`'s output, reduced to a
    scalar by `reduce`, without gradients."""
    with torch.no_grad():
        total = sum(
            reduce(loss_fn(batch)).item() * batch_rows(batch)
            for batch in epoch_batches(data, batch_size)
        )
    return total / max(len(data), 1)


def train_network(
    network: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    train: Dataset,
    val: Dataset | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    patience: int,
    generator: torch.Generator,
    description: str = "train",
    on_epoch_end: Callable[[int], None] | None = None,
    trimming: LossTrimming = LossTrimming(),
) -> TrainingHistory:
    """Adam on `loss_fn(batch)` over the batches of the `train` dataset (preprocessed per batch
    by the dataset); keeps the weights of the best val epoch. `loss_fn` returns the batch's mean
    loss, or one loss per row, which `trimming` reduces (see `LossTrimming`).

    `on_epoch_end(epoch)` runs after each epoch's updates, before the validation loss (Deep
    SVDD's soft boundary refits its radius there)."""
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    history = TrainingHistory()

    def one_epoch(epoch: int) -> tuple[float, dict[str, str]]:
        running = 0.0
        for batch in epoch_batches(train, batch_size, generator):
            optimizer.zero_grad()
            loss = trimming.reduce(loss_fn(batch), epoch)
            loss.backward()
            optimizer.step()
            running += loss.item() * batch_rows(batch)
        network.eval()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        history.train_loss.append(running / len(train))
        monitored = (
            mean_loss(loss_fn, val, batch_size, lambda losses: trimming.reduce(losses, epoch))
            if val is not None
            else history.train_loss[-1]
        )
        return monitored, {"loss": f"{history.train_loss[-1]:.4f}"}

    return run_epochs(
        network, one_epoch, history, epochs=epochs, patience=patience, description=description
    )


HistoryT = TypeVar("HistoryT", bound=TrainingHistory)


def run_epochs(
    network: nn.Module,
    one_epoch: Callable[[int], tuple[float, dict[str, str]]],
    history: HistoryT,
    *,
    epochs: int,
    patience: int,
    description: str,
) -> HistoryT:
    """The epoch bookkeeping every training loop shares: `one_epoch(epoch)` trains one pass
    (the network in train mode), leaves it in eval mode and returns the monitored value with
    the losses to show; this records it, stops early on it and restores the best weights."""
    stopping = EarlyStopping(network, patience)
    progress = tqdm(range(epochs), desc=description, leave=False, mininterval=1.0, disable=None)
    for epoch in progress:
        network.train()
        monitored, shown = one_epoch(epoch)
        history.val_loss.append(monitored)
        progress.set_postfix(**shown, val=f"{monitored:.4f}")
        stop = stopping.should_stop(epoch, monitored)
        history.best_epoch = stopping.best_epoch
        if stop:
            break
    stopping.restore_best()
    log.info(
        "%s: %d epochs, best epoch %d, %s %.5f",
        description,
        len(history.train_loss),
        history.best_epoch,
        history.monitored,
        stopping.best,
    )
    return history
