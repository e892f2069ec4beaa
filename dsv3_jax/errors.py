"""The project's user-facing errors: each one is printed by the entry points as one line.

Anything else that escapes an entry point is a bug and keeps its traceback. Every class here is
also the builtin a caller would expect (a bad config is a ValueError, a missing checkpoint file an
OSError), so `except ValueError` keeps working for library users.
"""

from __future__ import annotations


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
