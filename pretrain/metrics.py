"""TensorBoard scalars and the console progress line, written by global rank 0 only."""
from __future__ import annotations

import pathlib
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Monitor:
    def __init__(self, log_dir: pathlib.Path, enabled: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start = time.time()
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, loss: float, lr: float, grad_norm: float | None, tokens_per_s: float,
                 mfu: float | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total_steps - step)
        grad = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        print(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad} | "
              f"{tokens_per_s / 1000:.1f}k tok/s | " + (f"MFU {100 * mfu:.1f}% | " if mfu is not None else "") +
              f"elapsed {format_duration(elapsed)} | "
              f"eta {format_duration(eta)}", flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
