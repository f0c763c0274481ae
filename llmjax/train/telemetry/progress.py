"""The progress bar: tqdm on a terminal, plain log lines otherwise.

Each update shows the step's loss next to a smoothed loss (an exponential moving average,
bias-corrected, over about `1 / (1 - SMOOTHING)` steps: single-step losses are noisy), then
tokens/s, MFU and the learning rate. On a narrow terminal the least important fields go
first (lr, MFU, tokens/s, the step loss), then the bar itself, so the line never wraps and
the bar never shrinks to a sliver (`bar_layout`).
"""

from __future__ import annotations

import math
import shutil
import sys
import time

SMOOTHING = 0.95  # EMA decay of the smoothed loss (~20 steps)
MIN_BAR = 10  # narrowest bar worth drawing, in columns
# tqdm fields around the bar: "100%|" ... "| 1000/1000 [12:34<56:07] " + the stats
_LEFT, _RIGHT = "{percentage:3.0f}%|", "| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
_FIXED = len("100%|") + len("| 1000/1000 [00:00<00:00]")


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _format_stats(loss: float, tokens_per_s: float, mfu_value: float | None, lr: float,
                  smooth: float | None = None, mfu_mark: str = "") -> str:
    mfu_text = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%{mfu_mark}"
    avg = f" (avg {smooth:.4f})" if smooth is not None else ""
    return f"loss {loss:.4f}{avg} | {tokens_per_s:,.0f} tok/s | MFU {mfu_text} | lr {lr:.2e}"


def stats_variants(loss: float, smooth: float, tokens_per_s: float, mfu_value: float | None, lr: float,
                   mfu_mark: str = "") -> list[str]:
    """The stats text from the fullest to the shortest: each drops the least important remaining field."""
    mfu_text = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%{mfu_mark}"
    both = f"loss {loss:.4f} (avg {smooth:.4f})"
    return [
        f"{both} | {tokens_per_s:,.0f} tok/s | MFU {mfu_text} | lr {lr:.2e}",
        f"{both} | {tokens_per_s:,.0f} tok/s | MFU {mfu_text}",
        f"{both} | {tokens_per_s:,.0f} tok/s",
        both,
        f"loss {smooth:.3f}",
    ]


def bar_layout(columns: int, variants: list[str]) -> str:
    """A tqdm `bar_format` for a terminal `columns` wide: the longest stats variant that leaves room for a
    bar of at least MIN_BAR columns; if none does, the shortest stats without a bar (and, below that,
    only the step count)."""
    for stats in variants:
        if _FIXED + 1 + len(stats) + MIN_BAR <= columns:
            return _LEFT + "{bar}" + _RIGHT + " " + stats.replace("{", "{{").replace("}", "}}")
    short = variants[-1].replace("{", "{{").replace("}", "}}")
    without_bar = "{n_fmt}/{total_fmt} [{elapsed}<{remaining}] " + short
    if len("1000/1000 [00:00<00:00] ") + len(variants[-1]) <= columns:
        return without_bar
    return "{n_fmt}/{total_fmt}"


class ProgressBar:
    """A tqdm bar on a terminal; plain log lines every `log_every` steps otherwise (CI logs).

    `tty` overrides the terminal detection (stderr.isatty()); `columns` the terminal width (read
    at every update otherwise, so a resized window is followed). `mfu_mark` is appended to MFU
    figures (e.g. "?" when the peak it divides by is unreliable). Disabled: every call is a no-op.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        log_every: int = 10,
        tty: bool | None = None,
        columns: int | None = None,
        mfu_mark: str = "",
    ) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.log_every = max(int(log_every), 1)
        self.mfu_mark = mfu_mark
        self._columns = columns
        self._start_step = initial_step
        self._start_time = time.perf_counter()
        self._ema, self._ema_steps = 0.0, 0
        self._bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", ncols=self._width(),
                             bar_format=bar_layout(self._width(), ["loss ?"]))

    def _width(self) -> int:
        return self._columns or shutil.get_terminal_size((80, 24)).columns

    def smoothed(self, loss: float) -> float:
        """Fold `loss` into the moving average; returns the bias-corrected average."""
        if not math.isfinite(loss):
            return loss
        self._ema = SMOOTHING * self._ema + (1 - SMOOTHING) * loss
        self._ema_steps += 1
        return self._ema / (1 - SMOOTHING**self._ema_steps)

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None, lr: float) -> None:
        """Report that `step` steps are done (absolute count, not an increment)."""
        if not self.enabled:
            return
        loss = float(loss)
        smooth = self.smoothed(loss)
        if self._bar is not None:
            width = self._width()
            variants = stats_variants(loss, smooth, float(tokens_per_s), mfu, float(lr), self.mfu_mark)
            self._bar.ncols = width
            self._bar.bar_format = bar_layout(width, variants)
            self._bar.update(max(step - self._bar.n, 0))
            return
        if step % self.log_every == 0 or step >= self.total:
            stats = _format_stats(loss, float(tokens_per_s), mfu, float(lr), smooth, self.mfu_mark)
            print(f"step {step}/{self.total} | {stats} | ETA {_format_eta(self._eta(step))}", flush=True)

    def _eta(self, step: int) -> float:
        done = step - self._start_step
        if done <= 0:
            return math.inf
        return (time.perf_counter() - self._start_time) / done * (self.total - step)

    def write(self, msg: str) -> None:
        """Print a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
