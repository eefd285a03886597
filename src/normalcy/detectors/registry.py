"""Detectors by name, in the style of timm's `@register_model` / `create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from normalcy.detectors.base import Detector

_FACTORIES: dict[str, Callable[..., Detector]] = {}


def register(name: str) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Decorator: make a detector factory available to `create_detector(name)`."""

    def decorate(factory: Callable[..., Detector]) -> Callable[..., Detector]:
        if name in _FACTORIES:
            raise ValueError(f"detector {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return decorate


def available_detectors() -> list[str]:
    """Names that `create_detector` accepts."""
    return sorted(_FACTORIES)


def accepted_params(name: str) -> list[str]:
    """Keyword parameters a detector accepts: its own and those of its base classes' __init__."""
    factory = _factory(name)
    functions = (
        [
            cls.__init__
            for cls in inspect.getmro(factory)
            if "__init__" in vars(cls) and cls is not object
        ]
        if inspect.isclass(factory)
        else [factory]
    )
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names: list[str] = []
    for function in functions:
        for param in inspect.signature(function).parameters.values():
            if param.name != "self" and param.kind in kinds and param.name not in names:
                names.append(param.name)
    return names


def _factory(name: str) -> Callable[..., Detector]:
    try:
        return _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}; expected one of {available_detectors()}"
        ) from None


def create_detector(name: str, **params: Any) -> Detector:
    """Build a detector by name; an unknown name or parameter fails naming what is accepted."""
    factory = _factory(name)
    unknown = sorted(set(params) - set(accepted_params(name)))
    if unknown:
        raise ValueError(
            f"detector {name!r} does not accept {unknown}; it accepts {accepted_params(name)}"
        )
    return factory(**params)


def create_with_settings(name: str, params: dict[str, Any], settings: dict[str, Any]) -> Detector:
    """`create_detector(name, **params)` plus whichever shared settings (epochs, seed, ...) the
    method accepts: a kNN has no epochs, yet one set of shared settings serves every candidate.
    `params` win over `settings`."""
    accepted = accepted_params(name)
    shared = {key: value for key, value in settings.items() if key in accepted}
    return create_detector(name, **{**shared, **params})
