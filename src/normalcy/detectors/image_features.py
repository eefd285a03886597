"""What every detector on frozen backbone feature maps shares: the image input, the backbone,
locally aware patch features, the anomaly map at the input resolution, and their fitted state.

A method (`patchcore`, `padim`, `fastflow`) supplies `fit_patches` (learn from the training
images' patch features) and `patch_head` (patch features -> per-patch scores), and may replace
`patch_module` (how stage maps become patch features); this class builds the graph
raw images -> resize + ImageNet normalization -> backbone -> patch features -> patch scores ->
`score` (max over patches, or over the blurred map) and `anomaly_map` (upsampled to the input
size, Gaussian-blurred)."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normalcy.artifact.names import EMBEDDING_NAME
from normalcy.detectors.backbones import (
    FeatureExtractor,
    build_architecture,
    load_backbone,
)
from normalcy.detectors.base import (
    Detector,
    FitData,
    Prediction,
    concatenate,
    require_fitted,
    saved_parts,
    under_prefix,
)
from normalcy.detectors.networks import ScoringModule
from normalcy.detectors.preprocessing import (
    INTENSITY_MODES,
    fit_preprocessing,
    load_preprocessing,
)
from normalcy.threads import checked_threads, count_parameters, torch_threads, training_threads


def local_average(feature_map: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """Each position averaged over its `neighbourhood` x `neighbourhood` window (PatchCore's local
    neighbourhood aggregation; borders average only the positions inside the map)."""
    if neighbourhood == 1:
        return feature_map
    return F.avg_pool2d(
        feature_map, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False
    )


class LocallyAwarePatches(nn.Module):
    """Feature maps of several stages -> one patch feature map `[N, D, h, w]` at the first
    (shallowest) stage's resolution: each map averaged over a `neighbourhood` x `neighbourhood`
    window (PatchCore's local neighbourhood aggregation), the deeper ones bilinearly upsampled,
    concatenated along channels, then optionally averaged down to `feature_dim` channels."""

    def __init__(self, neighbourhood: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.neighbourhood = int(neighbourhood)
        self.feature_dim = feature_dim

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        pooled = []
        for feature_map in maps:
            feature_map = local_average(feature_map, self.neighbourhood)
            if feature_map.shape[-2:] != size:
                feature_map = F.interpolate(
                    feature_map, size=size, mode="bilinear", align_corners=False
                )
            pooled.append(feature_map)
        patches = torch.cat(pooled, dim=1)
        if self.feature_dim is not None and patches.shape[1] > self.feature_dim:
            n, d, h, w = patches.shape
            flat = patches.permute(0, 2, 3, 1).reshape(n * h * w, 1, d)
            flat = F.adaptive_avg_pool1d(flat, self.feature_dim)
            patches = flat.reshape(n, h, w, self.feature_dim).permute(0, 3, 1, 2)
        return patches


def gaussian_kernel(sigma: float, max_radius: int) -> torch.Tensor:
    """A normalized 1-d Gaussian of radius ceil(4 sigma), at most `max_radius` (reflect padding
    needs it below the map's size); the `[1]` identity for sigma 0."""
    radius = min(math.ceil(4 * sigma), max_radius) if sigma > 0 else 0
    if radius < 1:
        return torch.ones(1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


class GaussianBlur(nn.Module):
    """`[N, 1, H, W]` maps blurred by separable Gaussians (rows `sigma_h`, columns `sigma_w`),
    reflect-padded so the borders are not darkened: PatchCore's map smoothing, as two Convs."""

    def __init__(self, sigma_h: float, sigma_w: float, size: tuple[int, int]) -> None:
        super().__init__()
        kernel_h = gaussian_kernel(sigma_h, size[0] - 1)
        kernel_w = gaussian_kernel(sigma_w, size[1] - 1)
        self.register_buffer("kernel_h", kernel_h.reshape(1, 1, -1, 1))
        self.register_buffer("kernel_w", kernel_w.reshape(1, 1, 1, -1))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = self.kernel_h.shape[2] // 2, self.kernel_w.shape[3] // 2
        if pad_h:
            maps = F.conv2d(F.pad(maps, (0, 0, pad_h, pad_h), mode="reflect"), self.kernel_h)
        if pad_w:
            maps = F.conv2d(F.pad(maps, (pad_w, pad_w, 0, 0), mode="reflect"), self.kernel_w)
        return maps


# Where the image score comes from: the largest patch score, or the largest value of the blurred
# anomaly map (anomalib's PaDiM; the blur averages out one noisy patch).
IMAGE_SCORE_SOURCES = ("patches", "map")
# How each anomaly map is shifted: as is, or less a low quantile of its own patch scores, so that
# a tile whose good surface scores high everywhere (lighting, texture) does not outrank a defect
# elsewhere pixel by pixel. The median is that offset only while a defect covers less than half
# the tile; a broken-off corner lifts it and sinks its own pixels, so the lower decile is the
# robust choice (benchmarks/README.md, stop 26). The image score changes only when it is the
# map's peak (`image_score_from: map`): a defect covering most of the image would vanish from a
# centred score.
MAP_CENTERINGS = {"none": None, "median": 0.5, "lower_decile": 0.1}


def own_quantile(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """`[N, h, w]` -> each map's `quantile` `[N]`, the lower value between two (as torch's
    median), by TopK: ONNX has no Median or Quantile operator."""
    flat = scores.flatten(1)
    rank = int(quantile * (flat.shape[1] - 1))  # in ascending order, from 0
    return flat.topk(rank + 1, dim=1, largest=False).values[:, -1]


class PatchScoreHead(nn.Module):
    """Normalized images -> backbone -> patch features -> `patch_scores` (a method's module,
    `[N, D, h, w]` -> `[N, h, w]`, or with its own image score `([N, h, w], [N])`) ->
    `Prediction`: anomaly_map = patch scores bilinearly upsampled to `output_size` and blurred
    (with `centre_on`, less that quantile of the image's patch scores: upsampling and the
    normalized blur keep a constant, so it is subtracted last), score = the largest patch score
    (or the method's; with `score_from_map`, the largest value of the map), and the stages' pooled
    features as the `embedding` that drift compares."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        patches: LocallyAwarePatches,
        patch_scores: nn.Module,
        output_size: tuple[int, int],
        blur: GaussianBlur,
        score_from_map: bool = False,
        centre_on: float | None = None,
    ) -> None:
        super().__init__()
        self.score_from_map = score_from_map
        self.centre_on = centre_on
        self.extractor = extractor
        self.patches = patches
        self.patch_scores = patch_scores
        self.output_size = tuple(int(s) for s in output_size)
        self.blur = blur

    def forward(self, x: torch.Tensor) -> Prediction:
        features = self.extractor(x)
        scores = self.patch_scores(self.patches(features))
        if isinstance(scores, tuple):  # the method scores the image itself (a reweighting)
            scores, image_score = scores
        else:
            image_score = scores.flatten(1).amax(dim=1)
        maps = F.interpolate(
            scores.unsqueeze(1), size=self.output_size, mode="bilinear", align_corners=False
        )
        maps = self.blur(maps).squeeze(1)
        if self.centre_on is not None:
            maps = maps - own_quantile(scores, self.centre_on).reshape(-1, 1, 1)
        if self.score_from_map:
            image_score = maps.flatten(1).amax(dim=1)
        embedding = pooled_features(features)
        return Prediction(image_score, maps, {EMBEDDING_NAME: embedding})


def pooled_features(feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each stage's feature map averaged over positions, concatenated: `[N, sum of channels]`."""
    return torch.cat([feature_map.mean(dim=(2, 3)) for feature_map in feature_maps], dim=1)


def check_images(x: np.ndarray, who: str, what: str) -> None:
    """Rows must be images `[C, H, W]` with 1 or 3 channels (grayscale or RGB)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"{who}: {what} must be a batch of images [N, C, H, W] with C = 1 or 3 (raw 0..255), "
            f"got shape {list(x.shape)}"
        )


class BackboneDetector(Detector):
    """A detector on patch features of a frozen pretrained backbone (see the module doc)."""

    input_kind: ClassVar[str] = "image"
    min_train_rows = 1
    # A method that stops early on the validation images' features sets this; the others skip
    # extracting them.
    uses_val_patches: ClassVar[bool] = False

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        stages: Sequence[int] = (2, 3),
        weights: str = "pretrained",
        weights_path: str | None = None,
        image_size: int = 256,
        neighbourhood: int = 3,
        feature_dim: int | None = None,
        blur_sigma: float = 4.0,
        image_score_from: str = "patches",
        intensity: str = "as_is",
        map_centering: str = "none",
        batch_size: int = 8,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        self.threads = checked_threads(self.name, threads)
        if image_score_from not in IMAGE_SCORE_SOURCES:
            raise ValueError(
                f"{self.name}: image_score_from must be one of {list(IMAGE_SCORE_SOURCES)}, "
                f"got {image_score_from!r}"
            )
        self.image_score_from = image_score_from
        if intensity not in INTENSITY_MODES:
            raise ValueError(
                f"{self.name}: intensity must be one of {list(INTENSITY_MODES)}, got {intensity!r}"
            )
        self.intensity = intensity
        if map_centering not in MAP_CENTERINGS:
            raise ValueError(
                f"{self.name}: map_centering must be one of {list(MAP_CENTERINGS)}, "
                f"got {map_centering!r}"
            )
        self.map_centering = map_centering
        self.backbone = backbone
        self.stages = tuple(int(s) for s in stages)
        self.weights = weights
        self.weights_path = weights_path
        self.image_size = image_size
        self.neighbourhood = neighbourhood
        self.feature_dim = feature_dim
        self.blur_sigma = blur_sigma
        self.batch_size = batch_size
        self.scoring_batch_size = batch_size
        self.seed = seed
        self.preprocess: nn.Module | None = None
        self.extractor: FeatureExtractor | None = None
        self.weights_source: str | None = None
        self.output_size: tuple[int, int] | None = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        spec = {"kind": "image", "image_size": self.image_size, "normalization": "imagenet"}
        # the default adds no key, so the recorded preprocessing reads as it did before
        return spec if self.intensity == "as_is" else {**spec, "intensity": self.intensity}

    @abstractmethod
    def fit_patches(
        self, patches: Any, generator: torch.Generator, val_patches: Any | None = None
    ) -> None:
        """Learn from the training images' patch features (`patch_module`'s output, `[N, D, h,
        w]` unless a method replaces it); `val_patches`: the validation images' features, only
        for a method with `uses_val_patches` and only when there are validation images."""

    @abstractmethod
    def patch_head(self) -> nn.Module:
        """Patch features -> patch scores `[N, h, w]`, from what was learned."""

    @abstractmethod
    def method_state(self) -> dict[str, torch.Tensor]:
        """What `fit_patches` learned, as tensors."""

    @abstractmethod
    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `method_state` returned."""

    def patch_module(self) -> nn.Module:
        """Stage maps -> patch features: by default one locally aware map (see the class)."""
        return LocallyAwarePatches(self.neighbourhood, self.feature_dim)

    def patch_features(self, images: np.ndarray) -> Any:
        """`patch_module`'s output for raw images (a tensor, or a tuple of tensors joined one
        by one), in batches, without gradients."""
        patches = self.patch_module()
        with torch.no_grad():
            return concatenate(
                [
                    patches(self.extractor(self.preprocess(chunk)))
                    for chunk in torch.as_tensor(images).split(self.batch_size)
                ]
            )

    def _fit(self, data: FitData) -> None:
        check_images(data.train, self.name, "training")
        self.preprocess = fit_preprocessing(self.preprocessing, data.train)
        self.extractor, self.weights_source = load_backbone(
            self.backbone, self.stages, self.weights, self.weights_path, self.seed
        )
        self.output_size = tuple(data.train.shape[2:])
        generator = torch.Generator().manual_seed(self.seed)
        # the backbone is large (millions of weights): the threads rule gives it every CPU the
        # process may use (the cgroup quota included), or `threads`
        with torch_threads(training_threads(count_parameters(self.extractor), self.threads)):
            val_patches = (
                self.patch_features(data.val)
                if self.uses_val_patches and data.val is not None
                else None
            )
            self.fit_patches(self.patch_features(data.train), generator, val_patches)

    def blur(self) -> GaussianBlur:
        """The map blur at the output resolution: `blur_sigma` is in pixels of the resized
        `image_size` image, as PatchCore's sigma 4 is at 224 px."""
        height, width = self.output_size
        return GaussianBlur(
            self.blur_sigma * height / self.image_size,
            self.blur_sigma * width / self.image_size,
            self.output_size,
        )

    def scoring_module(self) -> ScoringModule:
        require_fitted(self.name, "scoring_module()", self.preprocess, self.extractor)
        head = PatchScoreHead(
            self.extractor,
            self.patch_module(),
            self.patch_head(),
            self.output_size,
            self.blur(),
            score_from_map=self.image_score_from == "map",
            centre_on=MAP_CENTERINGS[self.map_centering],
        )
        return ScoringModule(self.preprocess, head).eval()

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The preprocessing, the backbone's weights (so a saved detector loads without any
        weight source) and the method's state."""
        require_fitted(self.name, "saving", self.preprocess, self.extractor)
        return saved_parts(
            preprocess=self.preprocess, extractor=self.extractor.model, method=self.method_state()
        )

    def load_fitted_state(
        self, state: dict[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> None:
        self.preprocess = load_preprocessing(self.preprocessing, input_shape, state)
        model = build_architecture(self.backbone, self.stages)
        model.load_state_dict(under_prefix("extractor", state))
        self.extractor = FeatureExtractor(model)
        self.weights_source = "saved detector"
        self.output_size = tuple(input_shape[1:])
        self.load_method_state(under_prefix("method", state))
        self.input_shape = tuple(input_shape)
