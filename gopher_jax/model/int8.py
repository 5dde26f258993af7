"""Weight-only int8 inference: every matmul kernel of a param State stored as int8 values and
one float32 scale per output channel (max |w| over the contraction axes / 127), dequantized
where the model reads it (`param[...]`), inside the jitted function.

    params = int8.quantize(m, params)       # from evaluate.restore_params
    int8.nbytes(params)                     # the weights' bytes as stored

Why not Qwix (qwix 0.1.8 resolves with our jax 0.10.2 / flax 0.12.8): its PTQ intercepts
dot_general/einsum whose operand is an nnx.Param, but our kernels are read and cast
(`w[...].astype(dtype)`) before the einsum, 3-D ([d_model, heads, kv]) and stacked under
nnx.scan, so Qwix would see activations, not weights, unless the model were rewritten for it.
Here the model is unchanged: a quantized kernel is a pytree (int8 values, scales) in the
Param's place, and its `[...]` returns the dequantized array. Norm scales and the relative
attention biases (u, v) stay float.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

# Logical names of a kernel (without a leading "layers" axis) -> its contraction axes; the
# other axes are output channels, each with its own scale.
CONTRACTION = {("embed", "mlp"): ("embed",), ("mlp", "embed"): ("mlp",),
               ("vocab", "embed"): ("embed",),  # tied logits contract d_model; a gather reads rows
               ("embed", "heads", "kv"): ("embed",), ("heads", "kv", "embed"): ("heads", "kv")}


@jax.tree_util.register_pytree_node_class
class Int8Weight:
    """int8 values `q` and float32 `scale` (broadcastable to q; size 1 on contraction axes)."""

    def __init__(self, q: jax.Array, scale: jax.Array, dtype: Any):
        self.q, self.scale, self.dtype = q, scale, jnp.dtype(dtype)

    def tree_flatten(self) -> tuple[tuple[jax.Array, jax.Array], Any]:
        return (self.q, self.scale), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype: Any, children: tuple) -> Int8Weight:
        return cls(*children, dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def dequantize(self) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype)

    def __getitem__(self, index: Any) -> jax.Array:
        return self.dequantize()[index]


def quantize_array(w: jax.Array, axes: tuple[int, ...] | None) -> Int8Weight:
    """w as int8 with one scale per slice along the axes not in `axes` (None: one scale for
    the whole tensor); round to nearest, so |w - dequantized| <= scale / 2 elementwise."""
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale.astype(jnp.float32), w.dtype)


def _names(m: ml_collections.ConfigDict) -> dict[tuple, tuple[str, ...]]:
    """Each param's path -> its logical axis names (from the model's abstract State)."""
    from gopher_jax.model import gopher

    _, abstract = gopher.abstract(m)
    out = {}
    for path, v in jax.tree_util.tree_leaves_with_path(
            abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        out[_key(path)] = tuple(names or ())
    return out


def _key(path: tuple) -> tuple:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def contraction_axes(names: tuple[str, ...]) -> tuple[int, ...] | None:
    """The contraction axes of a kernel with these logical names, None if not a kernel."""
    lead = 1 if names[:1] == ("layers",) else 0
    contract = CONTRACTION.get(tuple(names[lead:]))
    if contract is None:
        return None
    return tuple(i for i, n in enumerate(names) if i >= lead and n in contract)


def quantize(m: ml_collections.ConfigDict, params: Any, per_channel: bool = True) -> Any:
    """`params` (a model's param State) with every kernel an Int8Weight (a split kernel's
    values split as it was, its scales the same but whole on the contraction axes, by jax's
    sharding propagation); `per_channel=False` uses one scale per tensor (worse: a benchmark
    and test comparison)."""
    names = _names(m)

    def one(path: tuple, leaf: Any) -> Any:
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        axes = contraction_axes(names.get(_key(path), ()))
        if axes is None or not hasattr(value, "ndim"):
            return leaf
        q = quantize_array(value, axes if per_channel else None)
        return leaf.replace(q) if isinstance(leaf, nnx.Variable) else q

    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def nbytes(params: Any) -> int:
    """Bytes of every array in `params` as stored (int8 values and their scales)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                   for x in jax.tree.leaves(params)))


def kernel_errors(m: ml_collections.ConfigDict, params: Any, quantized: Any,
                  rows: int = 64, seed: int = 0) -> dict[str, float]:
    """Per kernel: relative L2 error ||x W - x W_int8|| / ||x W|| of its output for `rows`
    standard-normal inputs x over its contraction axes (the layers axis kept)."""
    names = _names(m)
    flat = dict(jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    qflat = dict(jax.tree_util.tree_leaves_with_path(
        quantized, is_leaf=lambda x: isinstance(x, (nnx.Variable, Int8Weight))))
    out = {}
    key = jax.random.key(seed)
    for path, leaf in flat.items():
        ql = qflat[path]
        qv = ql.get_value() if isinstance(ql, nnx.Variable) else ql
        if not isinstance(qv, Int8Weight):
            continue
        w = jnp.asarray(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf,
                        jnp.float32)
        axes = contraction_axes(names[_key(path)])
        k_shape = [w.shape[a] for a in axes]
        x = jax.random.normal(jax.random.fold_in(key, len(out)), (rows, *k_shape))
        w_q = qv.dequantize().astype(jnp.float32)
        dims = ((tuple(range(1, 1 + len(axes))), axes), ((), ()))
        y = jax.lax.dot_general(x, w, dims)
        y_q = jax.lax.dot_general(x, w_q, dims)
        out["/".join(_key(path))] = float(jnp.linalg.norm(y - y_q) / jnp.linalg.norm(y))
    return out
