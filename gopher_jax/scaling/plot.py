"""The figure of a fitted ladder: bits per byte against non-embedding parameters per split,
the members, the fitted law, and the law fitted without the largest member (matplotlib, Agg)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from etils import epath

from gopher_jax.scaling.powerlaw import predict


def plot(results: dict[str, Any], fits: dict[str, Any], path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    ok = [m for m in results["members"] if m["status"] == "ok"]
    n = np.array([m["params_non_embedding"] for m in ok], np.float64)
    splits = results["splits"]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), squeeze=False)
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    for ax, split in zip(axes[0], splits, strict=True):
        y = np.array([m[split]["bits_per_byte"] for m in ok])
        ax.scatter(n, y, color="C0", zorder=3, label="members")
        for m, xi, yi in zip(ok, n, y, strict=True):
            ax.annotate(m["member"], (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        f = fits["splits"].get(split, {})
        if "alpha" in f:
            ax.plot(grid, predict(f, grid), color="C1",
                    label=f"{f['a']:.3g} N^-{f['alpha']:.3f} + {f['c']:.3f}")
            loo = f["loo_largest"]
            if "predicted" in loo:
                ax.plot(grid, predict(loo["fit_without_largest"], grid), color="C2",
                        linestyle="--", label="fit without the largest")
                ax.scatter([loo["params_non_embedding"]], [loo["predicted"]], marker="x",
                           color="C2", zorder=4,
                           label=f"predicted largest ({loo['relative_error']:+.1%})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%.2f"))  # a narrow log range: plain numbers read better
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(f"{split} bits per byte")
        ax.set_title(f"{results['ladder']}: {split}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    path.write_bytes(buf.getvalue())  # a local path or gs://
    plt.close(fig)
