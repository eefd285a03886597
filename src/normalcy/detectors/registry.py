"""Detectors by name, in the style of timm's `@register_model` / `create_model`.

Importing this module imports no torch: the method modules (which do) are imported the first
time a detector is asked for, and each registers itself with `@register("name")`. Checking a
detector's params (`param_problems`) goes through its torch-free spec (`specs.py`), so
`params.yaml` is checked completely on a host, or before a run, that has not loaded torch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from normalcy.detectors.specs import (
    ParamProblem,
    add_once,
    spec_for,
    spec_names,
    spec_problems,
)

if TYPE_CHECKING:
    from normalcy.detectors.base import Detector

PACKAGE = "normalcy.detectors"
_FACTORIES: dict[str, Callable[..., Detector]] = {}
_builtin_loaded = False


def load_builtin_detectors() -> None:
    """Import every module of this package once, so each method registers itself."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    package = importlib.import_module(PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{PACKAGE}.{module.name}")
    _builtin_loaded = True


def register(name: str) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    """Decorator: make a detector factory available to `create_detector(name)`.

    A factory from outside this package is checked against the built-in names too (which
    imports them), so a clash is reported where it is made."""

    add = add_once(_FACTORIES, name, "detector {name} is registered twice")

    def decorate(factory: Callable[..., Detector]) -> Callable[..., Detector]:
        if not str(getattr(factory, "__module__", "")).startswith(f"{PACKAGE}."):
            load_builtin_detectors()
        return add(factory)

    return decorate


def available_detectors() -> list[str]:
    """Names that `create_detector` accepts (imports the method modules, hence torch)."""
    load_builtin_detectors()
    return sorted(_FACTORIES)


def known_detectors() -> list[str]:
    """Names a params file may use, without importing torch: every built-in detector (by its
    spec) and any detector registered so far from elsewhere."""
    return sorted(set(spec_names()) | set(_FACTORIES))


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
    load_builtin_detectors()
    try:
        return _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}; expected one of {available_detectors()}"
        ) from None


def param_problems(name: str, params: Mapping[str, Any]) -> list[ParamProblem]:
    """What is wrong with `params` for detector `name` (names, types, ranges), without building
    it. A built-in detector is checked by its spec, without torch; a detector registered from
    elsewhere, which has no spec, by its parameter names."""
    spec = spec_for(name)
    if spec is not None:
        return spec_problems(spec, params)
    if name not in _FACTORIES:
        raise ValueError(f"unknown detector {name!r}; expected one of {known_detectors()}")
    accepted = accepted_params(name)
    return [
        ParamProblem(key, f"is not a parameter of {name}; it accepts {accepted}", unknown=True)
        for key in params
        if key not in accepted
    ]


class DetectorParamsError(ValueError):
    """`create_detector` got params its detector refuses; `problems` lists each one."""

    def __init__(self, name: str, problems: list[ParamProblem]) -> None:
        self.name = name
        self.problems = problems
        unknown = sorted(p.path for p in problems if p.unknown)
        lines = [f"{name}: {p.path} {p.text}" for p in problems if not p.unknown]
        if unknown:
            accepted = accepted_params(name)
            lines.insert(0, f"detector {name!r} does not accept {unknown}; it accepts {accepted}")
        super().__init__("; ".join(lines))


def create_detector(name: str, **params: Any) -> Detector:
    """Build a detector by name; an unknown name or parameter, a wrong type or an out-of-range
    value fails naming what is accepted (the same check `params.yaml` gets)."""
    factory = _factory(name)
    problems = param_problems(name, params)
    if problems:
        raise DetectorParamsError(name, problems)
    return factory(**params)


def create_with_settings(name: str, params: dict[str, Any], settings: dict[str, Any]) -> Detector:
    """`create_detector(name, **params)` plus whichever shared settings (epochs, seed, ...) the
    method accepts: a kNN has no epochs, yet one set of shared settings serves every candidate.
    `params` win over `settings`."""
    accepted = accepted_params(name)
    shared = {key: value for key, value in settings.items() if key in accepted}
    return create_detector(name, **{**shared, **params})
