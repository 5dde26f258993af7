"""One task graded with a tokenizer and a model (model_queries.Model, or a bare logits_fn):
its prompts, its metrics and per-example predictions.

Multiple choice: the argmax over choices of sum log p(choice | prompt) (acc) and of the same
divided by the choice's UTF-8 bytes (acc_norm). Cloze: the first word of the greedy
continuation equals the target word (exact_match). Generation: the greedy continuation up to
the first stop sequence, by exact match and token F1 after SQuAD normalisation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from gopher_jax.tasks import model_queries, text_match
from gopher_jax.tasks.records import TaskScore
from gopher_jax.tasks.spec import MAIN_METRICS, Task

# A kind's default main metric: the first it allows (spec.MAIN_METRICS owns the list).
MAIN_METRIC = {kind: metrics[0] for kind, metrics in MAIN_METRICS.items()}
FEWSHOT_SEPARATOR = "\n\n"
Model = model_queries.Model | model_queries.LogitsFn


class TokenizerLike(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def prompts(task: Task) -> list[str]:
    """Each example's rendered context after its k exemplars (drawn with
    random.Random(fewshot_seed) from the other examples, each with its answer)."""
    rng = random.Random(task.fewshot_seed)
    out = []
    for i, ex in enumerate(task.examples):
        prefix = ""
        if task.num_fewshot:
            others = [j for j in range(len(task.examples)) if j != i]
            for j in rng.sample(others, task.num_fewshot):
                shot = task.examples[j]
                prefix += task.render(shot.context) + task.answer_text(shot) + FEWSHOT_SEPARATOR
        out.append(prefix + task.render(ex.context))
    return out


def _text(tok: TokenizerLike, ids: list[int]) -> str:
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    return tok.decode(ids)


def _multiple_choice(task: Task, tok: TokenizerLike, contexts: list[list[int]],
                     model: Model, seq_len: int, batch_size: int, packed: bool
                     ) -> TaskScore:
    requests = []
    for i, ex in enumerate(task.examples):
        for choice in ex.choices:
            requests.append((contexts[i], tok.encode(choice)))
    ll = model_queries.loglikelihoods(model, requests, seq_len, batch_size, packed)
    acc = acc_norm = 0.0
    predictions = []
    k = 0
    for ex in task.examples:
        raw = ll[k:k + len(ex.choices)]
        k += len(ex.choices)
        norm = [v / len(c.encode()) for v, c in zip(raw, ex.choices, strict=True)]
        pick, pick_norm = raw.index(max(raw)), norm.index(max(norm))
        acc += pick == ex.answer
        acc_norm += pick_norm == ex.answer
        predictions.append({"loglikelihoods": raw, "pred": pick, "pred_norm": pick_norm,
                            "answer": ex.answer})
    n = len(task.examples)
    return TaskScore(metrics={"acc": acc / n, "acc_norm": acc_norm / n}, predictions=predictions)


def _decoded(task: Task, tok: TokenizerLike, contexts: list[list[int]], model: Model,
             seq_len: int, batch_size: int, max_new_tokens: int, packed: bool) -> list[str]:
    def done(ids: list[int]) -> bool:
        if tok.eos_id in ids:
            return True
        text = tok.decode(ids)
        if task.kind == "cloze":
            return any(ch.isspace() for ch in text.lstrip())
        return any(s in text for s in task.stop)

    out = model_queries.greedy(model, contexts, max_new_tokens, seq_len, batch_size, done, packed)
    return [_text(tok, ids) for ids in out]


def score(task: Task, tok: TokenizerLike, model: Model, seq_len: int, batch_size: int,
          max_new_tokens: int = 32, packed: bool = True) -> TaskScore:
    """The task's metrics and a prediction per example; each prompt starts with EOS, as documents do
    in the training data. `packed` and `batch_size` change only the speed (model_queries.py)."""
    contexts = [[tok.eos_id] + tok.encode(p) for p in prompts(task)]
    if task.kind == "multiple_choice":
        return _multiple_choice(task, tok, contexts, model, seq_len, batch_size, packed)
    texts = _decoded(task, tok, contexts, model, seq_len, batch_size, max_new_tokens, packed)
    n = len(task.examples)
    if task.kind == "cloze":
        words = [text_match.first_word(t) for t in texts]
        em = [float(w == text_match.first_word(ex.target))
              for w, ex in zip(words, task.examples, strict=True)]
        return TaskScore(metrics={"exact_match": sum(em) / n},
                         predictions=[{"text": t, "word": w, "target": ex.target}
                                      for t, w, ex in zip(texts, words, task.examples,
                                                          strict=True)])
    answers = [text_match.cut_at_stop(t, task.stop).strip() for t in texts]
    em = [text_match.exact_match(a, ex.target)
          for a, ex in zip(answers, task.examples, strict=True)]
    f1 = [text_match.f1(a, ex.target) for a, ex in zip(answers, task.examples, strict=True)]
    return TaskScore(metrics={"exact_match": sum(em) / n, "f1": sum(f1) / n},
                     predictions=[{"text": a, "target": ex.target}
                                  for a, ex in zip(answers, task.examples, strict=True)])
