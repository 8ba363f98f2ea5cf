"""setdiff-pretrain with a pause in one save, after its files are written and before they are
published: a window in which a test kills the run midway through the save.

    python tests/e2e/save_pause.py STEP SECONDS --config ... [overrides]
"""
from __future__ import annotations

import sys
import time

from pretrain.cli import main
from pretrain.callbacks import Callback


class PauseAt(Callback):
    def __init__(self, step: int, seconds: float):
        self.step, self.seconds = step, seconds

    def on_save(self, trainer, partial_dir) -> None:
        if trainer.step == self.step:
            time.sleep(self.seconds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[3:], trainer_options={"callbacks": [PauseAt(int(sys.argv[1]), float(sys.argv[2]))]}))
