"""Any vector detector on images, through global embeddings: pooled features of a frozen
pretrained backbone, so `knn`, `flow`, `deep_svdd`, `dagmm`... read images without flattening
pixels (the issue's "global embeddings feeding any existing vector detector")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from normalcy.artifact.names import EMBEDDING_NAME
from normalcy.detectors.backbones import FeatureExtractor, build_architecture, load_backbone
from normalcy.detectors.base import (
    Detector,
    FitData,
    Prediction,
    as_prediction,
    require_fitted,
    saved_parts,
    under_prefix,
)
from normalcy.detectors.image_features import check_images, pooled_features
from normalcy.detectors.preprocessing import build_preprocessing, fit_preprocessing, floored
from normalcy.detectors.registry import create_detector, register
from normalcy.threads import checked_threads, count_parameters, torch_threads, training_threads


class PooledEmbedding(nn.Module):
    """Raw images -> resize + ImageNet normalization -> backbone -> each stage's map averaged
    over positions, concatenated `[N, D]` -> standardized with the training embeddings' mean
    and std (buffers), the scale a vector detector expects."""

    def __init__(self, image: nn.Module, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.image = image
        self.extractor = extractor
        width = sum(extractor.channels)
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.extractor(self.image(x)))

    def standardized(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled - self.shift) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardized(self.pooled(x))


class EmbeddedScoring(nn.Module):
    """Images -> `PooledEmbedding` -> the vector member's `Prediction`, with the unstandardized
    pooled features added as the `embedding` that drift compares (as every image model has)."""

    def __init__(self, embedding: PooledEmbedding, member: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.member = member

    def forward(self, x: torch.Tensor) -> Prediction:
        pooled = self.embedding.pooled(x)
        member = as_prediction(self.member(self.embedding.standardized(pooled)))
        explanations = {**(member.explanations or {}), EMBEDDING_NAME: pooled}
        return member._replace(explanations=explanations)


@register("embedded")
class Embedded(Detector):
    """`member` (a vector detector, with `member_params`) fitted on the pooled, standardized
    backbone embeddings of the training images; the graph is embedding + the member's graph, so
    the member's outputs (score, explanations) come out unchanged. Embeddings are computed once
    per image, not per training epoch."""

    name = "embedded"
    input_kind: ClassVar[str] = "image"
    min_train_rows = 1  # the member checks its own minimum on the embeddings

    def __init__(
        self,
        member: str = "knn",
        member_params: Mapping[str, Any] | None = None,
        backbone: str = "efficientnet_lite0",
        stages: Sequence[int] = (3, 4),
        weights: str = "pretrained",
        weights_path: str | None = None,
        image_size: int = 224,
        batch_size: int = 16,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        self.threads = checked_threads(self.name, threads)
        self.member = member
        self.member_params = dict(member_params or {})
        self.backbone = backbone
        self.stages = tuple(int(s) for s in stages)
        self.weights = weights
        self.weights_path = weights_path
        self.image_size = image_size
        self.batch_size = batch_size
        self.scoring_batch_size = batch_size
        self.seed = seed
        self.embedding: PooledEmbedding | None = None
        self.fitted_member: Detector | None = None
        self.weights_source: str | None = None

    @property
    def image_preprocessing(self) -> dict[str, Any]:
        return {"kind": "image", "image_size": self.image_size, "normalization": "imagenet"}

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Standardized embeddings `[N, D]` of raw images, in batches."""
        with torch.no_grad():
            return torch.cat(
                [self.embedding(chunk) for chunk in torch.as_tensor(images).split(self.batch_size)]
            ).numpy()

    def _fit(self, data: FitData) -> None:
        check_images(data.train, self.name, "training")
        extractor, self.weights_source = load_backbone(
            self.backbone, self.stages, self.weights, self.weights_path, self.seed
        )
        image = fit_preprocessing(self.image_preprocessing, data.train)
        self.embedding = PooledEmbedding(image, extractor).eval()
        # the backbone's threads by the rule (or `threads`); the member applies its own
        with torch_threads(training_threads(count_parameters(extractor), self.threads)):
            with torch.no_grad():
                pooled = torch.cat(
                    [self.embedding.pooled(c) for c in torch.as_tensor(data.train).split(64)]
                )
            self.embedding.shift.copy_(pooled.mean(dim=0))
            scale = floored(pooled.std(dim=0).numpy())
            self.embedding.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
            train = self.embedding.standardized(pooled).numpy()
            val = self.embed(data.val) if data.val is not None else None
        member = create_detector(self.member, **self.member_params)
        labels = data.val_labels if member.uses_labels else None
        self.fitted_member = member.fit(train, val, labels)

    def scoring_module(self) -> EmbeddedScoring:
        require_fitted(self.name, "scoring_module()", self.embedding, self.fitted_member)
        return EmbeddedScoring(self.embedding, self.fitted_member.scoring_module()).eval()

    def fitted_state(self) -> dict[str, torch.Tensor]:
        require_fitted(self.name, "saving", self.embedding, self.fitted_member)
        return saved_parts(embedding=self.embedding, member=self.fitted_member.fitted_state())

    def load_fitted_state(
        self, state: dict[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> None:
        image = build_preprocessing(self.image_preprocessing, input_shape)
        extractor = FeatureExtractor(build_architecture(self.backbone, self.stages))
        self.embedding = PooledEmbedding(image, extractor)
        self.embedding.load_state_dict(under_prefix("embedding", state))
        self.embedding.eval()
        self.weights_source = "saved detector"
        member = create_detector(self.member, **self.member_params)
        member.load_fitted_state(under_prefix("member", state), (len(self.embedding.shift),))
        self.fitted_member = member
        self.input_shape = tuple(input_shape)
