"""MassiveText filters: the paper's thresholds, each rule just inside and just outside its
threshold, MinHash near-duplicates, test-set filtering, and one filtered corpus end to end."""

import inspect
import json
import random
import shutil
import string

import numpy as np
import pytest

from gopher_jax.config import base_config
from gopher_jax.data import builders, corpus_filter, dedup, filters

# From the Gopher paper (appendix A, Table A1), as ../shared/GOPHER.md states it.
PAPER_QUALITY = {"min_doc_words": 50, "max_doc_words": 100_000, "min_avg_word_length": 3,
                 "max_avg_word_length": 10, "max_symbol_word_ratio": 0.1,
                 "max_bullet_lines_ratio": 0.9, "max_ellipsis_lines_ratio": 0.3,
                 "max_non_alpha_words_ratio": 0.8, "min_stop_words": 2}
PAPER_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
PAPER_REPETITION = {"dup_line_frac": 0.30, "dup_para_frac": 0.30, "dup_line_char_frac": 0.20,
                    "dup_para_char_frac": 0.20,
                    "top_n_grams": ((2, 0.20), (3, 0.18), (4, 0.16)),
                    "dup_n_grams": ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                    (10, 0.10))}
PAPER_DEDUP = {"ngram": 13, "jaccard": 0.8}


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_library_defaults_and_ours_equal_the_paper():
    quality, repetition = filters._filters(filters.PAPER)
    lib_q = _defaults(filters.GopherQualityFilter)
    lib_r = _defaults(filters.GopherRepetitionFilter)
    for key, value in PAPER_QUALITY.items():
        assert lib_q[key] == value and getattr(quality, key) == value, key
    assert quality.stop_words == PAPER_STOP_WORDS
    for key, value in PAPER_REPETITION.items():
        assert lib_r[key] == value, key
        if key != "dup_n_grams":  # that rule is ours (filters.py says why)
            assert getattr(repetition, key) == value, key
    assert filters.PAPER.dup_n_grams == PAPER_REPETITION["dup_n_grams"]
    assert (dedup.NGRAM, dedup.JACCARD) == (PAPER_DEDUP["ngram"], PAPER_DEDUP["jaccard"])


# ---------------------------------------------------------------------------------------
# Handmade documents

_rng = random.Random(0)
_used: set[str] = set()


def word(length: int) -> str:
    """A fresh lowercase word of `length` letters, never returned before."""
    while True:
        w = "".join(_rng.choice(string.ascii_lowercase) for _ in range(length))
        if w not in _used and w not in PAPER_STOP_WORDS:
            _used.add(w)
            return w


def words(n: int, length: int = 5) -> list[str]:
    return [word(length) for _ in range(n)]


def prose(n: int) -> list[str]:
    """n distinct 5-letter words, two of them stop words: passes every quality rule."""
    return ["the", "and"] + words(n - 2)


def quality(text: str) -> str | None:
    return filters.quality_rule(text)


def test_word_count_limits():
    assert quality(" ".join(prose(50))) is None
    assert quality(" ".join(prose(49))) == "gopher_short_doc"
    assert quality(" ".join(prose(100_000))) is None
    assert quality(" ".join(prose(100_001))) == "gopher_long_doc"


def test_mean_word_length_limits():
    three = ["the", "and"] + words(58, 3)
    assert quality(" ".join(three)) is None  # mean exactly 3
    assert quality(" ".join(three[:-1] + ["ab"])) == "gopher_below_avg_threshold"
    # 2 stop words (3 letters) + 54 words of 10 + 3 of 14 + 1 of 12: 600 letters, 60 words
    ten = ["the", "and"] + words(54, 10) + words(3, 14) + [word(12)]
    assert sum(map(len, ten)) / len(ten) == 10
    assert quality(" ".join(ten)) is None
    assert quality(" ".join(ten[:-1] + [word(13)])) == "gopher_above_avg_threshold"


def test_hash_and_ellipsis_to_word_ratios():
    base = prose(100)
    for symbol, rule in (("#", "gopher_too_many_hashes"), ("...", "gopher_too_many_ellipsis")):
        # symbols inside words, so lines never end with an ellipsis
        inside = [w[:2] + symbol + w[2:] if 2 <= i < 12 else w for i, w in enumerate(base)]
        assert quality(" ".join(inside)) is None  # 10 / 100
        outside = [w[:2] + symbol + w[2:] if 2 <= i < 13 else w for i, w in enumerate(base)]
        assert quality(" ".join(outside)) == rule  # 11 / 100


def test_bullet_and_ellipsis_lines():
    lines = [" ".join(prose(6)) for _ in range(100)]
    bullets = [("- " if i < 90 else "") + s for i, s in enumerate(lines)]
    assert quality("\n".join(bullets)) is None
    bullets = [("• " if i < 91 else "") + s for i, s in enumerate(lines)]
    assert quality("\n".join(bullets)) == "gopher_too_many_bullets"
    ends = [s + ("…" if i < 30 else ".") for i, s in enumerate(lines)]
    assert quality("\n".join(ends)) is None
    ends = [s + ("…" if i < 31 else ".") for i, s in enumerate(lines)]
    assert quality("\n".join(ends)) == "gopher_too_many_end_ellipsis"


def test_alphabetic_words_and_stop_words():
    base = prose(100)
    numbers = [str(10_000 + i) for i in range(21)]
    assert quality(" ".join(base[:80] + numbers[:20])) is None  # 80% alphabetic
    assert quality(" ".join(base[:79] + numbers)) == "gopher_below_alpha_threshold"
    assert quality(" ".join(["the", "of"] + words(60))) is None
    assert quality(" ".join(["the", "the"] + words(60))) == "gopher_enough_stop_words"


def repetition(text: str) -> str | None:
    return filters.repetition_rule(text)


def fill(text_len: int, head: str, sep: str = " ") -> str:
    """`head` + sep + fresh words so that the whole text is exactly text_len characters."""
    out = head
    while len(out) < text_len:
        room = text_len - len(out) - len(sep)
        n = room if room <= 12 else min(8, room - 4)
        if n < 1:  # one character left: widen the last word
            out += "z"
            continue
        out += sep + word(n)
    assert len(out) == text_len
    return out


@pytest.mark.parametrize("sep,rule", [("\n", "dup_line_frac"), ("\n\n", "dup_para_frac")])
def test_duplicate_line_and_paragraph_fraction(sep, rule):
    def doc(copies: int) -> str:
        units = [" ".join(words(6)) for _ in range(100 - copies)] + ["x"] * copies
        _rng.shuffle(units)
        return sep.join(units)

    assert repetition(doc(31)) != rule  # 30 repeats of 100
    assert repetition(doc(32)) == rule


@pytest.mark.parametrize("sep,rule", [("\n", "dup_line_char_frac"),
                                      ("\n\n", "dup_para_char_frac")])
def test_duplicate_line_and_paragraph_characters(sep, rule):
    unit = " ".join(words(10, 9))  # 99 characters, repeated once: 99 duplicate characters
    head = sep.join([unit] + [" ".join(words(3)) for _ in range(6)] + [unit])
    assert repetition(fill(495, head, sep)) not in (rule, None)  # 99 / 495 = 0.2: a later rule
    assert repetition(fill(494, head, sep)) == rule


@pytest.mark.parametrize("n,limit,lengths", [(2, 0.20, (4, 4)), (3, 0.18, (5, 5, 6)),
                                             (4, 0.16, (4, 4, 4, 5))])
def test_most_frequent_ngram_characters(n, limit, lengths):
    # n words (lengths chosen so that 10 * len(gram) / limit is a whole number of characters)
    gram = " ".join(c * k for c, k in zip("abcd", lengths, strict=False))
    head = " ".join(f"{gram} {word(6)}" for _ in range(10))
    total = round(10 * len(gram) / limit)
    assert 10 * len(gram) / total == limit
    assert repetition(fill(total, head)) is None
    assert repetition(fill(total - 1, head)) == f"top_{n}_gram"


@pytest.mark.parametrize("n,limit", filters.PAPER_DUP_NGRAMS)
def test_duplicated_ngram_characters(n, limit):
    """A run of 10 words seen twice covers the same characters for every n <= 10, so the
    first rule to fire is the smallest n whose limit the fraction exceeds."""
    chars = round(300 * limit)  # the run's letters: 2 * chars / 600 == limit exactly
    run = [word(chars // 10 + (i < chars % 10)) for i in range(10)]
    total = 600  # the words' characters, spaces excluded

    def doc(word_chars: int) -> str:
        rest = word_chars - 2 * chars
        filler = [word(4) for _ in range(rest // 4 - 1)]
        filler.append(word(4 + rest % 4))
        half = len(filler) // 2
        return " ".join(filler[:half] + run + filler[half:] + run)

    inside, outside = doc(total), doc(total - 1)
    assert filters.duplicate_ngram_char_fraction(inside.split(), n) == limit
    assert repetition(inside) != f"duplicated_{n}_n_grams"
    assert repetition(outside) == f"duplicated_{n}_n_grams"


def test_duplicated_ngrams_count_every_occurrence_once():
    run = words(10)
    assert filters.duplicate_ngram_char_fraction(run + run, 5) == 1.0  # datatrove: ~0.5
    assert filters.duplicate_ngram_char_fraction(run * 3, 10) == 1.0  # overlaps count once
    assert filters.duplicate_ngram_char_fraction(words(40), 5) == 0.0


def test_filters_run_offline_without_spacy_or_nltk(monkeypatch):
    import socket
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError("a filter tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` now fails
    monkeypatch.setitem(sys.modules, "nltk", None)
    filters._FILTERS.clear()
    text = " ".join(prose(80))
    assert filters.first_rule(text) is None
    assert filters.first_rule(text + "\n" + text) == ("repetition", "dup_line_frac")


# ---------------------------------------------------------------------------------------
# Deduplication and test-set filtering


def _edit(text: str, positions) -> str:
    w = text.split()
    for p in positions:
        w[p] = word(7)
    return " ".join(w)


def _sets(texts):
    sets = [dedup.shingles(t) for t in texts]
    return np.stack([dedup.signature(s) for s in sets]), sets


def test_shingles_are_word_13_grams():
    assert len(dedup.shingles(" ".join(words(100)))) == 100 - 13 + 1
    assert len(dedup.shingles(" ".join(words(5)))) == 1  # shorter than 13: one shingle


def test_jaccard_threshold_is_inclusive():
    """Replacing the last k of 102 words leaves (90 - k) of (90 + k) 13-grams shared."""
    base = " ".join(words(102))
    same, below = _edit(base, range(92, 102)), _edit(base, range(91, 102))
    a, b, c = (dedup.shingles(t) for t in (base, same, below))
    assert dedup.jaccard(a, b) == 0.8 and dedup.jaccard(a, c) < 0.8
    sigs, sets = _sets([base, same])
    assert dedup.near_duplicates([0, 1], sigs, sets) == {1: 0}
    sigs, sets = _sets([base, below])
    assert dedup.near_duplicates([0, 1], sigs, sets) == {}


def test_near_duplicates_found_and_distinct_documents_kept():
    docs = [" ".join(words(300)) for _ in range(30)]
    ids = list(range(30))
    planted = {}
    edits = {3: [50], 11: [50, 200], 20: [100, 101, 102]}  # Jaccard 0.91, 0.83, 0.90
    for k, (src, where) in enumerate(edits.items()):
        docs.append(_edit(docs[src], where))
        ids.append(100 + k)
        planted[100 + k] = src
    docs.append(_edit(docs[5], range(0, 300, 20)))  # 15 words changed: Jaccard ~0.2, kept
    ids.append(200)
    docs.append(docs[11])  # the same id-order rule applies to a smaller id: 7 -> kept
    ids.append(7)
    del docs[7]
    del ids[7]
    sigs, sets = _sets(docs)
    found = dedup.near_duplicates(ids, sigs, sets)
    assert found == {**planted, 11: 7, 101: 7}  # 11, 7 and 101 are one cluster: 7 stays
    order = list(range(len(ids)))
    random.Random(1).shuffle(order)
    again = dedup.near_duplicates([ids[i] for i in order], sigs[order],
                                  [sets[i] for i in order])
    assert again == found  # the choice depends on the ids, not on the input order


def test_exact_duplicates_keep_the_first():
    assert dedup.exact_duplicates([5, 2, 9, 4], [1, 7, 1, 1]) == {5: 4, 9: 4}


def test_test_set_overlap_removes_a_planted_evaluation_passage():
    evals = [" ".join(words(200)) for _ in range(5)]
    train = [" ".join(words(200)) for _ in range(20)]
    train.insert(6, _edit(evals[2], [100]))
    tsigs, tsets = _sets(train)
    esigs, esets = _sets(evals)
    hits = dedup.test_set_overlap(list(range(21)), tsigs, tsets,
                                  [f"validation:{i}" for i in range(5)], esigs, esets)
    assert hits == {6: "validation:2"}


# ---------------------------------------------------------------------------------------
# A corpus end to end


@pytest.fixture(scope="module")
def filtered_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    stop, vocab = ["the", "of", "and", "to", "with"], words(400, 6)
    rng = random.Random(3)

    def doc(n=200):  # every fourth word a stop word: passes every quality rule
        return " ".join(stop[i // 4 % 5] if i % 4 == 0 else rng.choice(vocab)
                        for i in range(n)) + "."

    names = [f"d{i:03d}.txt" for i in range(30)]
    split = builders.assign_splits(names)  # as text_files splits them (by name hashes)
    train_names = [n for n in names if split[n] == "train"]
    eval_names = [n for n in names if split[n] != "train"]
    texts = {n: doc() for n in names}
    t = train_names
    texts[t[2]] = "tiny document"  # quality: short
    texts[t[4]] = "\n".join([doc(60)] * 3)  # repetition: duplicate lines
    texts[t[9]] = texts[t[1]]  # exact copy of an earlier document
    texts[t[12]] = _edit(texts[t[3]], [60])  # near copy of an earlier document
    texts[t[15]] = _edit(texts[eval_names[1]], [30])  # an evaluation passage
    for name, text in texts.items():
        (root / name).write_text(text)
    cfg = base_config()
    cfg.data.update(dataset="text_files", text_files=str(root / "*.txt"),
                    data_dir=str(tmp_path_factory.mktemp("data")), docs_per_shard=7)
    out = tmp_path_factory.mktemp("filtered")
    return cfg, out, corpus_filter.filter_corpus(cfg, out), t, texts


def test_filter_corpus_removes_each_planted_document_once(filtered_corpus):
    cfg, out, manifest, t, texts = filtered_corpus
    stored = list(builders.iter_texts(builders.get_builder(cfg), "train"))  # id = position
    assert len(stored) == len(t)

    def ids(name):
        return [f"train:{i}" for i, text in enumerate(stored) if text == texts[name]]

    (short,), (rep,), (evalcopy,) = ids(t[2]), ids(t[4]), ids(t[15])
    first, second = ids(t[1])  # exact copies: the first stays
    near = sorted([ids(t[3])[0], ids(t[12])[0]], key=lambda x: int(x.split(":")[1]))
    audit = {s: json.loads((out / "audit" / f"{s}.json").read_text())
             for s in corpus_filter.STAGES}
    expect = {"quality": ("gopher_short_doc", short, None, t[2]),
              "repetition": ("dup_line_frac", rep, None, t[4]),
              "exact_dedup": ("identical_text", second, first, t[1]),
              "near_dedup": ("jaccard_13gram_ge_0.8", near[1], near[0], None),
              "test_set": ("eval_jaccard_13gram_ge_0.8", evalcopy, None, t[15])}
    for stage, (rule, removed, matched, name) in expect.items():
        a = audit[stage]
        assert a["docs_removed"] == 1 and list(a["rules"]) == [rule], stage
        example = a["rules"][rule]["examples"][0]
        assert example["id"] == removed, stage
        if matched is not None:
            assert example["matched"] == matched, stage
        if name is not None:
            assert a["bytes_removed"] == len(texts[name].encode()), stage
    assert audit["test_set"]["rules"]["eval_jaccard_13gram_ge_0.8"]["examples"][0][
        "matched"].split(":")[0] in ("validation", "test")
    kept = [json.loads(line)["id"] for p in sorted((out / "docs").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    gone = {int(x.split(":")[1]) for x in (short, rep, second, near[1], evalcopy)}
    assert kept == sorted(set(range(len(t))) - gone)
    assert (manifest.docs_in, manifest.docs_out) == (len(t), len(t) - 5)
    assert (out / "audit" / "near_dedup.md").read_text().startswith("# near_dedup")


def test_filter_corpus_rerun_reuses_everything(filtered_corpus):
    cfg, out, manifest, *_ = filtered_corpus
    lines = []
    assert corpus_filter.filter_corpus(cfg, out, log=lines.append) == manifest
    assert lines and lines[0].startswith("[filter] reusing")


def test_filter_corpus_takes_stages_3_to_5_from_removed_json(filtered_corpus, tmp_path):
    """Without a manifest, a rerun reuses the stage-1 shards and, when removed.json holds
    these settings' stages 3-5, those (here edited: nothing removed as an exact copy)."""
    cfg, out, manifest, *_ = filtered_corpus
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "manifest.json").unlink()
    removed = json.loads((copy / "removed.json").read_text())
    removed["exact_dedup"] = {}
    (copy / "removed.json").write_text(json.dumps(removed))
    again = corpus_filter.filter_corpus(cfg, copy)
    assert again.stages["exact_dedup"]["docs_removed"] == 0
    assert again.docs_out == manifest.docs_out + 1
    assert again.stages["near_dedup"] == manifest.stages["near_dedup"]


def test_datatrove_executor_runs_the_same_rules(filtered_corpus, tmp_path):
    """The distributed form (datatrove pipeline steps; SLURM/Ray executors at scale) keeps
    what stages 1-2 keep, here on datatrove's local executor with two tasks."""
    from datatrove.executor import LocalPipelineExecutor

    _, out, _, t, texts = filtered_corpus
    cfg = filtered_corpus[0]
    stored = list(builders.iter_texts(builders.get_builder(cfg), "train"))
    (tmp_path / "in").mkdir()
    for k in range(2):
        with open(tmp_path / "in" / f"{k}.jsonl", "w") as f:
            for i in range(k, len(stored), 2):
                f.write(json.dumps({"id": str(i), "text": stored[i]}) + "\n")
    steps = corpus_filter.datatrove_rules_pipeline(str(tmp_path / "in"), str(tmp_path / "kept"))
    LocalPipelineExecutor(steps, tasks=2, workers=1, logging_dir=str(tmp_path / "logs")).run()
    kept = sorted(int(json.loads(line)["id"]) for p in (tmp_path / "kept").glob("*.jsonl")
                  for line in p.read_text().splitlines())
    stage12 = {int(json.loads(line)["id"]) for p in (out / "work").glob("train-*.jsonl")
               for line in p.read_text().splitlines()}
    assert kept == sorted(stage12) and len(kept) == len(stored) - 2
