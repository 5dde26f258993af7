"""A gopher_jax checkpoint as an lm-evaluation-harness model, registered as "gopher_jax".

Needs the `eval` extra (`pip install -e .[eval]`, lm-eval 0.4.13); gopher_jax imports without
it. Importing this module registers the model:

    import lm_eval
    import gopher_jax.lm_eval_adapter  # noqa: F401 - registers "gopher_jax"

    lm_eval.simple_evaluate(model="gopher_jax", model_args={"workdir": "runs/tiny"},
                            tasks=["..."])

or from lm-eval's command line (batch size by --batch_size, not in --model_args):

    python -m gopher_jax.lm_eval_adapter run --model gopher_jax \
        --model_args workdir=runs/tiny --batch_size 8 --tasks ... [--include_path DIR]

model_args: workdir (a trained run), config (a config file; default: the workdir's
config.json), data_dir (where the tokenizer is, when it moved), batch_size (default 8).

Log-likelihoods and greedy continuations are computed by gopher_jax.tasks.model_queries, the code
of our own task runner, so both give the same numbers on the same token ids: a context is
[EOS] + its tokens (documents start with EOS in the training data), a continuation is
tokenized on its own, after the context's trailing whitespace is moved onto it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gopher_jax import workdir as workdir_lib
from gopher_jax.errors import UsageError, UserError
from gopher_jax.tasks import model_queries

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the `eval` extra is not installed: nothing is registered
    LM = object

    def register_model(*_names):
        return lambda cls: cls

NAME = "gopher_jax"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """The context's trailing whitespace moved onto the continuation (lm-eval's convention
    for a target delimiter: "Answer: " + "A" is scored as "Answer:" + " A")."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def with_greedy(logits_fn: model_queries.LogitsFn, requests: Sequence[tuple[Sequence[int],
                Sequence[int]]], seq_len: int, batch_size: int
                ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether every continuation token is the argmax)
    per request, both through model_queries.loglikelihoods: the second pass replays each batch's
    argmax as logits that are 0 there and -1e9 elsewhere, so its sum is 0 exactly when the
    continuation is greedy."""
    argmaxes: list[np.ndarray] = []
    vocab: list[int] = []

    def recording(tokens: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits_fn(tokens))
        argmaxes.append(np.argmax(logits, axis=-1))
        vocab[:] = [logits.shape[-1]]
        return logits

    logp = model_queries.loglikelihoods(recording, requests, seq_len, batch_size)
    replay = iter(argmaxes)

    def indicator(tokens: np.ndarray) -> np.ndarray:
        top = next(replay)
        out = np.full((*top.shape, vocab[0]), -1e9, np.float32)
        np.put_along_axis(out, top[..., None], 0.0, axis=-1)
        return out

    greedy = model_queries.loglikelihoods(indicator, requests, seq_len, batch_size)
    return [(lp, g > -1.0) for lp, g in zip(logp, greedy, strict=True)]


def rolling_windows(ids: Sequence[int], eos_id: int, seq_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict each of `ids` exactly once, the first
    from EOS, each at most seq_len + 1 tokens (lm-eval's rolling windows, context_len 1)."""
    from lm_eval import utils

    return [utils.make_disjoint_window(w)
            for w in utils.get_rolling_token_windows(list(ids), eos_id, seq_len, 1)]


def load_config(workdir: str, config: str | None = None, data_dir: str | None = None):

    from gopher_jax import config as config_lib
    from gopher_jax import storage

    if config:
        c = config_lib.load(config)
    else:
        path = storage.path(workdir) / workdir_lib.CONFIG_JSON
        if not path.is_file():
            raise UserError(f"{workdir} has no {workdir_lib.CONFIG_JSON} (not a training "
                            "workdir?)", "pass config=FILE in model_args")
        c = config_lib.from_json(path.read_text())
    if data_dir:
        c.data.data_dir = str(data_dir)
    config_lib.check(c)
    return c


@register_model(NAME)
class GopherLM(LM):
    """lm-eval's three request types on a trained workdir's newest checkpoint."""

    def __init__(self, workdir: str, config: str | None = None, data_dir: str | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, **_ignored: Any):
        if LM is object:
            raise ImportError("lm-eval is not installed: pip install -e .[eval]")
        super().__init__()
        import jax

        from gopher_jax import data
        from gopher_jax.evaluate import restore_params
        from gopher_jax.parallel import mesh as mesh_lib
        from gopher_jax.tasks.run import model_logits_fn

        self.config = load_config(workdir, config, data_dir)
        params, self.step = restore_params(self.config, workdir,
                                           mesh_lib.make_mesh(self.config))
        self.logits_fn = model_logits_fn(self.config, jax.device_get(params))
        self.tokenizer = data.load_tokenizer(self.config)
        self.seq_len = int(self.config.data.seq_len)
        try:
            self.batch_size = int(batch_size) if batch_size is not None else DEFAULT_BATCH_SIZE
        except ValueError:  # "auto": one shape is compiled anyway
            self.batch_size = DEFAULT_BATCH_SIZE

    # -- tokenization ---------------------------------------------------------------------

    def context_ids(self, context: str) -> list[int]:
        return [self.tokenizer.eos_id] + self.tokenizer.encode(context)

    def pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context, continuation = split_pair(context, continuation)
        return self.context_ids(context), self.tokenizer.encode(continuation)

    # -- lm-eval's request types ----------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.pair_ids(*r.args[:2]) for r in requests]
        live = [i for i, (_, cont) in enumerate(pairs) if cont]
        for i in live:
            if len(pairs[i][1]) > self.seq_len:
                raise UserError(f"request {i}: a continuation of {len(pairs[i][1])} tokens, "
                                f"more than the model's context of {self.seq_len}",
                                "choose tasks whose answers fit data.seq_len")
        scored = with_greedy(self.logits_fn, [pairs[i] for i in live], self.seq_len,
                             self.batch_size)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # empty continuation
        for i, s in zip(live, scored, strict=True):
            out[i] = s
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owner = [], []
        for i, r in enumerate(requests):
            for w in rolling_windows(self.tokenizer.encode(r.args[0]), self.tokenizer.eos_id,
                                     self.seq_len):
                windows.append(w)
                owner.append(i)
        ll = model_queries.loglikelihoods(self.logits_fn, windows, self.seq_len, self.batch_size)
        out = [0.0] * len(requests)
        for i, v in zip(owner, ll, strict=True):
            out[i] += v
        return out

    def generate_until(self, requests) -> list[str]:
        eos = self.tokenizer.eos_id
        # one greedy call per distinct (until, max_gen_toks): model_queries.greedy's stop is shared
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
                raise UsageError("gopher_jax decodes greedily only: do_sample=True given",
                                 "drop do_sample from the task's generation_kwargs")
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_toks = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            settings.append((context, until))
            groups.setdefault((until, max_toks), []).append(i)
        texts: dict[int, str] = {}
        for (until, max_toks), idx in groups.items():
            def done(ids: list[int], until=until) -> bool:
                return eos in ids or any(s in self.tokenizer.decode(ids) for s in until)

            contexts = [self.context_ids(settings[i][0]) for i in idx]
            new = model_queries.greedy(self.logits_fn, contexts, max_toks, self.seq_len,
                                 self.batch_size, done)
            for i, ids in zip(idx, new, strict=True):
                if eos in ids:
                    ids = ids[:ids.index(eos)]
                text = self.tokenizer.decode(ids)
                for s in until:
                    text = text.split(s)[0]
                texts[i] = text
        return [texts[i] for i in range(len(requests))]


if __name__ == "__main__":  # lm-eval's command line with "gopher_jax" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
