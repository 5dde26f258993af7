"""The one map between our parameter tree and the Hugging Face tensor names of modeling_gopher.py.

Our kernels are 3-D ([d_model, heads, kv] for q, k, v and the relative-position projection,
[heads, kv, d_model] for the output) and the MLP's are [in, out]; torch.nn.Linear keeps
[out, in]. Each entry says how one of ours becomes one of theirs (`to_hf`) and back
(`from_hf`): reshapes and transposes only, so both directions are exact.

A scanned checkpoint stores every block parameter once with a leading layers axis
(`params.blocks.attn.wq` [L, D, H, K]); an unscanned one stores each layer on its own
(`params.blocks.3.attn.wq` [D, H, K]). `Entry.source` names the array and the layer index to
take from it, so a reader can fetch one layer's slice without the others.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from gopher_jax import config as config_lib


def _in_heads(a: np.ndarray) -> np.ndarray:  # [D, H, K] -> [H*K, D]
    return a.reshape(a.shape[0], -1).T


def _out_heads(a: np.ndarray) -> np.ndarray:  # [H, K, D] -> [D, H*K]
    return a.reshape(-1, a.shape[-1]).T


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


# block parameter (path under a block) -> (HF name under model.layers.{i}., to_hf kind)
BLOCK_TENSORS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("attn_norm", "scale"), "attn_norm.weight", "same"),
    (("attn", "wq"), "attn.q_proj.weight", "in_heads"),
    (("attn", "wk"), "attn.k_proj.weight", "in_heads"),
    (("attn", "wv"), "attn.v_proj.weight", "in_heads"),
    (("attn", "wr"), "attn.r_proj.weight", "in_heads"),
    (("attn", "wo"), "attn.o_proj.weight", "out_heads"),
    (("attn", "u"), "attn.u_bias", "same"),
    (("attn", "v"), "attn.v_bias", "same"),
    (("mlp_norm", "scale"), "mlp_norm.weight", "same"),
    (("mlp", "wi"), "mlp.up_proj.weight", "transpose"),
    (("mlp", "wo"), "mlp.down_proj.weight", "transpose"),
)
TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": _same, "in_heads": _in_heads, "out_heads": _out_heads, "transpose": _transpose}


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str
    source: tuple[str, ...]  # our param path, e.g. ("blocks", "attn", "wq")
    layer: int | None  # the index into the leading layers axis (scanned), else None
    kind: str  # a key of TO_HF
    our_shape: tuple[int, ...]  # the shape of one entry (one layer's slice when scanned)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(TO_HF[self.kind](a))

    def from_hf(self, hf: Any, index: tuple[slice, ...]) -> np.ndarray:
        """Our array's part `index` (slices of our_shape) read from `hf`, anything sliced
        like the HF tensor (a safetensors slice, an array): only the HF rows and columns
        that part holds are read."""
        box = [range(*s.indices(n)) for s, n in zip(index, self.our_shape, strict=True)]
        lo = [r.start for r in box]
        hi = [r.stop for r in box]
        if self.kind == "same":
            return np.asarray(hf[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
        if self.kind == "transpose":
            return np.ascontiguousarray(np.asarray(hf[lo[1]:hi[1], lo[0]:hi[0]]).T)
        if self.kind == "in_heads":  # ours [D, H, K], HF [H*K, D]: whole heads, then K
            k = self.our_shape[2]
            a = np.asarray(hf[lo[1] * k:hi[1] * k, lo[0]:hi[0]])
            a = a.reshape(hi[1] - lo[1], k, hi[0] - lo[0]).transpose(2, 0, 1)
            return np.ascontiguousarray(a[:, :, lo[2]:hi[2]])
        k = self.our_shape[1]  # out_heads: ours [H, K, D], HF [D, H*K]
        a = np.asarray(hf[lo[2]:hi[2], lo[0] * k:hi[0] * k])
        a = a.reshape(hi[2] - lo[2], hi[0] - lo[0], k).transpose(1, 2, 0)
        return np.ascontiguousarray(a[:, lo[1]:hi[1], :])

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.our_shape
        return {"same": s, "transpose": s[::-1],
                "in_heads": (math.prod(s[1:]), s[0]),
                "out_heads": (s[-1], math.prod(s[:-1]))}[self.kind]


def block_shapes(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """One layer's parameter shapes, by path under a block."""
    d, h, k, f = m.d_model, m.num_heads, m.head_dim, config_lib.d_ff(m)
    heads_in, heads = (d, h, k), (h, k)
    return {("attn_norm", "scale"): (d,), ("attn", "wq"): heads_in, ("attn", "wk"): heads_in,
            ("attn", "wv"): heads_in, ("attn", "wr"): heads_in, ("attn", "wo"): (h, k, d),
            ("attn", "u"): heads, ("attn", "v"): heads, ("mlp_norm", "scale"): (d,),
            ("mlp", "wi"): (d, f), ("mlp", "wo"): (f, d)}


def entries(m: ml_collections.ConfigDict) -> list[Entry]:
    """Every HF tensor of model config `m`, in file order (embedding, layers, final norm,
    unembedding when untied)."""
    shapes = block_shapes(m)
    out = [Entry("model.embed_tokens.weight", ("embed", "table"), None, "same",
                 (m.vocab_size, m.d_model))]
    for i in range(m.num_layers):
        for path, name, kind in BLOCK_TENSORS:
            if m.scan_layers:
                source, layer = ("blocks", *path), i
            else:
                source, layer = ("blocks", str(i), *path), None
            out.append(Entry(f"model.layers.{i}.{name}", source, layer, kind, shapes[path]))
    out.append(Entry("model.norm.weight", ("final_norm", "scale"), None, "same", (m.d_model,)))
    if not m.tie_embeddings:
        out.append(Entry("lm_head.weight", ("unembed",), None, "same",
                         (m.vocab_size, m.d_model)))
    return out


def by_param(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], list[Entry]]:
    """entries(m) by our param path (a stacked array's entries in layer order)."""
    out: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries(m):
        out.setdefault(e.source, []).append(e)
    return out
