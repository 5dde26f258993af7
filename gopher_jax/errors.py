"""The user-mistake exceptions: the CLI prints their message as one `error:` line.

A `UserError` says what is wrong and how to fix it; anything else that escapes a command is
a bug and keeps its traceback. `exit_code` is 2 for a wrong invocation (flags, config) and 1
for a fault found while running (data, paths, checkpoints).
"""

from __future__ import annotations


class UserError(Exception):
    exit_code = 1

    def __init__(self, what: str, fix: str = ""):
        super().__init__(f"{what} ({fix})" if fix else what)


class UsageError(UserError):
    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A config that cannot run; the message names the numbers and the fix."""


class DataError(UserError, ValueError):
    """A corpus, tokenizer or prepared split that cannot be used; names the file and the fix."""
