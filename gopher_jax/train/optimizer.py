"""The paper's optimiser: Adam, warm-up from 1e-7 then cosine decay 10x, global-norm clipping."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import optax

from gopher_jax import names


def schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from init_learning_rate to learning_rate over warmup_steps, then cosine
    decay to learning_rate / lr_decay_factor at step `steps` (optax counts warm-up inside)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=t.init_learning_rate,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1),
        end_value=t.learning_rate / t.lr_decay_factor,
    )


# train.optimizer -> the update rule, given the schedule and the train config.
OPTIMIZERS: dict[str, Callable[[optax.Schedule, ml_collections.ConfigDict],
                               optax.GradientTransformation]] = {
    "adam": lambda lr, t: optax.adam(lr, b1=t.b1, b2=t.b2, eps=t.eps),
    "adamw": lambda lr, t: optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps,
                                       weight_decay=t.weight_decay),
}
names.check_table("train.optimizer", OPTIMIZERS, names.OPTIMIZERS)


def optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clipping by global norm, then the update rule `t.optimizer` (config.check accepted it)."""
    update = OPTIMIZERS[t.optimizer](schedule(t), t)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), update)
