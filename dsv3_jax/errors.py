"""The project's user-facing errors: each one is printed by the entry points as one line.

Anything else that escapes an entry point is a bug and keeps its traceback. Every class here is
also the builtin a caller would expect (a bad config is a ValueError, a missing checkpoint file an
OSError), so `except ValueError` keeps working for library users. `check_field_types` is the type half
of every config dataclass's validation.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing


class UserError(Exception):
    """Bad input the user can fix: a config value, a file, a prompt. One line, no traceback."""


class ConfigError(UserError, ValueError):
    """A config field, command-line value or layout out of range; the message names it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, or not matching the model."""


class DataError(UserError, ValueError):
    """Training data or a tokenizer that cannot be read or does not fit the model."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named is not there."""


# ---- the type half of every config's validation ---------------------------------------------------
# gin passes values as written ('8', 8.0, 1): without this a string where an int belongs surfaces as
# a TypeError deep inside a comparison. Each config's __post_init__ calls it before its range checks.
def check_field_types(obj) -> None:
    """Check every field of the dataclass `obj` against its annotation and normalise it in place.

    int rejects bools and floats; float accepts ints (stored as float); bool takes only True/False;
    `X | None` also takes None; `tuple[str, ...]` a tuple of strings. Numpy scalars become Python
    numbers, so the configs stay JSON-serialisable. The ConfigError names the field and the value.
    """
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, want = getattr(obj, f.name), hints.get(f.name)
        ok, normal = _conform(value, want)
        if not ok:
            raise ConfigError(f"{type(obj).__name__}.{f.name}={value!r}: expected {_describe(want)}, "
                              f"got {type(value).__name__}")
        if normal is not value:
            object.__setattr__(obj, f.name, normal)  # frozen dataclasses too


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _conform(value, want) -> tuple[bool, object]:
    """(does `value` have type `want`, the value normalised)."""
    if want is bool:
        return isinstance(value, bool), value
    if want is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if want is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if want is str:
        return isinstance(value, str), value
    if want is type(None):
        return value is None, value
    args = typing.get_args(want)
    if isinstance(want, types.UnionType) or typing.get_origin(want) is typing.Union:
        if value is None:
            return type(None) in args, value
        for arm in args:
            ok, normal = _conform(value, arm)
            if ok:
                return ok, normal
        return False, value
    if typing.get_origin(want) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, tuple):
            return False, value
        items = [_conform(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    return True, value  # an annotation this check does not model


def _describe(want) -> str:
    names = {bool: "True or False", int: "an int", float: "a number", str: "a string",
             type(None): "None"}
    if want in names:
        return names[want]
    args = typing.get_args(want)
    if isinstance(want, types.UnionType) or typing.get_origin(want) is typing.Union:
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(want) is tuple:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    return str(want)
