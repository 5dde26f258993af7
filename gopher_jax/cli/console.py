"""What the user sees: messages, the training progress bar, and one-line errors."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

from gopher_jax.train.loop import Reporter


def out(msg: str = "") -> None:
    print(msg, flush=True)


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def error_line(e: BaseException, verbose: bool) -> None:
    """`error: <what> (<the fix>)` on one line; the traceback first with --verbose."""
    if verbose:
        traceback.print_exception(e, file=sys.stderr)
    text = " ".join(str(e).split()) or type(e).__name__
    err(f"error: {text}")


def setup_logging(verbose: bool) -> None:
    """Library warnings (and process-prefixed records) on stderr, one line each."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    if not verbose:  # libraries log the traceback of a failure we report as one error line
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_traceback)
    logging.getLogger("gopher_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass


def _drop_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = record.stack_info = None
    return True


class ConsoleReporter(Reporter):
    """Training progress on process 0: a tqdm bar on a terminal, plain lines in a log file."""

    def __init__(self) -> None:
        self.bar = None
        self.n = 0

    @property
    def enabled(self) -> bool:
        # Asked at each report, not at construction: jax.distributed starts inside the loop.
        import jax

        return jax.process_index() == 0

    def start(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                        mininterval=1.0, disable=not sys.stderr.isatty())
        self.n = step

    def metrics(self, step: int, m: dict[str, Any]) -> None:
        if not self.enabled or self.bar is None:
            return
        self.bar.update(step - self.n)
        self.n = step
        rate = m.get("model_flops_per_s", 0.0) / 1e9
        mfu = f"MFU {m['mfu']:.1%}" if m.get("mfu") is not None else "MFU n/a"
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", bpb=f"{m['bits_per_byte']:.3f}",
                             tok_s=f"{m['tokens_per_s']:.0f}")
        self.message(f"step {step}: loss {m['loss']:.4f} bits/byte {m['bits_per_byte']:.4f} "
                     f"lr {m['learning_rate']:.3g} grad_norm {m['grad_norm']:.3f} "
                     f"tokens/s {m['tokens_per_s']:.0f} model {rate:.1f} GFLOP/s {mfu}")
        epochs = {k[len("epochs/"):]: v for k, v in m.items() if k.startswith("epochs/")}
        if epochs:  # a mixture: what each source has given so far
            self.message("  sources: " + ", ".join(
                f"{n} {m[f'tokens/{n}'] / 1e6:.2f}M tokens ({e:.2f} epochs)"
                for n, e in epochs.items()))

    def message(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
            sys.stdout.flush()
        else:
            out(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
