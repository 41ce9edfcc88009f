"""Functions a script registers by name (``rnnjax.cells.CELLS``, ``rnnjax.orders.ORDERS``),
found again in other processes: the tuner's children import each as ``MODULE:QUALNAME``,
the very function the script registered (a leaf: of rnnjax it imports only
:mod:`rnnjax.config`)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from rnnjax.config import error_line


def registered(table: Mapping[str, Callable], built_in: Mapping[str, Callable], name: str
               ) -> str | None:
    """``MODULE:QUALNAME`` of the function ``table`` holds for ``name`` where a script
    registered it (a new name, or over ``built_in``'s); None for rnnjax's own, or a name
    not in ``table``."""
    function = table.get(name)
    if function is None or function is built_in.get(name):
        return None
    return (f"{getattr(function, '__module__', None) or '__main__'}:"
            f"{getattr(function, '__qualname__', '') or '<unknown>'}")


def source(table: Mapping[str, Callable], built_in: Mapping[str, Callable], name: str,
           flag: str) -> str | None:
    """Where another process (the tuner's children) finds the function ``table`` holds for
    ``name``, registered in this one: :func:`registered`, or None. ValueError, naming
    ``flag`` and the fix, where no other process can import it as the very function
    registered: one of the script run as ``__main__``, a lambda, one made inside another
    function, a partial, a bound method."""
    where = registered(table, built_in, name)
    if where is None:
        return None
    module, _, qualname = where.partition(":")
    function = table[name]
    if inspect.ismethod(function) or not hasattr(function, "__qualname__"):  # a partial
        why = f"a {type(function).__name__}, not a function"
    elif module == "__main__":
        why = "registered from the script run as __main__"
    elif "<" in qualname:
        why = ("a lambda" if qualname.endswith("<lambda>") else
               f"{module}.{qualname}, made inside another function")
    elif not _names(where, function):
        why = f"not what {where} names where a child process imports it"
    else:
        return where
    raise ValueError(
        f"{flag} {name}: its function ({why}) cannot be imported by the tuner's child "
        "processes, which time the candidates: define it with def at the top level of a "
        "module your script imports, or pass --no-tune")


def imported(where: str) -> Any:
    """What ``MODULE:QUALNAME`` names, imported (ImportError or AttributeError otherwise)."""
    module_name, _, qualname = where.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _names(where: str, function: Any) -> bool:
    """Whether ``MODULE:QUALNAME`` imports as ``function`` itself."""
    try:
        return imported(where) is function
    except (ImportError, AttributeError):
        return False


def register_source(table: MutableMapping[str, Callable], name: str, where: str,
                    flag: str) -> None:
    """Register in ``table`` as ``name`` the function ``where`` names (``MODULE:QUALNAME``,
    :func:`source`), as the process that registered it did; ValueError naming ``flag``,
    ``name`` and the reason where it cannot be imported."""
    try:
        table[name] = imported(where)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{flag} {name}: its function {where} cannot be imported in the "
                         f"tuner's child process ({error_line(e)}); pass --no-tune"
                         ) from None


@dataclass(frozen=True)
class Registry:
    """A ``table`` of functions a script registers by name (rnnjax's own, where any, in
    ``built_in``), named on the command line by ``flag``: the functions above, bound."""

    table: MutableMapping[str, Callable]
    built_in: Mapping[str, Callable]
    flag: str

    def registered(self, name: str) -> str | None:
        """:func:`registered` of ``name``."""
        return registered(self.table, self.built_in, name)

    def source(self, name: str) -> str | None:
        """:func:`source` of ``name``."""
        return source(self.table, self.built_in, name, self.flag)

    def register_source(self, name: str, where: str) -> None:
        """:func:`register_source` of ``name`` from ``where``."""
        register_source(self.table, name, where, self.flag)
