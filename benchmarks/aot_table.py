"""AOT-compiles the train step of every Table-1 config for a real TPU topology, once with
XLA attention and once with the Pallas kernel (model.attention_impl); writes
benchmarks/results/aot_table.json and the table in BUILD.md (between the AOT markers), the
two attention paths side by side.

    python benchmarks/aot_table.py [--only gopher_280b] [--impl pallas] [--no_build_md]

Needs libtpu (pip install -e '.[tpu]'). Each compile runs in its own process
(`python -m gopher_jax aot`), one after another; the big ones take many minutes on a small
CPU machine. The mesh, rules, remat and microbatches come from the experiment files; a row
may override them with --config flags (shown in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/aot_table.json"
BUILD_MD = ROOT / "BUILD.md"
BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"

IMPLS = ("xla", "pallas")  # model.attention_impl values compared
# (experiment, topology, slices, config overrides). Topologies are real slice shapes.
ROWS = [
    ("gopher_44m", "v5p:2x2x1", 1, []),
    ("gopher_117m", "v5p:2x2x2", 1, []),
    ("gopher_417m", "v5p:2x2x4", 1, []),
    ("gopher_1_4b", "v5p:4x4x4", 1, []),
    ("gopher_7_1b", "v5p:8x8x8", 1, []),
    # Gopher's own hardware class: 4 TPU v3 pods of 1,024 chips, data parallel across pods.
    ("gopher_280b", "v3:32x32", 4, []),
    ("gopher_280b", "v5p:16x16x16", 1, []),
]


def run_row(exp: str, topology: str, slices: int, overrides: list[str], impl: str,
            timeout_s: int) -> dict:
    overrides = [*overrides, f"--config.model.attention_impl={impl}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "gopher_jax", "aot", "--config",
               str(ROOT / "experiments" / f"{exp}.py"), f"--topology={topology}",
               f"--num_slices={slices}", f"--aot_json={out}", *overrides]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                               timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"config": exp, "topology": topology, "num_slices": slices,
                    "attention_impl": impl, "error": f"timed out after {timeout_s} s"}
        wall = time.perf_counter() - t0
        print(p.stdout, end="", flush=True)
        if not out.exists():
            tail = "\n".join(p.stderr.strip().splitlines()[-5:])
            print(tail, file=sys.stderr)
            return {"config": exp, "topology": topology, "num_slices": slices,
                    "attention_impl": impl, "error": f"exit {p.returncode}: {tail[-300:]}"}
        r = json.loads(out.read_text())
        r.update(overrides=overrides, attention_impl=impl, process_wall_s=wall,
                 exit_code=p.returncode)
        return r


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def _key(r: dict) -> tuple[str, str, int, str]:
    # Rows written before the Pallas kernel existed are XLA attention.
    return (r["config"], r["topology"], r.get("num_slices", 1), r.get("attention_impl", "xla"))


def _cells(r: dict | None) -> list[str]:
    """temp GiB, total GiB, fits, compile s of one attention path."""
    if r is None:
        return ["", "", "not run", ""]
    if "error" in r:
        return ["", "", f"error: {r['error'][:80]}", ""]
    return [_gib(r["temp_bytes"]), _gib(r["total_bytes"]), "yes" if r["fits"] else "NO",
            f"{r['compile_s']:.0f}"]


def table(rows: list[dict]) -> str:
    by_key = {_key(r): r for r in rows}
    head = ("| config | topology | devices | mesh (data, fsdp, tensor) | rules | micro-batches "
            "| remat | args GiB | HBM GiB | formula TFLOP/device "
            + "".join(f"| {i} temp GiB | {i} total GiB | {i} fits | {i} compile s "
                      for i in IMPLS) + "|")
    lines = [head, "|" + "---|" * (10 + 4 * len(IMPLS))]
    done = []
    for r in rows:
        base = _key(r)[:3]
        if base in done:
            continue
        done.append(base)
        paths = [by_key.get((*base, i)) for i in IMPLS]
        ok = next((p for p in paths if p is not None and "error" not in p), None)
        topo = r["topology"] + (f" x {r['num_slices']}" if r.get("num_slices", 1) > 1 else "")
        if ok is None:
            shared = ["", "", "", "", "", "", "", ""]
        else:
            m = ok["mesh"]
            shared = [f"{ok['num_devices']:,} ({ok['device_kind']})",
                      f"{m['data']}, {m['fsdp']}, {m['tensor']}", ok["rules"],
                      str(ok["microbatches"]), ok["remat_policy"], _gib(ok["argument_bytes"]),
                      _gib(ok["hbm_bytes"]), f"{ok['formula_flops_per_device'] / 1e12:.1f}"]
        cells = [r["config"], topo, *shared] + [c for p in paths for c in _cells(p)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_build_md(text: str) -> None:
    body = BUILD_MD.read_text() if BUILD_MD.exists() else ""
    if BEGIN in body and END in body:
        pre, rest = body.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        BUILD_MD.write_text(f"{pre}{BEGIN}\n{text}\n{END}{post}")
    else:
        print(f"BUILD.md has no {BEGIN} marker; table not written there", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="config name(s) to run")
    ap.add_argument("--topology", action="append", default=[], help="only these topologies")
    ap.add_argument("--impl", action="append", default=[], choices=IMPLS,
                    help="attention path(s) to compile (default: both)")
    ap.add_argument("--timeout_s", type=int, default=3600, help="per compile")
    ap.add_argument("--no_build_md", action="store_true")
    a = ap.parse_args()
    old = {}
    if RESULTS.exists():  # keep rows not rerun this time
        for r in json.loads(RESULTS.read_text())["rows"]:
            old[_key(r)] = r
    load = os.getloadavg()
    for exp, topo, slices, overrides in ROWS:
        if (a.only and exp not in a.only) or (a.topology and topo not in a.topology):
            continue
        for impl in a.impl or IMPLS:
            print(f"== {exp} on {topo} x {slices}, {impl} attention", flush=True)
            old[(exp, topo, slices, impl)] = run_row(exp, topo, slices, overrides, impl,
                                                     a.timeout_s)
    order = [(e, t, s, i) for e, t, s, _ in ROWS for i in IMPLS]
    rows = [old[k] for k in order if k in old]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "loadavg_at_start": load},
                                   "rows": rows}, indent=2))
    md = table(rows)
    print(md)
    if not a.no_build_md:
        write_build_md(md)
    return 0 if all(r.get("fits") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
