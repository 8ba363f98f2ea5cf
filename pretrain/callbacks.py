"""The trainer's hook points: what benchmarks and tests use instead of replacing its methods.
Kept apart from pretrain/trainer.py so a benchmark can subclass it without importing DeepSpeed."""
from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


class Callback:
    """Hooks the training loop calls, each a no-op here: benchmarks and tests subclass it instead of
    replacing the trainer's methods. ``trainer.step`` is the step about to run (pre_step) or the
    number of steps done (post_step)."""

    def pre_step(self, trainer: "Trainer") -> None:
        """Before each optimizer step, its data not yet fetched."""

    def post_step(self, trainer: "Trainer") -> None:
        """After each optimizer step, before its logging, evaluation and checkpoint."""

    def on_save(self, trainer: "Trainer", partial_dir: pathlib.Path) -> None:
        """On rank 0 once a checkpoint's files are written into ``partial_dir``, before they are
        published (tests pause there to kill a save midway)."""
