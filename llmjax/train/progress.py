"""The progress bar: tqdm on a terminal, plain log lines otherwise."""

from __future__ import annotations

import math
import sys
import time


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _format_stats(loss: float, tokens_per_s: float, mfu_value: float | None, lr: float) -> str:
    mfu_text = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%"
    return f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | MFU {mfu_text} | lr {lr:.2e}"


class ProgressBar:
    """A tqdm bar on a terminal; plain log lines every `log_every` steps otherwise (CI logs).

    `tty` overrides the terminal detection (stderr.isatty()). Disabled: every call is a no-op.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        log_every: int = 10,
        tty: bool | None = None,
    ) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.log_every = max(int(log_every), 1)
        self._start_step = initial_step
        self._start_time = time.perf_counter()
        self._bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None, lr: float) -> None:
        """Report that `step` steps are done (absolute count, not an increment)."""
        if not self.enabled:
            return
        stats = _format_stats(float(loss), float(tokens_per_s), mfu, float(lr))
        if self._bar is not None:
            self._bar.update(max(step - self._bar.n, 0))
            self._bar.set_postfix_str(stats, refresh=False)
            return
        if step % self.log_every == 0 or step >= self.total:
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
