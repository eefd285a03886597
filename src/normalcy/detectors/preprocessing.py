"""Preprocessing as the first layer of every scoring graph, chosen per candidate by name.

`preprocessing` is a constructor parameter of every detector that rescales its input (a params
key under `train.detectors.<name>`): a name, or a mapping with `kind` and that kind's options,
e.g. `{kind: image, image_size: 64, normalization: imagenet}`. The fitted statistics are
buffers of the module, so the exported graph takes raw input in data units and persistence saves
them with the module's `state_dict`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normalcy.detectors.base import under_prefix
from normalcy.detectors.specs import parse_preprocessing

# A scale below this fraction of the median non-zero scale is raised to it: a nearly constant
# feature (a pixel that is almost always 0) must not be blown up into huge standardized values.
RELATIVE_SCALE_FLOOR = 0.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Identity(nn.Module):
    """The input as float32, unchanged (`none`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32)


class Affine(nn.Module):
    """(x - shift) / scale per feature, the statistics frozen in as buffers (`standardize`,
    `robust`, `minmax`)."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(input_shape))
        self.register_buffer("scale", torch.ones(input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) - self.shift) / self.scale


INTENSITY_MODES = ("as_is", "per_image")
MIN_IMAGE_STD = 1.0 / 255  # a flat image's brightness spread: one grey level


class ImagePreprocessing(nn.Module):
    """Raw images `[N, C, H, W]` (0..255) -> float / 255 -> optional bilinear resize to
    `image_size` x `image_size` -> optionally each image's brightness equalized -> (x - mean_c) /
    std_c per channel.

    With `normalization: imagenet` a grayscale image is repeated into 3 channels first (as
    PIL's `convert("RGB")` does), so an ImageNet backbone reads grayscale data.

    `intensity: per_image` shifts and scales each image so its mean and spread of brightness
    are the training images' typical ones (their medians): under uneven lighting or exposure
    a defect-free surface then gives the same features whether it was lit brightly or dimly,
    so a patch model spends none of its spread on lighting."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        image_size: int | None,
        to_rgb: bool = False,
        intensity: str = "as_is",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"preprocessing 'image' needs rows [C, H, W], got rows of shape {list(input_shape)}"
            )
        self.to_rgb = bool(to_rgb and input_shape[0] == 1)
        channels = 3 if self.to_rgb else input_shape[0]
        self.image_size = image_size
        self.per_image = intensity == "per_image"
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))
        if self.per_image:  # the brightness every image is brought to, fitted on training images
            self.register_buffer("typical_brightness", torch.tensor(0.5))
            self.register_buffer("typical_contrast", torch.tensor(0.25))

    def unit_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Float in [0, 1], resized when asked, channels as stored."""
        x = x.to(torch.float32) / 255.0
        if self.image_size is not None:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def equalized(self, x: torch.Tensor) -> torch.Tensor:
        """`unit_scale`, then (with `per_image`) each image at the typical brightness and
        contrast, then grayscale repeated into RGB: everything before the channel statistics."""
        x = self.unit_scale(x)
        if self.per_image:
            brightness, contrast = brightness_and_contrast(x)
            scale = self.typical_contrast / contrast.clamp_min(MIN_IMAGE_STD)
            x = (x - brightness) * scale + self.typical_brightness
        return x.expand(-1, 3, -1, -1) if self.to_rgb else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.equalized(x) - self.mean) / self.std


def brightness_and_contrast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's mean and standard deviation over its pixels and channels, `[N, 1, 1, 1]`,
    written out (not `std_mean`) so the graph exports as plain reductions.

    Summed in float64: onnxruntime's float32 sums over 448 x 448 values move every preprocessed
    pixel by about 1e-5, which the backbone carries into a 4x larger parity error of the
    embedding."""
    wide = x.to(torch.float64)
    brightness = wide.mean(dim=(1, 2, 3), keepdim=True)
    contrast = ((wide - brightness) ** 2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return brightness.to(x.dtype), contrast.to(x.dtype)


def floored(scale: np.ndarray) -> np.ndarray:
    """`scale` raised to at least `RELATIVE_SCALE_FLOOR` x its median non-zero value (1 when
    every feature is constant), so near-constant features keep a scale of the data's order."""
    nonzero = scale[scale > 0]
    floor = RELATIVE_SCALE_FLOOR * float(np.median(nonzero)) if nonzero.size else 1.0
    return np.maximum(scale, floor)


def _affine(input_shape: tuple[int, ...], shift: np.ndarray, scale: np.ndarray) -> Affine:
    module = Affine(input_shape)
    module.shift.copy_(torch.as_tensor(shift, dtype=torch.float32))
    module.scale.copy_(torch.as_tensor(floored(scale), dtype=torch.float32))
    return module


def _standardize(train: np.ndarray) -> Affine:
    return _affine(train.shape[1:], train.mean(axis=0), train.std(axis=0))


def _robust(train: np.ndarray) -> Affine:
    low, median, high = np.quantile(train, [0.25, 0.5, 0.75], axis=0)
    return _affine(train.shape[1:], median, high - low)


def _minmax(train: np.ndarray) -> Affine:
    low = train.min(axis=0)
    return _affine(train.shape[1:], low, train.max(axis=0) - low)


def _typical_brightness(train: np.ndarray, module: ImagePreprocessing) -> tuple[float, float]:
    """Medians of the unit-scaled training images' own brightness and contrast (in chunks of
    32: a float64 copy of 256 images at 448 px would hold 400 MB a channel)."""
    with torch.no_grad():
        per_image = [
            torch.cat(brightness_and_contrast(module.unit_scale(chunk).double()), dim=1)
            for chunk in torch.as_tensor(train).split(32)
        ]
    brightness, contrast = np.median(torch.cat(per_image).flatten(1).numpy(), axis=0)
    return float(brightness), max(float(contrast), MIN_IMAGE_STD)


def _image_statistics(train: np.ndarray, module: ImagePreprocessing) -> tuple[np.ndarray, ...]:
    """Per-channel mean and std of the unit-scaled (resized, equalized) training images, in
    batches."""
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for chunk in torch.as_tensor(train).split(256):
            x = module.equalized(chunk).double()
            total = total + x.sum(dim=(0, 2, 3))
            total_sq = total_sq + (x**2).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = (total / count).numpy()
    std = np.sqrt(np.maximum((total_sq / count).numpy() - mean**2, 0.0))
    return mean, floored(std)


def _build_image(
    input_shape: tuple[int, ...],
    image_size: int | None = None,
    normalization: str = "data",
    intensity: str = "as_is",
) -> ImagePreprocessing:
    return ImagePreprocessing(
        input_shape, image_size, to_rgb=normalization == "imagenet", intensity=intensity
    )


def _image(
    train: np.ndarray,
    image_size: int | None = None,
    normalization: str = "data",
    intensity: str = "as_is",
):
    if normalization == "imagenet" and train.shape[1] not in (1, 3):
        raise ValueError(
            f"preprocessing 'image' with normalization 'imagenet' needs 3 channels (or 1, "
            f"repeated into 3), got {train.shape[1]}"
        )
    module = _build_image(train.shape[1:], image_size, normalization, intensity)
    if module.per_image:
        brightness, contrast = _typical_brightness(train, module)
        module.typical_brightness.fill_(brightness)
        module.typical_contrast.fill_(contrast)
    if normalization == "imagenet":
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    else:
        mean, std = _image_statistics(train, module)
    module.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).reshape(module.mean.shape))
    module.std.copy_(torch.as_tensor(std, dtype=torch.float32).reshape(module.std.shape))
    return module


@dataclass(frozen=True)
class Kind:
    """How to build a kind's module for an input shape (statistics at their neutral values,
    to load a state_dict into) and how to fit it on training rows."""

    build: Callable[..., nn.Module]
    fit: Callable[..., nn.Module]


def _no_options(input_shape: tuple[int, ...]) -> nn.Module:
    return Affine(input_shape)


PREPROCESSING: dict[str, Kind] = {
    "standardize": Kind(_no_options, _standardize),
    "robust": Kind(_no_options, _robust),
    "minmax": Kind(_no_options, _minmax),
    "none": Kind(lambda input_shape: Identity(), lambda train: Identity()),
    "image": Kind(_build_image, _image),
}


def fit_preprocessing(spec: str | Mapping[str, Any], train: np.ndarray) -> nn.Module:
    """The preprocessing module named by `spec`, its statistics fitted on `train` `[N, ...]`."""
    kind, options = parse_preprocessing(spec)
    return PREPROCESSING[kind].fit(np.asarray(train, dtype=np.float64), **options).eval()


def build_preprocessing(spec: str | Mapping[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """The module named by `spec` for rows of `input_shape`, unfitted: what a saved
    `state_dict` is loaded into."""
    kind, options = parse_preprocessing(spec)
    return PREPROCESSING[kind].build(tuple(input_shape), **options).eval()


def load_preprocessing(
    spec: str | Mapping[str, Any], input_shape: tuple[int, ...], state: dict[str, torch.Tensor]
) -> nn.Module:
    """The preprocessing a detector saved under `preprocess.` in its state, rebuilt and loaded."""
    module = build_preprocessing(spec, input_shape)
    module.load_state_dict(under_prefix("preprocess", state))
    return module


def output_shape(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The row shape the preprocessing hands to the network (an image resize changes it)."""
    with torch.no_grad():
        return tuple(module(torch.zeros(1, *input_shape)).shape[1:])
