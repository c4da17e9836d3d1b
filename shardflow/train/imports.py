"""What a config names by import path, ``package.module:attribute``, and how it is called with the config's
arguments: each failure (no module, no attribute, an argument the callable does not take) is an error
naming the config key and what to do, never a stack trace from inside the import machinery."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any


def resolve(path: str, key: str) -> Any:
    """The object ``package.module:attribute`` names (dots after the colon walk attributes). Modules are
    found as ``python -m`` finds them: the working directory first, then installed packages."""
    module_name, colon, attr = path.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"{key} = {path!r}: expected 'package.module:function'")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"{key} = {path!r}: no module named {e.name!r} (looked in {here} and the installed packages)"
            ) from None
        raise  # the module exists and failed importing one of its own imports: the user's error to see whole
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{key} = {path!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


def bind(fn: Callable[..., Any], args: Mapping[str, Any], key: str, *positional: Any) -> None:
    """Check that ``fn(*positional, **args)`` can be called: an argument ``fn`` does not take, or a required one
    missing, is an error naming ``key``."""
    if not callable(fn):
        raise ValueError(f"{key}: {fn!r} is not a function")
    try:
        inspect.signature(fn).bind(*positional, **args)
    except TypeError as e:
        raise ValueError(f"{key}: {getattr(fn, '__name__', fn)} cannot take these arguments ({e})") from None
    except ValueError:
        pass  # no signature to read (a builtin): let the call say


def call_with(fn: Callable[..., Any], args: Mapping[str, Any], key: str, *positional: Any) -> Any:
    """``fn(*positional, **args)``, checked by ``bind`` first."""
    bind(fn, args, key, *positional)
    return fn(*positional, **args)
