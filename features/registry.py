"""One registry helper for every "name in params.yaml -> implementation" table in the project.

Encoder families, denoise and ASR backends and head types all use it, so they behave alike:
`register(name)` as a decorator or `register(name, obj)` as a call; `get(name)` imports the
module that registers `name` on first use (heavy modules load only when a params entry names
them) and raises a `ConfigError` that names the params key, the unknown name and the known ones.

Example::

    BACKENDS = Registry("backend", "denoise.backend", modules={"mine": "my_pkg.denoiser"})

    @BACKENDS.register("none")
    class Identity: ...

    BACKENDS.get("none")  # Identity; BACKENDS.get("mine") imports my_pkg.denoiser first
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar, overload

from features.errors import ConfigError

T = TypeVar("T")
_NOTHING: Any = object()


class Registry(Generic[T]):
    """Names -> registered objects; `modules` maps a name to the module that registers it."""

    def __init__(self, what: str, key: str, modules: Mapping[str, str] | None = None,
                 renamed: Mapping[str, str] | None = None, describe: Callable[[T], str] | None = None):
        self.what = what  # singular, as in messages: "backend", "head type"
        self.key = key  # the params.yaml key that names an entry, e.g. "denoise.backend"
        self.modules = dict(modules or {})
        self.renamed = dict(renamed or {})  # old name -> a hint naming its replacement
        self.describe = describe or _origin  # an object in the duplicate-name error
        self._objects: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = _NOTHING) -> Any:
        """Add `obj` under `name`; without `obj`, a decorator that adds what it decorates.

        The same name again with an equal object is a no-op (a module imported twice); with a
        different one it is an error: the second would silently replace the first.
        """
        if obj is _NOTHING:
            return lambda target: self.register(name, target)
        old = self._objects.get(name, _NOTHING)
        if old is not _NOTHING and old != obj:
            raise ConfigError(f"{self.what} {name!r} is registered twice ({self.describe(old)}, "
                              f"{self.describe(obj)}); pick another name.")
        self._objects[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as `name`, importing its module first if it is a lazy one."""
        if name not in self._objects and name in self.modules:
            importlib.import_module(self.modules[name])
        if name in self._objects:
            return self._objects[name]
        if name in self.modules:  # a wrong `modules` entry: a bug, not a params typo
            raise ConfigError(f"{self.what} {name!r}: module {self.modules[name]} did not register it.")
        hint = f" It was renamed: use {self.renamed[name]}." if name in self.renamed else ""
        raise ConfigError(f"{self.key}: unknown {self.what} {name!r}; known {_plural(self.what)} are "
                          f"{self.names()}.{hint} Fix params.yaml.")

    def names(self) -> list[str]:
        """Every known name, sorted: the lazy ones (not imported yet) and those registered."""
        return sorted(set(self.modules) | set(self._objects))

    def __contains__(self, name: object) -> bool:
        return name in self.modules or name in self._objects

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.key!r}: {self.names()})"


def _plural(word: str) -> str:
    return word[:-1] + "ies" if word.endswith("y") else word + "s"


def _origin(obj: Any) -> str:
    """A class or function as module.name; anything else by its repr."""
    name = getattr(obj, "__qualname__", None)
    return f"{obj.__module__}.{name}" if name else repr(obj)
