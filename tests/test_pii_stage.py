"""The personal-data stage of the filter (corpus_filter, data.pii): on a corpus with planted
e-mails, phones, IPs and a Luhn-valid card, `data prepare --config.data.filter=True` trains on
redacted text, keeps ordinary numbers, counts each kind in the audit and the manifest, leaves
the held-out split as it is, and the datatrove engine writes the same bytes."""

from __future__ import annotations

import json
import random

import pytest

from gopher_jax.config import base_config
from gopher_jax.data import artefacts, builders, corpus_filter, engine, pipeline, tokenized
from gopher_jax.data.tokenizer import Tokenizer

PLANTED = {  # value -> placeholder it becomes in training text
    "jo.bloggs@example.org": "<EMAIL>", "+44 20 7946 0958": "<PHONE>",
    "(555) 123-4567": "<PHONE>", "4111 1111 1111 1111": "<CARD>", "192.168.10.5": "<IP>",
    "2001:db8::8a2e:370:7334": "<IP>"}
KEPT = ["4111 1111 1111 1112", "line 42", "1999", "123456"]  # Luhn-invalid, ordinary numbers
HELD_OUT = "eve.held@example.com from 10.0.0.7"


def _words(n: int, rng: random.Random) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pii_corpus")
    rng = random.Random(5)
    stop, vocab = ["the", "of", "and", "to", "with"], _words(300, rng)

    def doc(planted: str) -> str:  # every fourth word a stop word: passes every quality rule
        w = [stop[i // 4 % 5] if i % 4 == 0 else rng.choice(vocab) for i in range(160)]
        return " ".join(w[:80]) + f" {planted} " + " ".join(w[80:]) + "."

    names = [f"d{i:03d}.txt" for i in range(16)]
    split = builders.assign_splits(names)
    train = [n for n in names if split[n] == "train"]
    held = [n for n in names if split[n] == "validation"]
    texts = {n: doc("") for n in names}
    texts[train[0]] = doc("write to jo.bloggs@example.org or call +44 20 7946 0958 or "
                          "(555) 123-4567; card 4111 1111 1111 1111; hosts 192.168.10.5 and "
                          "2001:db8::8a2e:370:7334.")
    texts[train[1]] = doc("line 42 in 1999: order 4111 1111 1111 1112 is no card; 123456 units.")
    texts[held[0]] = doc(f"mail {HELD_OUT}.")
    for n, t in texts.items():
        (root / n).write_text(t)
    c = base_config()
    c.model.vocab_size, c.train.batch_size = 400, 2
    c.data.update(dataset="text_files", seq_len=32, docs_per_shard=4, filter=True,
                  text_files=str(root / "*.txt"), data_dir=str(tmp_path_factory.mktemp("d")))
    info = pipeline.prepare(c)
    return c, info


def _decoded(cfg, split: str) -> str:
    """A prepared split's text: its chunks' tokens (neighbours share one) decoded."""
    chunks = pipeline.open_chunks(cfg, split)
    rows = tokenized.decode_records(chunks.source.__getitems__(range(len(chunks))),
                                    cfg.data.seq_len)["tokens"]
    tok = Tokenizer.load(artefacts.tokenizer_path(cfg))
    return tok.decode([int(t) for t in rows[:, :-1].ravel() if t not in (tok.pad_id, tok.eos_id)])


def test_training_text_redacted_and_ordinary_numbers_kept(corpus):
    cfg, _ = corpus
    out = artefacts.filter_dir(cfg)
    docs = "".join(json.loads(line)["text"] for p in sorted((out / "docs").glob("*.jsonl"))
                   for line in p.read_text().splitlines())
    trained = _decoded(cfg, cfg.data.train_split)
    for text in (docs, trained):  # the filtered documents and the prepared training chunks
        for value in PLANTED:
            assert value not in text, value
        for kept in KEPT:
            assert kept in text, kept
        assert text.count("<PHONE>") == 2 and text.count("<IP>") == 2
        assert "<EMAIL>" in text and "<CARD>" in text


def test_counts_and_redacted_examples_in_the_audit_and_manifest(corpus):
    cfg, _ = corpus
    out = artefacts.filter_dir(cfg)
    audit = json.loads((out / "audit" / "pii.json").read_text())
    expect = {"email": 1, "ipv6": 1, "ipv4": 1, "card": 1, "phone": 2}
    assert audit["counts"] == expect and audit["docs_redacted"] == 1
    manifest = corpus_filter.read_manifest(out)
    assert manifest.pii == {"docs_redacted": 1, "counts": expect}
    (example,) = audit["examples"]
    assert "<EMAIL>" in example["snippet"] and sorted(example["kinds"]) == sorted(expect)
    everything = (out / "audit" / "pii.json").read_text() + (out / "audit" / "pii.md").read_text()
    for value in PLANTED:
        assert value not in everything


def test_held_out_split_is_scored_as_it_is(corpus):
    cfg, _ = corpus
    held = _decoded(cfg, cfg.data.eval_split)
    assert HELD_OUT in held and "<EMAIL>" not in held and "<IP>" not in held


def test_engine_writes_the_same_redacted_bytes(corpus, tmp_path):
    cfg, _ = corpus
    ref = artefacts.filter_dir(cfg)
    out = tmp_path / "engine"
    corpus_filter.filter_corpus(cfg, out, engine=engine.Engine("local", tasks=2, workers=1))

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(
            [root / "manifest.json", *(root / "docs").iterdir(), *(root / "audit").iterdir()])}

    assert files(out) == files(ref)
