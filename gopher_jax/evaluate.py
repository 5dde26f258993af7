"""`python -m gopher_jax eval`: exact bits per byte of a trained workdir on held-out splits,
next to a unigram baseline computed by the same code on the same chunks."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import data, storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.data import mixture, pipeline, sources, tokenized
from gopher_jax.data.tokenizer import Tokenizer
from gopher_jax.layout import Layout
from gopher_jax.parallel import distributed
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class SplitEval:
    """One split's result in eval.json: loss (nats per token), bits per byte, the tokens and
    UTF-8 bytes scored, and the unigram baseline on the same chunks. A mixture's split also
    has the sources' shares of the rows; each of its sources' results, the chunks scored."""

    loss: float
    bits_per_byte: float
    tokens: float
    bytes: float
    chunks: float | None = None
    unigram_bits_per_byte: float | None = None
    shares: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SplitEval:
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class EvalResults:
    """What `eval` measured (<workdir>/eval.json): the checkpoint's step, whether its weights
    were int8, the data's warnings, each split's result, and for a mixture each source's
    ({name: {split: result}})."""

    step: int
    int8: bool
    warnings: tuple[str, ...]
    splits: dict[str, SplitEval]
    sources: dict[str, dict[str, SplitEval]] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"step": self.step, "int8": self.int8, "warnings": list(self.warnings),
               "splits": {k: r.to_json() for k, r in self.splits.items()}}
        if self.sources is not None:
            out["sources"] = {n: {k: r.to_json() for k, r in by.items()}
                              for n, by in self.sources.items()}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalResults:
        sources = d.get("sources")
        return cls(step=d["step"], int8=d.get("int8", False),
                   warnings=tuple(d.get("warnings", ())),
                   splits={k: SplitEval.from_json(r) for k, r in d["splits"].items()},
                   sources=None if sources is None else {
                       n: {k: SplitEval.from_json(r) for k, r in by.items()}
                       for n, by in sources.items()})


def eval_batch_size(c: ml_collections.ConfigDict) -> int:
    """A training microbatch: what is known to fit in memory with this mesh."""
    return c.train.batch_size // c.train.microbatches


def _bits_per_byte(layout: Layout, params: Any, batches: Iterable[dict], eval_step: Any
                   ) -> dict[str, float]:
    """Summed -log2 p over the summed UTF-8 bytes of the batches' weighted targets."""
    sums = np.zeros(3)
    with jax.set_mesh(layout.mesh):
        for batch in batches:
            sums += np.array(jax.device_get(eval_step(params, batch)), dtype=np.float64)
    nll, tokens, nbytes = sums
    if tokens == 0:  # an empty split measures nothing: NaN, not a perfect 0 bits per byte
        return {"loss": math.nan, "bits_per_byte": math.nan, "tokens": 0.0, "bytes": nbytes}
    return {"loss": nll / tokens, "bits_per_byte": nll / math.log(2) / nbytes,
            "tokens": tokens, "bytes": nbytes}


def evaluate_split(c: ml_collections.ConfigDict, layout: Layout | jax.sharding.Mesh,
                   params: Any, split: str, eval_step: Any = None, max_batches: int = -1
                   ) -> dict[str, float]:
    """Exact bits per byte: summed -log2 p over the summed UTF-8 bytes of the split. For a
    mixture: the mixture's (`mixture.combine`), and each source's as "bits_per_byte/<name>"."""
    if data.is_mixture(c):
        return evaluate_mixture(c, layout, params, split, eval_step, max_batches)
    layout = Layout.of(c, layout)
    eval_step = eval_step or step_lib.make_eval_step(c, layout)
    batches = data.eval_batches(c, split, eval_batch_size(c), layout.batch_sharding,
                                    max_batches=max_batches)
    return _bits_per_byte(layout, params, batches, eval_step)


def document_batches(tok: Tokenizer, docs: Iterable[str], seq_len: int, batch_size: int,
                     counts: dict[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """`docs` tokenized in memory into the chunks a prepared split holds (tokenized.py's
    ChunkPacker and record decoding), `batch_size` chunks a batch, the last one padded with
    weight-0 rows as `data.eval_batches` pads (`tokenized.padded_batch`). `counts` (when
    given) receives the documents, tokens and UTF-8 bytes of the text read."""
    packer = tokenized.ChunkPacker(seq_len, tok.eos_id, tok.pad_id, tok.piece_bytes)
    counts = counts if counts is not None else {}
    counts.update(documents=0, text_bytes=0)
    pending: list[bytes] = []

    def full_batches(records: np.ndarray, final: bool) -> Iterator[dict[str, np.ndarray]]:
        pending.extend(r.astype("<i4").tobytes() for r in records)
        while len(pending) >= batch_size or (final and pending):
            rows, pending[:] = pending[:batch_size], pending[batch_size:]
            got = tokenized.decode_records(rows, seq_len)
            batch = tokenized.padded_batch(batch_size, seq_len, tok.pad_id)
            for key, value in got.items():
                batch[key][:len(rows)] = value
            yield batch

    it = iter(docs)
    while group := list(itertools.islice(it, tokenized.ENCODE_BATCH)):
        counts["documents"] += len(group)
        counts["text_bytes"] += sum(len(d.encode("utf-8")) for d in group)
        yield from full_batches(packer.add(tok.encode_batch(group)), final=False)
    yield from full_batches(packer.finish(), final=True)
    counts["tokens"] = packer.num_tokens


def evaluate_documents(c: ml_collections.ConfigDict, layout: Layout | jax.sharding.Mesh,
                       params: Any, docs: Iterable[str], tok: Tokenizer | None = None,
                       eval_step: Any = None) -> dict[str, float]:
    """Exact bits per byte of any documents, as `evaluate_split` measures a prepared split
    (the same chunks, targets, byte counts and eval step): what `evaluate_split` returns,
    plus "documents" and "text_bytes" (the UTF-8 bytes of the documents as given; "bytes"
    counts what the model sees, the same unless the tokenizer normalises NFKC)."""
    layout = Layout.of(c, layout)
    eval_step = eval_step or step_lib.make_eval_step(c, layout)
    tok = tok or data.load_tokenizer(c)
    counts: dict[str, int] = {}
    batches = (jax.device_put(b, layout.batch_sharding) for b in
               document_batches(tok, docs, c.data.seq_len, eval_batch_size(c), counts))
    out = _bits_per_byte(layout, params, batches, eval_step)
    return {**out, "documents": float(counts["documents"]),
            "text_bytes": float(counts["text_bytes"])}


def evaluate_sources(c: ml_collections.ConfigDict, layout: Layout | jax.sharding.Mesh,
                     params: Any, split: str, eval_step: Any = None, max_batches: int = -1
                     ) -> dict[str, dict[str, float]]:
    """Each source of a mixture on its own `split` (a source without that split is left
    out): what `evaluate_split` returns, plus "chunks", the number of chunks evaluated."""
    layout = Layout.of(c, layout)
    eval_step = eval_step or step_lib.make_eval_step(c, layout)
    out = {}
    for s in sources.sources(c):
        sc = mixture.source_config(c, s)
        if not pipeline.has_split(sc, split):
            continue
        r = evaluate_split(sc, layout, params, split, eval_step, max_batches)
        n = len(pipeline.open_chunks(sc, split))
        r["chunks"] = float(n if max_batches < 0 else min(n, max_batches * eval_batch_size(c)))
        out[s.name] = r
    return out


def _combined(c: ml_collections.ConfigDict, per: dict[str, dict[str, float]],
              bits_key: str = "bits_per_byte") -> dict[str, float]:
    sums = {n: {"nll": r[bits_key] * r["bytes"] * math.log(2), "tokens": r["tokens"],
                "bytes": r["bytes"], "chunks": r["chunks"]}
            for n, r in per.items() if r["tokens"] > 0}
    return mixture.combine(c, sums)


def _mixture_totals(c: ml_collections.ConfigDict, per: dict[str, dict[str, float]]
                    ) -> dict[str, float]:
    """The mixture's combined result from its sources', with their summed tokens and bytes."""
    out = _combined(c, per)
    out.update(tokens=sum(r["tokens"] for r in per.values()),
               bytes=sum(r["bytes"] for r in per.values()))
    return out


def evaluate_mixture(c: ml_collections.ConfigDict, layout: Layout | jax.sharding.Mesh,
                     params: Any, split: str, eval_step: Any = None, max_batches: int = -1
                     ) -> dict[str, float]:
    """The mixture's bits per byte and loss on `split` (`mixture.combine`), its summed
    tokens and bytes, and each source's bits per byte as "bits_per_byte/<name>"."""
    per = evaluate_sources(c, layout, params, split, eval_step, max_batches)
    out = _mixture_totals(c, per)
    out.update({f"bits_per_byte/{n}": r["bits_per_byte"] for n, r in per.items()})
    return out


def restore_params(c: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   layout: Layout | jax.sharding.Mesh, int8: bool = False) -> tuple[Any, int]:
    """(params, step) of the newest checkpoint; with `int8` every kernel weight-only int8
    (model/int8.py)."""
    directory = storage.path(workdir) / workdir_lib.CHECKPOINTS
    if not directory.is_dir():
        raise ckpt_lib.CheckpointError(
            f"no checkpoints in {workdir}", f"train first with `python -m gopher_jax train "
            f"--config ... --workdir {workdir}`, or pass the --workdir of a trained run")
    ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        restored = ckpt.restore_latest(Layout.of(c, layout).state,
                                       check=lambda meta: ckpt_lib.check_config(
                                           meta, c, ckpt_lib.EVAL_KEYS))
    finally:
        ckpt.close()
    if restored is None:
        raise ckpt_lib.CheckpointError(
            f"no checkpoint in {directory}", "train first with `python -m gopher_jax train "
            f"--config ... --workdir {workdir}`")
    state, meta = restored
    if int8:
        from gopher_jax.model import int8 as int8_lib

        return int8_lib.quantize(c.model, state["params"]), meta.step
    return state["params"], meta.step


def unigram_bits_per_byte(c: ml_collections.ConfigDict, split: str) -> float:
    """Bits per byte of a unigram model fitted (add-one smoothed) on the train split's
    token counts, scored on `split` with the same target weights as the model."""
    counts = np.ones(c.model.vocab_size)
    for b in data.eval_batches(c, c.data.train_split, 256):
        _, _, targets, w = step_lib.split_batch(b)
        np.add.at(counts, np.asarray(targets)[np.asarray(w) > 0], 1)
    logp = np.log(counts / counts.sum())
    nll = nbytes = 0.0
    for b in data.eval_batches(c, split, 256):
        _, _, targets, w = step_lib.split_batch(b)
        nll -= float(np.sum(logp[np.asarray(targets)] * np.asarray(w)))
        nbytes += float(np.sum(b["num_bytes"]))
    return nll / math.log(2) / nbytes


def _mixture_split(c: ml_collections.ConfigDict, layout: Layout, params: Any, split: str,
                   eval_step: Any, by_source: dict[str, dict[str, SplitEval]]) -> SplitEval:
    """The mixture's result on `split` for `run` (model and unigram baseline, combined the
    same way); each source's own goes into by_source[name][split]."""
    per = evaluate_sources(c, layout, params, split, eval_step)
    for s in sources.sources(c):
        if s.name in per:
            per[s.name]["unigram_bits_per_byte"] = unigram_bits_per_byte(
                mixture.source_config(c, s), split)
            by_source.setdefault(s.name, {})[split] = SplitEval(**per[s.name])
    return SplitEval(
        **_mixture_totals(c, per),
        unigram_bits_per_byte=_combined(c, per, "unigram_bits_per_byte")["bits_per_byte"],
        shares={n: v for n, v in sources.shares(c).items() if n in per})


def run(c: ml_collections.ConfigDict, workdir: str | os.PathLike, int8: bool = False
        ) -> EvalResults:
    """Bits per byte of the workdir's newest checkpoint on the eval and test splits, each with
    its unigram baseline; written to <workdir>/eval.json (process 0) and returned. For a
    mixture, `splits` holds the mixture's and `sources` each source's.
    With `int8` the weights are int8 (model/int8.py), "int8" is true in the results and they
    go to eval_int8.json instead."""
    distributed.initialize_from_env()
    layout = Layout.build(c, mesh_lib.make_mesh(c))
    # The checkpoint first: a workdir without one is refused before any data is built.
    params, step = restore_params(c, workdir, layout, int8)
    if int8:  # int8 kernels are (values, scales): the eval step takes their shardings
        layout = layout.with_params(params)
    info = distributed.run_on_process_zero_first(lambda: data.prepare(c))
    eval_step = step_lib.make_eval_step(c, layout)
    splits: dict[str, SplitEval] = {}
    by_source: dict[str, dict[str, SplitEval]] | None = {} if data.is_mixture(c) else None
    for split in dict.fromkeys((c.data.eval_split, c.data.test_split)):
        if split not in info.splits:
            continue
        if by_source is not None:
            splits[split] = _mixture_split(c, layout, params, split, eval_step, by_source)
            continue
        splits[split] = SplitEval(**evaluate_split(c, layout, params, split, eval_step),
                                  unigram_bits_per_byte=unigram_bits_per_byte(c, split))
    results = EvalResults(step=step, int8=int8, warnings=tuple(info.warnings), splits=splits,
                          sources=by_source)
    if jax.process_index() == 0:
        name = workdir_lib.int8_name(workdir_lib.EVAL_JSON, int8)
        (storage.path(workdir) / name).write_text(
            json.dumps(results.to_json(), indent=2))
    return results
