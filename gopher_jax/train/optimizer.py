"""The paper's optimiser: Adam, warm-up from 1e-7 then cosine decay 10x, global-norm clipping."""

from __future__ import annotations

import ml_collections
import optax


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


def optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    lr = schedule(t)
    if t.optimizer == "adam":
        opt = optax.adam(lr, b1=t.b1, b2=t.b2, eps=t.eps)
    elif t.optimizer == "adamw":
        opt = optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)
    else:
        raise ValueError(f"train.optimizer={t.optimizer!r}: choose 'adam' or 'adamw'.")
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
