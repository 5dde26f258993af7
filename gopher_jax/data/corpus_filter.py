"""A corpus filtered as MassiveText was (Gopher paper, appendix A), in resumable shards.

    manifest = filter_corpus(cfg, out_dir, processes=2, log=print)

`cfg.data` names one source (dataset, text_files, text_field, splits); the training split
goes through five stages, each reported in `out_dir/audit/<stage>.{json,md}` (documents and
bytes removed per rule, a few examples with their ids and a snippet):

1. quality     per document, filters.quality_rule            (parallel, one task per shard)
2. repetition  per document, filters.repetition_rule         (same task)
3. exact_dedup identical texts: the first (smallest id) stays  (whole split)
4. near_dedup  13-gram Jaccard >= 0.8 clusters keep their first (dedup.near_duplicates)
5. test_set    13-gram Jaccard >= 0.8 to any document of the evaluation splits

and then, with data.pii (the default), the kept documents' personal data (e-mail addresses,
phone numbers, IP addresses, payment cards: gopher_jax.pii) is replaced by placeholders,
counted per kind in `audit/pii.{json,md}` and the manifest. Dedup and test-set removal see
the original text; the evaluation splits are never redacted (they are scored as they are).

`filter_corpus` runs these as steps over one shared `_Filtering`: _read (the source, the
settings' fingerprint, the shards; a finished result is reused), _rules (stages 1-2),
_exact_dedup, _near_dedup, _test_set (stages 3-5), _docs (the kept documents, redacted) and
_write (the audits, then the manifest).

The evaluation splits are not filtered (they are the benchmarks); their 13-grams are only
read for stage 5. A document's id is its index in its split's stored order, so "the first"
is well defined and the result does not depend on the shards or the processes.

Files (each written whole: on a file system to a temporary name and renamed, in a gs://
folder as one upload, which appears whole or not at all; `manifest.json` last, so a killed
filtering never leaves a folder that looks finished):
  work/<split>-<k>-<fp>.{jsonl,npz,json}  stage 1-2 survivors, their hashes/MinHash/13-grams,
                                         the shard's counts (the .json marks it finished)
  removed.json                          stages 3-5: {removed id: the id it duplicates}
  docs/<split>-<k>.jsonl                the filtered documents, {"id", "text"} per line
  audit/<stage>.json, audit/<stage>.md  the reports (and audit/pii.{json,md})
  manifest.json                         settings, fingerprint, every shard's counts and hash

At scale (a corpus larger than one machine): `filter_corpus(..., engine=Engine(...))` runs
the same stages as datatrove executor stages (local, SLURM or Ray; engine.py) with the same
outputs, dedup over sharded files (dedup_sharded.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import ml_collections
import numpy as np

from gopher_jax import storage
from gopher_jax.data import artefacts, builders, dedup, filters, prepare_lock, shards
from gopher_jax.data.digests import digest, file_sha
from gopher_jax.data.records import FilterManifest, FilterShard
from gopher_jax.errors import DataError

FILTER_FORMAT = 1
STAGES = ("quality", "repetition", "exact_dedup", "near_dedup", "test_set")
EXAMPLES = 3  # per rule in the audit
SNIPPET = 100  # characters
PII_CONTEXT = 40  # characters either side of the first placeholder in a redaction example


def settings(cfg: ml_collections.ConfigDict, fcfg: filters.FilterConfig) -> dict:
    """Everything the filtered documents depend on (the output folder's fingerprint)."""
    return {"format": FILTER_FORMAT, "corpus": artefacts.corpus_name(cfg),
            "train_split": cfg.data.train_split,
            "eval_splits": sorted({cfg.data.eval_split, cfg.data.test_split}),
            "docs_per_shard": cfg.data.docs_per_shard, "ngram": dedup.NGRAM,
            "jaccard": dedup.JACCARD, "minhash": [dedup.BANDS, dedup.ROWS],
            "filters": repr(fcfg), "pii": pii_on(cfg)}


def pii_on(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the kept training documents are redacted (data.pii)."""
    return bool(cfg.data.get("pii", True))


def _doc_id(split: str, i: int) -> str:
    return f"{split}:{i}"


def _snippet(text: str) -> str:
    s = " ".join(text[:SNIPPET * 2].split())
    return s[:SNIPPET] + ("..." if len(s) > SNIPPET else "")


def _stage1_shard(cfg: ml_collections.ConfigDict, fcfg: filters.FilterConfig, split: str,
                  index: int, start: int, stop: int, folder: str, fp: str,
                  apply_rules: bool) -> dict:
    """Quality and repetition on docs [start, stop) of `split` (when apply_rules), then the
    survivors' text hashes, MinHash signatures and 13-gram sets. Skips a finished shard:
    its summary (`.json`) is written after its other files."""
    folder = storage.data_path(folder)
    stem = f"{split}-{index:05d}-{fp}"
    done = folder / f"{stem}.json"
    if done.is_file():
        return json.loads(done.read_text())
    texts = shards.read_range(cfg, split, start, stop)
    rules: dict[str, dict[str, dict]] = {"quality": {}, "repetition": {}}
    kept: list[tuple[int, str]] = []
    for i, text in zip(range(start, stop), texts, strict=True):
        hit = filters.first_rule(text, fcfg) if apply_rules else None
        if hit is None:
            kept.append((i, text))
            continue
        stage, rule = hit
        r = rules[stage].setdefault(rule, {"docs": 0, "bytes": 0, "examples": []})
        r["docs"] += 1
        r["bytes"] += len(text.encode("utf-8"))
        if len(r["examples"]) < EXAMPLES:
            r["examples"].append({"id": _doc_id(split, i), "snippet": _snippet(text)})
    sets = [dedup.shingles(t) for _, t in kept]
    sigs = np.stack([dedup.signature(s) for s in sets]) if sets \
        else np.zeros((0, dedup.NUM_PERM), np.uint64)
    shards.save_arrays(
        folder / f"{stem}.npz", ids=np.array([i for i, _ in kept], np.int64),
        hashes=np.array([dedup.text_hash(t) for _, t in kept], np.uint64), sigs=sigs,
        set_lengths=np.array([len(s) for s in sets], np.int64),
        set_values=np.concatenate(sets) if sets else np.zeros(0, np.uint64),
        nbytes=np.array([len(t.encode("utf-8")) for _, t in kept], np.int64),
        snippets=np.array([_snippet(t) for _, t in kept], dtype=f"<U{SNIPPET + 3}"))
    if apply_rules:
        shards.write_docs(folder / f"{stem}.jsonl", kept)
    summary = {"split": split, "index": index, "start": start, "stop": stop,
               "docs_in": stop - start,
               "bytes_in": sum(len(t.encode("utf-8")) for t in texts),
               "docs_out": len(kept), "rules": rules}
    storage.write_atomic(done, json.dumps(summary))
    return summary


def _load_stage1(folder: pathlib.Path, split: str, plan, fp: str) -> dict:
    parts = [shards.load_arrays(folder / f"{split}-{k:05d}-{fp}.npz")
             for k in range(len(plan))]
    ids = np.concatenate([p["ids"] for p in parts]) if parts else np.zeros(0, np.int64)
    values = [np.split(p["set_values"], np.cumsum(p["set_lengths"])[:-1]) if len(p["ids"])
              else [] for p in parts]
    return {"ids": ids,
            "hashes": np.concatenate([p["hashes"] for p in parts]) if parts else ids,
            "sigs": np.concatenate([p["sigs"] for p in parts]) if parts
            else np.zeros((0, dedup.NUM_PERM), np.uint64),
            "sets": [s for v in values for s in v],
            "nbytes": np.concatenate([p["nbytes"] for p in parts]) if parts else ids,
            "snippets": np.concatenate([p["snippets"] for p in parts]) if parts else []}


def _exact(train: dict, evals: dict[str, dict], rest: list[int]) -> dict[int, int]:
    """Identical texts among the rows `rest`: the first (smallest id) stays."""
    return dedup.exact_duplicates([int(train["ids"][k]) for k in rest],
                                  [int(train["hashes"][k]) for k in rest])


def _near(train: dict, evals: dict[str, dict], rest: list[int]) -> dict[int, int]:
    """13-gram Jaccard >= 0.8 clusters among the rows `rest`: each keeps its first."""
    return dedup.near_duplicates([int(train["ids"][k]) for k in rest], train["sigs"][rest],
                                 [train["sets"][k] for k in rest])


def _test(train: dict, evals: dict[str, dict], rest: list[int]) -> dict[int, str]:
    """The rows `rest` with a 13-gram Jaccard >= 0.8 to a document of the evaluation splits."""
    eval_ids = [_doc_id(s, int(i)) for s, e in evals.items() for i in e["ids"]]
    eval_sigs = np.concatenate([e["sigs"] for e in evals.values()]) if evals \
        else np.zeros((0, dedup.NUM_PERM), np.uint64)
    eval_sets = [s for e in evals.values() for s in e["sets"]]
    return dedup.test_set_overlap([int(train["ids"][k]) for k in rest], train["sigs"][rest],
                                  [train["sets"][k] for k in rest], eval_ids, eval_sigs,
                                  eval_sets)


DEDUP = {"exact_dedup": _exact, "near_dedup": _near, "test_set": _test}  # in stage order


def _dedup(stage: str, train: dict, evals: dict[str, dict],
           removed: dict[str, dict[int, str]]) -> dict[int, str]:
    """One dedup stage on the training documents the stages before it (`removed`) kept:
    {removed train id: the id it matched}."""
    gone = {i for v in removed.values() for i in v}
    rest = [k for k, i in enumerate(train["ids"]) if int(i) not in gone]
    return {i: str(j) for i, j in DEDUP[stage](train, evals, rest).items()}


def _stage2(train: dict, evals: dict[str, dict]) -> dict[str, dict[int, str]]:
    """{stage: {removed train id: the id it matched}} for exact, near and test-set removal."""
    removed: dict[str, dict[int, str]] = {}
    for stage in DEDUP:
        removed[stage] = _dedup(stage, train, evals, removed)
    return removed


def _audit(stage: str, docs_in: int, bytes_in: int, rules: dict[str, dict]) -> dict:
    removed = sum(r["docs"] for r in rules.values())
    removed_bytes = sum(r["bytes"] for r in rules.values())
    return {"stage": stage, "docs_in": docs_in, "bytes_in": bytes_in,
            "docs_removed": removed, "bytes_removed": removed_bytes,
            "docs_out": docs_in - removed, "bytes_out": bytes_in - removed_bytes,
            "rules": dict(sorted(rules.items()))}


def _markdown(a: dict) -> str:
    lines = [f"# {a['stage']}", "",
             f"{a['docs_in']:,} documents ({a['bytes_in']:,} bytes) in, {a['docs_removed']:,} "
             f"({a['bytes_removed']:,} bytes) removed, {a['docs_out']:,} out.", ""]
    if a["rules"]:
        lines += ["| rule | documents | bytes | examples |", "|---|---:|---:|---|"]
        for name, r in a["rules"].items():
            ex = "; ".join(f"`{e['id']}`" + (f" (= `{e['matched']}`)" if "matched" in e else "")
                           + f" {e['snippet'][:60]!r}" for e in r["examples"])
            lines.append(f"| {name} | {r['docs']:,} | {r['bytes']:,} | {ex} |")
    return "\n".join(lines) + "\n"


def _merge_rules(summaries: list[dict], stage: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for s in summaries:  # shard order = id order: the first examples are the smallest ids
        for name, r in s["rules"][stage].items():
            m = out.setdefault(name, {"docs": 0, "bytes": 0, "examples": []})
            m["docs"] += r["docs"]
            m["bytes"] += r["bytes"]
            m["examples"] = (m["examples"] + r["examples"])[:EXAMPLES]
    return out


class FilterEngine(Protocol):
    """Runs the stages elsewhere (engine.Engine: datatrove's executors) from the plan made
    here, writing the same files; returns the manifest."""

    def filter_corpus(self, cfg: ml_collections.ConfigDict, fcfg: filters.FilterConfig,
                      out: pathlib.Path, fp: str, conf: dict,
                      plans: dict[str, list[tuple[int, int]]],
                      log: Callable[[str], None]) -> FilterManifest: ...


@dataclasses.dataclass
class _Filtering:
    """What the steps of `filter_corpus` share."""

    cfg: ml_collections.ConfigDict
    fcfg: filters.FilterConfig
    out: pathlib.Path
    processes: int
    log: Callable[[str], None]
    t0: float
    builder: Any
    conf: dict
    fp: str
    plans: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)
    reused: FilterManifest | None = None  # the output folder holds these settings' result
    summaries: list[dict] = dataclasses.field(default_factory=list)  # training shards, stage 1
    train: dict = dataclasses.field(default_factory=dict)  # the survivors' arrays, stage 1
    removed: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)  # stages 3-5
    cached: bool = False  # stages 3-5 read from removed.json
    shard_rows: list[FilterShard] = dataclasses.field(default_factory=list)
    pii_reports: list[dict] = dataclasses.field(default_factory=list)
    manifest: FilterManifest | None = None

    @property
    def split(self) -> str:
        return self.cfg.data.train_split

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.plans if s != self.split]


def filter_corpus(cfg: ml_collections.ConfigDict, out_dir: str | os.PathLike | None = None,
                  processes: int = 1, log: Callable[[str], None] | None = None,
                  fcfg: filters.FilterConfig = filters.PAPER,
                  engine: FilterEngine | None = None) -> FilterManifest:
    """Filters the training split of the source `cfg.data` names into `out_dir` (default
    `artefacts.filter_dir(cfg)`); idempotent: finished shards and stages are reused. Returns the
    manifest (also `out_dir/manifest.json`). With `engine` (engine.Engine) the stages run
    on its executor and tasks, with the same outputs."""
    if processes < 1:
        raise DataError(f"--processes {processes}", "give 1 or more")
    log = log or (lambda msg: None)
    with contextlib.ExitStack() as locks:
        for folder in _locked_folders(cfg, out_dir):
            locks.enter_context(prepare_lock.preparing(folder, log))
        f = _read(cfg, out_dir, processes, log, fcfg)
        if f.reused is not None:
            return f.reused
        if engine is not None:
            return engine.filter_corpus(cfg, fcfg, f.out, f.fp, f.conf, f.plans, f.log)
        for step in (_rules, _exact_dedup, _near_dedup, _test_set, _docs, _write):
            step(f)
        return f.manifest


def _locked_folders(cfg: ml_collections.ConfigDict,
                    out_dir: str | os.PathLike | None) -> list[str]:
    """The folders whose preparation lock (prepare_lock.py) a filtering holds while it
    writes: the data dir (the dataset, the default output folder), and an output folder
    outside it, so that two filterings into one folder never write at once."""
    data_dir = str(storage.path(cfg.data.data_dir)).rstrip("/")
    if out_dir is None or str(storage.path(out_dir)).startswith(data_dir + "/"):
        return [cfg.data.data_dir]
    return [cfg.data.data_dir, os.fspath(out_dir)]


def _finished(out: pathlib.Path, fp: str) -> FilterManifest | None:
    """The manifest of a finished result of the settings `fp` in `out`, if there is one."""
    manifest_path = out / artefacts.MANIFEST
    if manifest_path.is_file():
        stored = json.loads(manifest_path.read_text())
        if stored.get("fingerprint") == fp:
            return FilterManifest.from_json(stored)
    return None


def _read(cfg: ml_collections.ConfigDict, out_dir: str | os.PathLike | None, processes: int,
          log: Callable[[str], None], fcfg: filters.FilterConfig) -> _Filtering:
    """The source, the settings' fingerprint and the shards of every split; a finished
    result of these settings is reused, the work files of other settings removed."""
    d = cfg.data
    out = storage.data_path(out_dir) if out_dir is not None else artefacts.filter_dir(cfg)
    builder = builders.prepare_builder(cfg, log)
    builders.require_split(builder, d.train_split, f"dataset {d.dataset!r}",
                           "set data.train_split")
    conf = settings(cfg, fcfg)
    f = _Filtering(cfg, fcfg, out, processes, log, time.time(), builder, conf,
                   digest([conf, builders.corpus_fingerprint(builder)]))
    f.reused = _finished(out, f.fp)
    if f.reused is None:
        for folder in _locked_folders(cfg, out_dir):
            prepare_lock.hold(folder)  # and look again: another job may have finished it
        f.reused = _finished(out, f.fp)
    if f.reused is not None:
        log(f"[filter] reusing {out} ({f.reused.docs_out:,} of "
            f"{f.reused.docs_in:,} training documents kept)")
        return f
    for folder in (out / artefacts.FILTER_WORK, out / artefacts.FILTER_DOCS,
                   out / artefacts.FILTER_AUDIT):
        folder.mkdir(parents=True, exist_ok=True)
        shards.remove_stale_temporaries(folder)
    for p in (out / artefacts.FILTER_WORK).glob("*"):  # other settings or corpus versions
        if f"-{f.fp}." not in p.name:
            p.unlink()
    eval_splits = [s for s in conf["eval_splits"] if s in builder.info.splits
                   and s != d.train_split]
    f.plans = {s: shards.shard_ranges(builder.info.splits[s].num_examples, d.docs_per_shard)
               for s in [d.train_split, *eval_splits]}
    return f


def _rules(f: _Filtering) -> None:
    """Stages 1-2, quality and repetition, one task per shard (every split's shards also
    store their 13-gram sets for stages 3-5); then the survivors' arrays, and stages 3-5
    when removed.json holds them for these settings."""
    work = f.out / artefacts.FILTER_WORK
    tasks = [(f.cfg, f.fcfg, s, k, a, b, str(work), f.fp, s == f.split)
             for s, plan in f.plans.items() for k, (a, b) in enumerate(plan)]
    f.log(f"[filter] {f.builder.name}: {len(tasks)} shards of <= {f.cfg.data.docs_per_shard} "
          f"documents on {f.processes} process(es)")
    f.summaries = [s for s in shards.run_tasks(_stage1_shard, tasks, f.processes)
                   if s["split"] == f.split]
    f.log(f"[filter] quality and repetition done ({time.time() - f.t0:.1f}s)")
    f.train = _load_stage1(work, f.split, f.plans[f.split], f.fp)
    path = f.out / artefacts.REMOVED
    stored = json.loads(path.read_text()) if path.is_file() else None
    if stored is not None and stored.get("fingerprint") == f.fp:
        f.removed = {k: {int(i): j for i, j in stored[k].items()} for k in DEDUP}
        f.cached = True


def _dedup_stage(f: _Filtering, stage: str, evals: dict[str, dict] | None = None) -> None:
    if not f.cached:
        f.removed[stage] = _dedup(stage, f.train, evals or {}, f.removed)


def _exact_dedup(f: _Filtering) -> None:
    """Stage 3: identical texts, the first stays."""
    _dedup_stage(f, "exact_dedup")


def _near_dedup(f: _Filtering) -> None:
    """Stage 4: near-duplicate clusters keep their first."""
    _dedup_stage(f, "near_dedup")


def _test_set(f: _Filtering) -> None:
    """Stage 5: documents too close to an evaluation document; stages 3-5 go to
    removed.json."""
    if not f.cached:
        work = f.out / artefacts.FILTER_WORK
        _dedup_stage(f, "test_set",
                     {s: _load_stage1(work, s, f.plans[s], f.fp) for s in f.eval_splits})
        storage.write_atomic(f.out / artefacts.REMOVED, json.dumps(
            {"fingerprint": f.fp, **{k: {str(i): j for i, j in v.items()}
                                     for k, v in f.removed.items()}}))
    f.log(f"[filter] dedup and test-set filtering done ({time.time() - f.t0:.1f}s)")


def _docs(f: _Filtering) -> None:
    """The kept documents, one file per shard (redacted with data.pii)."""
    work, gone = f.out / artefacts.FILTER_WORK, {i for v in f.removed.values() for i in v}
    for s in f.summaries:
        kept = [(i, t) for i, t in shards.read_docs(work / f"{stage1_stem(s, f.fp)}.jsonl")
                if i not in gone]
        row, report = write_shard_docs(f.out / artefacts.FILTER_DOCS, s, kept, f.conf["pii"])
        f.shard_rows.append(row)
        if report is not None:
            f.pii_reports.append(report)


def _write(f: _Filtering) -> None:
    """The audits of every stage and, last, the manifest."""
    row = {int(i): k for k, i in enumerate(f.train["ids"])}
    later = {}
    for stage, gone in f.removed.items():
        matched = {i: (j if stage == "test_set" else _doc_id(f.split, int(j)))
                   for i, j in gone.items()}
        later[stage] = removal_rules(stage, f.split, matched,
                                     lambda i: int(f.train["nbytes"][row[i]]),
                                     lambda i: str(f.train["snippets"][row[i]]))
    f.manifest = write_reports(f.out, f.fp, f.conf, f.split, f.summaries, later,
                               f.shard_rows, f.pii_reports, f.log, f.t0)


REMOVAL_RULES = {"exact_dedup": "identical_text", "near_dedup": "jaccard_13gram_ge_0.8",
                 "test_set": "eval_jaccard_13gram_ge_0.8"}


def stage1_stem(summary: dict, fp: str) -> str:
    """The stage-1 files' name (without suffix) of a shard, from its summary."""
    return f"{summary['split']}-{summary['index']:05d}-{fp}"


def removal_rules(stage: str, split: str, matched: dict[int, str],
                  nbytes: Callable[[int], int], snippet: Callable[[int], str]) -> dict:
    """A dedup stage's audit rules ({rule: {docs, bytes, examples}}) for the removed ids
    `matched` ({id: the id it matched}), examples the smallest ids."""
    gone = sorted(matched)
    if not gone:
        return {}
    return {REMOVAL_RULES[stage]: {
        "docs": len(gone), "bytes": int(sum(nbytes(i) for i in gone)),
        "examples": [{"id": _doc_id(split, i), "matched": matched[i], "snippet": snippet(i)}
                     for i in gone[:EXAMPLES]]}}


def _pii_example(split: str, i: int, redacted: str, counts: dict[str, int]) -> dict:
    """The redacted text around its first placeholder (never the original value)."""
    from gopher_jax import pii

    at = min(p for p in (redacted.find(v) for v in pii.PLACEHOLDERS.values()) if p >= 0)
    context = " ".join(redacted[max(0, at - PII_CONTEXT):at + 2 * PII_CONTEXT].split())
    return {"id": _doc_id(split, i), "kinds": [k for k, n in counts.items() if n],
            "snippet": context}


def redact_docs(split: str, docs: list[tuple[int, str]]
                ) -> tuple[list[tuple[int, str]], dict]:
    """The documents with their personal data replaced (gopher_jax.pii.redact), and the
    report: documents redacted, matches per kind, the first few examples."""
    from gopher_jax import pii

    report = {"docs": 0, "counts": dict.fromkeys(pii.KINDS, 0), "examples": []}
    out = []
    for i, text in docs:
        redacted, counts = pii.redact(text)
        if any(counts.values()):
            report["docs"] += 1
            for kind, n in counts.items():
                report["counts"][kind] += n
            if len(report["examples"]) < EXAMPLES:
                report["examples"].append(_pii_example(split, i, redacted, counts))
        out.append((i, redacted))
    return out, report


def write_shard_docs(docs_dir: pathlib.Path, summary: dict, kept: list[tuple[int, str]],
                     pii: bool) -> tuple[FilterShard, dict | None]:
    """One shard's filtered documents (with `pii`, redacted); returns its row of the manifest
    and its redaction report (None without `pii`)."""
    report = None
    if pii:
        kept, report = redact_docs(summary["split"], kept)
    name = f"{summary['split']}-{summary['index']:05d}.jsonl"
    target = docs_dir / name
    shards.write_docs(target, kept)
    return FilterShard(index=summary["index"], start=summary["start"], stop=summary["stop"],
                       docs_in=summary["docs_in"], docs_out=len(kept), path=name,
                       sha256=file_sha(target)), report


def _merge_pii(reports: list[dict], docs_in: int) -> dict:
    counts: dict[str, int] = {}
    for r in reports:
        for kind, n in r["counts"].items():
            counts[kind] = counts.get(kind, 0) + n
    return {"stage": "pii", "docs_in": docs_in, "docs_redacted": sum(r["docs"] for r in reports),
            "counts": counts,
            "examples": [e for r in reports for e in r["examples"]][:EXAMPLES]}


def _pii_markdown(a: dict) -> str:
    lines = ["# pii", "", f"{a['docs_redacted']:,} of {a['docs_in']:,} kept documents redacted.",
             "", "| kind | matches |", "|---|---:|"]
    lines += [f"| {kind} | {n:,} |" for kind, n in a["counts"].items()]
    lines += ["", "Examples (redacted text):", ""]
    lines += [f"- `{e['id']}` ({', '.join(e['kinds'])}): {e['snippet']!r}" for e in a["examples"]]
    return "\n".join(lines) + "\n"


def write_reports(out: pathlib.Path, fp: str, conf: dict, split: str,
                  train_summaries: list[dict], later: dict[str, dict],
                  shard_rows: list[FilterShard], pii_reports: list[dict],
                  log: Callable[[str], None], t0: float) -> FilterManifest:
    """The audits (stage order, then pii when `conf` has it on) and, last, the manifest,
    from the stage-1 summaries (shard order), the dedup stages' rules, the shards' rows and
    their redaction reports."""
    audit_dir = out / artefacts.FILTER_AUDIT
    docs_in = sum(s["docs_in"] for s in train_summaries)
    bytes_in = sum(s["bytes_in"] for s in train_summaries)
    audits = []
    for stage in STAGES:
        rules = _merge_rules(train_summaries, stage) if stage in ("quality", "repetition") \
            else later[stage]
        a = _audit(stage, docs_in, bytes_in, rules)
        audits.append(a)
        docs_in, bytes_in = a["docs_out"], a["bytes_out"]
    for a in audits:
        storage.write_atomic(audit_dir / f"{a['stage']}.json", json.dumps(a, indent=1))
        storage.write_atomic(audit_dir / f"{a['stage']}.md", _markdown(a))
    pii = {}
    if conf["pii"]:
        a = _merge_pii(pii_reports, audits[-1]["docs_out"])
        storage.write_atomic(audit_dir / "pii.json", json.dumps(a, indent=1))
        storage.write_atomic(audit_dir / "pii.md", _pii_markdown(a))
        pii = {"docs_redacted": a["docs_redacted"], "counts": a["counts"]}
    manifest = FilterManifest(
        fingerprint=fp, settings=conf, split=split, docs_in=audits[0]["docs_in"],
        bytes_in=audits[0]["bytes_in"], docs_out=audits[-1]["docs_out"],
        bytes_out=audits[-1]["bytes_out"],
        stages={a["stage"]: {"docs_removed": a["docs_removed"],
                             "bytes_removed": a["bytes_removed"]} for a in audits},
        shards=tuple(shard_rows), pii=pii)
    storage.write_atomic(out / artefacts.MANIFEST, json.dumps(manifest.to_json(), indent=1))
    log(f"[filter] {manifest.docs_out:,} of {manifest.docs_in:,} training documents "
        f"kept ({time.time() - t0:.1f}s); reports in {audit_dir}")
    return manifest


def read_manifest(out: pathlib.Path) -> FilterManifest:
    return FilterManifest.from_json(json.loads((out / artefacts.MANIFEST).read_text()))


def _passes_rules(doc) -> bool:
    return filters.first_rule(doc.text) is None


def datatrove_rules_pipeline(input_folder: str, output_folder: str,
                             exclusion_folder: str | None = None) -> list:
    """Stages 1-2 (quality, repetition) as datatrove pipeline steps over .jsonl documents
    ({"id", "text"} per line, as docs/ holds them), for a corpus larger than one machine:

        from datatrove.executor import SlurmPipelineExecutor   # or RayPipelineExecutor
        SlurmPipelineExecutor(datatrove_rules_pipeline("s3://raw", "s3://kept"), tasks=1000,
                              time="10:00:00", partition="cpu", logging_dir="s3://logs").run()

    The rules are this module's (filters.first_rule), so the kept documents equal stage 1-2
    here; removed ones go to `exclusion_folder` when given. Stages 3-5 at that scale: see
    README.md ("Filtering and preparing a corpus")."""
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    # Plain .jsonl (no gzip): a `text_files` corpus reads them as they are.
    excluded = JsonlWriter(exclusion_folder, compression=None) if exclusion_folder else None
    return [JsonlReader(input_folder, glob_pattern="*.jsonl"),
            LambdaFilter(_passes_rules, exclusion_writer=excluded),
            JsonlWriter(output_folder, compression=None)]
