"""What the GAN detectors share: the discriminator, and the alternating D / G training loop."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from normalcy.detectors.networks import mlp
from normalcy.detectors.torch_detector import TorchDetector
from normalcy.detectors.training import TrainingHistory, epoch_batches, run_epochs


class Discriminator(nn.Module):
    """A real/fake logit on top of a feature layer f(x), returned too: f is what GANomaly's
    feature matching and AnoGAN's discrimination score compare."""

    def __init__(self, input_shape: tuple[int, ...], hidden_dims: Sequence[int]) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        self.features = mlp(
            math.prod(input_shape), hidden_dims[:-1], hidden_dims[-1], final_activation=True
        )
        self.head = nn.Linear(hidden_dims[-1], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features).squeeze(1), features


class AdversarialPair(nn.Module):
    """The generator side and the discriminator in one module, so one state dict holds both
    (early stopping restores them together)."""

    def __init__(self, generator: nn.Module, discriminator: Discriminator) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator


def discriminator_bce(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's binary cross-entropy: real rows are 1, generated rows 0."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


@dataclass
class AdversarialHistory(TrainingHistory):
    """`train_loss` is the generator's loss and `val_loss` the method's validation criterion."""

    monitored: ClassVar[str] = "val criterion"

    discriminator_loss: list[float] = field(default_factory=list)


def train_adversarial(
    network: AdversarialPair,
    discriminator_loss: Callable[[torch.Tensor], torch.Tensor],
    generator_loss: Callable[[torch.Tensor], torch.Tensor],
    criterion: Callable[[Dataset], float],
    train: Dataset,
    val: Dataset | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    betas: tuple[float, float],
    weight_decay: float,
    patience: int,
    generator: torch.Generator,
    description: str = "gan",
) -> AdversarialHistory:
    """One discriminator then one generator Adam step per mini-batch; keeps the weights of the
    epoch with the best `criterion(val)` (of `train` without validation data).

    GAN losses say little about progress (each player's loss depends on the other), so the
    stopping signal is a criterion the method supplies, evaluated with both players frozen."""
    d_optimizer = torch.optim.Adam(
        network.discriminator.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay
    )
    g_optimizer = torch.optim.Adam(
        network.generator.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay
    )
    history = AdversarialHistory()

    def one_epoch(epoch: int) -> tuple[float, dict[str, str]]:
        d_running, g_running = 0.0, 0.0
        for batch in epoch_batches(train, batch_size, generator):
            d_optimizer.zero_grad()
            d_loss = discriminator_loss(batch)
            d_loss.backward()
            d_optimizer.step()
            g_optimizer.zero_grad()  # also clears what the D step left on the generator
            g_loss = generator_loss(batch)
            g_loss.backward()
            g_optimizer.step()
            d_running += d_loss.item() * len(batch)
            g_running += g_loss.item() * len(batch)
        network.eval()
        history.discriminator_loss.append(d_running / len(train))
        history.train_loss.append(g_running / len(train))
        with torch.no_grad():
            monitored = float(criterion(val if val is not None else train))
        shown = {"d": f"{history.discriminator_loss[-1]:.4f}", "g": f"{history.train_loss[-1]:.4f}"}
        return monitored, shown

    return run_epochs(
        network, one_epoch, history, epochs=epochs, patience=patience, description=description
    )


class AdversarialDetector(TorchDetector):
    """A TorchDetector whose `self.network` is an `AdversarialPair` trained by `train_adversarial`.

    A method supplies the two players' losses and the validation criterion for early stopping.
    Defaults follow DCGAN (Radford et al. 2016): Adam, lr 2e-4, betas (0.5, 0.999)."""

    network: AdversarialPair | None

    def __init__(
        self,
        learning_rate: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        **training: object,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **training)
        self.betas = (float(betas[0]), float(betas[1]))

    @abstractmethod
    def discriminator_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean discriminator loss of a standardized batch (generated rows detached)."""

    @abstractmethod
    def generator_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean loss of the generator side on a standardized batch."""

    @abstractmethod
    def validation_criterion(self, data: Dataset) -> float:
        """Lower is better; early stopping keeps the epoch where it is lowest on validation."""

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The generator's objective: what `TorchDetector` calls the training loss."""
        return self.generator_loss(batch)

    def train_network(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        return train_adversarial(
            self.network,
            self.discriminator_loss,
            self.generator_loss,
            self.validation_criterion,
            train,
            val,
            betas=self.betas,
            **self.loop_settings(self.name),
        )
