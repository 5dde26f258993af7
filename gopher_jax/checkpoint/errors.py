"""The checkpoint package's error: a user mistake or a broken checkpoint, reported as one
line (a UserError)."""

from __future__ import annotations

from gopher_jax.errors import UserError


class CheckpointError(UserError, RuntimeError):
    pass
