"""Distillation: the training loop with a teacher beside the student.

The student trains on the batches `train` would give it; its loss is (1 - lam) CE +
lam T^2 KL(teacher_T || student_T) (model/distillation.py), lam = distill.kl_weight,
T = distill.temperature. The teacher is another workdir's newest (or distill.teacher_step)
checkpoint: its config.json and params, restored onto the student's mesh with the student's
rules. Its params are an input of every step, never trained, not in the optimiser state and
not in the student's checkpoints, which record the teacher's fingerprint instead: a resume
against another teacher is refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import config as config_lib
from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.data.digests import digest
from gopher_jax.errors import UserError
from gopher_jax.layout import Layout
from gopher_jax.model import distillation
from gopher_jax.train import step as step_lib

# What decides the token ids the logits index: student and teacher must agree on all of it.
VOCAB_KEYS = ckpt_lib.compat.TOKENIZER_KEYS + ("model.vocab_size",)


class TeacherError(UserError):
    """A teacher that cannot teach this student (missing, untrained, another tokenizer)."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher workdir's checkpoint, read without its arrays: `config` is its config on the
    student's mesh and rules; `fingerprint` what the student's checkpoints keep of it."""

    workdir: epath.Path
    config: ml_collections.ConfigDict
    step: int
    tokenizer_sha: str | None  # the tokenizer fingerprint its checkpoint recorded
    fingerprint: str  # "<digest>@step<N>"


def open_teacher(c: ml_collections.ConfigDict, workdir: str) -> Teacher:
    """Reads the teacher's config.json and checkpoint metadata (no arrays, no side effect).
    Refuses, in one line each: a workdir that is not there or holds no config or no
    checkpoint, a step it does not hold, a tokenizer or vocabulary other than the student's."""
    storage.check(workdir, "--teacher")
    path = storage.path(workdir)
    if not (path / workdir_lib.CONFIG_JSON).is_file():
        raise TeacherError(f"teacher workdir {workdir} holds no {workdir_lib.CONFIG_JSON}",
                           "pass the --workdir of a `train` run as --teacher")
    stored = storage.read_json(path / workdir_lib.CONFIG_JSON)
    tc = config_lib.from_json(json.dumps(stored))
    _check_vocab(c, tc, workdir)
    ckpt = ckpt_lib.Checkpointer(path, read_only=True)
    try:
        steps = ckpt.steps() if ckpt.directory.is_dir() else []
    finally:
        ckpt.close()
    if not steps:
        raise TeacherError(f"teacher workdir {workdir} has no checkpoints",
                           f"train it first (`python -m gopher_jax train --workdir {workdir}`)"
                           " or pass a trained --teacher")
    want = c.distill.teacher_step
    step = steps[-1] if want == -1 else want
    if step not in steps:
        raise TeacherError(f"teacher workdir {workdir} has no checkpoint at step {want} "
                           f"(it has {steps})", "set distill.teacher_step to one of them, or -1")
    meta = ckpt_lib.read_meta(path / workdir_lib.CHECKPOINTS, step)
    with tc.unlocked():
        tc.mesh = ml_collections.ConfigDict(c.mesh.to_dict())
    # The checkpoint's own record: its config, step, save time and data fingerprints (a
    # retrained teacher of the same config and step differs in its save time).
    fingerprint = digest([meta.config, meta.step, meta.saved_at, meta.data])
    return Teacher(workdir=path, config=tc, step=step, tokenizer_sha=meta.data.get("tokenizer"),
                   fingerprint=f"{fingerprint}@step{step}")


def _check_vocab(c: ml_collections.ConfigDict, tc: ml_collections.ConfigDict,
                 workdir: str) -> None:
    a = config_lib.flatten(tc.to_dict())
    b = config_lib.flatten(c.to_dict())
    differ = [k for k in sorted(a.keys() | b.keys())
              if any(k == key or k.startswith(key + ".") for key in VOCAB_KEYS)
              and a.get(k) != b.get(k)]
    if differ:
        what = ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in differ)
        raise TeacherError(f"teacher {workdir} uses another tokenizer or vocabulary than the "
                           f"student's data (teacher vs student: {what})",
                           "distill from a teacher trained on the student's tokenizer")


def check_tokenizer(teacher: Teacher, identity: dict[str, str]) -> None:
    """The tokenizer file the student's data uses must be the one the teacher trained with
    (a same-named tokenizer retrained on other text has other ids)."""
    have = identity.get("tokenizer")
    if teacher.tokenizer_sha and have and teacher.tokenizer_sha != have:
        raise TeacherError(f"teacher {teacher.workdir} was trained with tokenizer "
                           f"{teacher.tokenizer_sha}, the student's data uses {have}",
                           "distill from a teacher trained on the student's tokenizer")


def restore_params(teacher: Teacher, layout: Layout) -> Any:
    """The teacher's params alone (not its optimiser state), placed by `layout`'s param
    shardings (the teacher's layout on the student's mesh)."""
    target = {"params": layout.state["params"]}
    step_dir = teacher.workdir / workdir_lib.CHECKPOINTS / str(teacher.step) / "state"
    args = ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(
                                      target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(step_dir, args=args)["params"]


class Distillation:
    """The objective `loop.train` runs: what the checkpoints add to the data fingerprints
    (the teacher's: the soft targets are training data too, so a resume against another
    teacher is refused like one onto other data), and the train step."""

    def __init__(self, c: ml_collections.ConfigDict, teacher: Teacher):
        self.c, self.teacher = c, teacher

    def identity(self, data_identity: dict[str, str]) -> dict[str, str]:
        """The data fingerprints with the teacher's; a teacher trained with another tokenizer
        file than the student's data uses is refused here, before any restore or step."""
        check_tokenizer(self.teacher, data_identity)
        return {**data_identity, "teacher": self.teacher.fingerprint}

    def batches(self, data: Any) -> Any:
        return data

    def make_step(self, c: ml_collections.ConfigDict, layout: Layout) -> Any:
        t_layout = Layout.build(self.teacher.config, layout.mesh)
        params = restore_params(self.teacher, t_layout)
        objective = step_lib.Loss(sums=online_sums(c, t_layout.graphdef), extra=params,
                                       extra_shardings=t_layout.param_shardings)
        return step_lib.make_train_step(c, layout, objective)


def online_sums(c: ml_collections.ConfigDict, teacher_graphdef: nnx.GraphDef
                ) -> step_lib.LossSums:
    """The step's loss sums with the teacher's forward pass in it (no gradient)."""
    d, chunk = c.distill, c.model.loss_chunk

    def sums(graphdef: nnx.GraphDef, params: Any, batch: step_lib.Batch, teacher_params: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        inputs, seg, targets, weights = step_lib.split_batch(batch)
        student = nnx.merge(graphdef, params)
        x = student.hidden(inputs, seg)
        with jax.named_scope("teacher"):
            teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
            t_x = jax.lax.stop_gradient(teacher.hidden(inputs, seg))
            t_w = jax.lax.stop_gradient(teacher.output_embedding())
        with jax.named_scope("distillation"):
            loss, nll, kl = distillation.online_sums(x, student.output_embedding(), targets,
                                                     weights, t_x, t_w, chunk, d.kl_weight,
                                                     d.temperature)
        return loss, {"nll": nll, "weight": jnp.sum(weights), "kl": kl}

    return sums
