"""`serve` throughput: N concurrent requests sharing decode steps vs the same N one at a time.

    python benchmarks/serve_throughput.py --workdir runs/tiny [--requests 16] [--slots 16]
        [--max_tokens 64] [--devices 1]

Starts `python -m gopher_jax serve` on 127.0.0.1 (a free port) over the workdir's newest
checkpoint, sends --requests completion requests of --max_tokens tokens each (sampled at
temperature 1 with per-request seeds, so few stop early; the count is the tokens actually
generated, from `usage`), first one at a time and then all at once from as many threads,
and reports generated tokens per second of wall time for both, a digest of the texts (for
comparing two versions of the server byte for byte), and the host time per token of keeping
a request's text (decoding all its tokens again, as the engine once did, against the
incremental decoding it does now). The server is warm (it has
compiled every shape before /ready says so). Writes benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import ROOT, git_commit, write_results


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def start(workdir: str, slots: int, max_tokens: int, devices: int, log: str
          ) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "gopher_jax", "serve", f"--workdir={workdir}",
                             "--port=0", f"--slots={slots}", f"--queue={4 * slots}",
                             f"--max_tokens={max_tokens}"],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not (m := re.search(r"on (http://\S+)", open(log).read())):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(open(log).read()[-3000:])
        time.sleep(0.2)
    url = m.group(1)
    while True:
        try:
            urllib.request.urlopen(f"{url}/ready", timeout=5).read()
            return proc, url
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def text_update_cost(workdir: str, texts: list[str]) -> dict[str, float]:
    """Host microseconds per generated token of keeping a request's text, over the tokens of
    `texts`: decoding all its tokens again at each one (what the engine did before) and
    serve/text.py's incremental decoding (what it does now), timed alternately."""
    import statistics

    from gopher_jax.cli.common import stored_config
    from gopher_jax.data import pipeline
    from gopher_jax.serve.text import TextSoFar

    tok = pipeline.load_tokenizer(stored_config(pathlib.Path(workdir) / "config.json"))
    rows = [tok.encode(t) for t in texts]
    n = sum(len(r) for r in rows)

    def decode_all() -> None:
        for ids in rows:
            for k in range(1, len(ids) + 1):
                tok.decode(ids[:k])

    def incremental() -> None:
        for ids in rows:
            text = TextSoFar()
            for i in ids:
                text.add(tok.decode_bytes((i,)))

    times: dict[str, list[float]] = {"decode_all": [], "incremental": []}
    for _ in range(5):
        for name, f in (("decode_all", decode_all), ("incremental", incremental)):
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_throughput.json"))
    a = p.parse_args()
    bodies = [{"prompt": f"To be, or not to be {i}", "max_tokens": a.max_tokens,
               "temperature": 1.0, "seed": i} for i in range(a.requests)]
    log = os.path.join(tempfile.mkdtemp(), "serve.log")
    proc, url = start(a.workdir, a.slots, a.max_tokens, a.devices, log)
    try:
        post(url, bodies[0])  # one request end to end before timing
        t0 = time.perf_counter()
        alone = [post(url, b) for b in bodies]
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(a.requests) as pool:
            together = list(pool.map(lambda b: post(url, b), bodies))
        t_together = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    n_alone = sum(r["usage"]["completion_tokens"] for r in alone)
    n_together = sum(r["usage"]["completion_tokens"] for r in together)
    same = [r["choices"][0]["text"] for r in alone] == [r["choices"][0]["text"]
                                                        for r in together]
    texts = [r["choices"][0]["text"] for r in alone]
    text_us = text_update_cost(a.workdir, texts)
    out = {
        "workdir": a.workdir, "requests": a.requests, "slots": a.slots,
        "max_tokens": a.max_tokens, "devices": a.devices,
        "one_at_a_time": {"tokens": n_alone, "seconds": t_alone,
                          "tokens_per_s": n_alone / t_alone},
        "concurrent": {"tokens": n_together, "seconds": t_together,
                       "tokens_per_s": n_together / t_together},
        "speedup": (n_together / t_together) / (n_alone / t_alone),
        "same_texts": same,
        "texts_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
        "text_update_us_per_token": text_us,
        "load_average": os.getloadavg(), "commit": git_commit(),
    }
    print(f"one at a time: {n_alone} tokens in {t_alone:.2f} s = "
          f"{out['one_at_a_time']['tokens_per_s']:.1f} tokens/s")
    print(f"{a.requests} concurrent: {n_together} tokens in {t_together:.2f} s = "
          f"{out['concurrent']['tokens_per_s']:.1f} tokens/s ({out['speedup']:.2f}x); "
          f"same texts: {same}")
    print(f"host time per token keeping the text: decoding every token again "
          f"{text_us['decode_all']:.1f} us, incremental {text_us['incremental']:.1f} us "
          f"(median of 5, over the {a.max_tokens}-token answers)")
    write_results(a.out, out)


if __name__ == "__main__":
    main()
