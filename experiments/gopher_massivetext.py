"""Gopher 44m on MassiveText's six sources with the paper's sampling weights (Rae et al.
2021, Table 2): MassiveWeb 48%, Books 27%, C4 10%, News 10%, GitHub 3%, Wikipedia 2%.

MassiveText is not public: point each source at your own copy (or a stand-in) as text
files. The globs below are placeholders under $MASSIVETEXT (default /data/massivetext):

    $MASSIVETEXT/massiveweb/**/*.jsonl   (one document per line, key "text")
    $MASSIVETEXT/books/**/*.txt          (one document per file)
    $MASSIVETEXT/c4/**/*.jsonl
    $MASSIVETEXT/news/**/*.jsonl
    $MASSIVETEXT/github/**/*             (one document per file)
    $MASSIVETEXT/wikipedia/**/*.jsonl

or override one: --config.data.sources.books.text_files='/my/pg19/**/*.txt'. Training on
missing files stops before any work with one line naming the source and its glob. The
paper filtered MassiveWeb for quality and repetition: here massiveweb has filter=True, so
its training split goes through `data filter`'s stages (gopher_jax/data/corpus_filter.py)
before tokenization (the paper deduplicated and test-set filtered every source: add
--config.data.filter=True to run the stages on all six).

    python -m gopher_jax train --config experiments/gopher_massivetext.py --workdir runs/mt
"""

import os

import ml_collections

from gopher_jax.config import source, table1

# (name, share of training tokens, glob under $MASSIVETEXT)
SOURCES = (
    ("massiveweb", 0.48, "massiveweb/**/*.jsonl"),
    ("books", 0.27, "books/**/*.txt"),
    ("c4", 0.10, "c4/**/*.jsonl"),
    ("news", 0.10, "news/**/*.jsonl"),
    ("github", 0.03, "github/**/*"),
    ("wikipedia", 0.02, "wikipedia/**/*.jsonl"),
)


def get_config():
    c = table1("gopher_44m_massivetext", layers=8, heads=16, kv=32, d_model=512, lr=6e-4,
               batch_tokens=262144, grad_clip=1.0)
    root = os.environ.get("MASSIVETEXT", "/data/massivetext")
    c.data.sources = ml_collections.ConfigDict({
        name: source("text_files", weight, text_files=os.path.join(root, glob),
                      filter=name == "massiveweb")
        for name, weight, glob in SOURCES})
    return c
