"""setdiff-pretrain with a pause in one save, after its files are written and before they are
published: a window in which a test kills the run midway through the save.

    python tests/e2e/save_pause.py STEP SECONDS --config ... [overrides]
"""
from __future__ import annotations

import sys
import time

from pretrain.cli import main


def pause_at(step: int, seconds: float):
    def after_write(saved_step: int, partial_dir) -> None:
        if saved_step == step:
            time.sleep(seconds)

    return after_write


if __name__ == "__main__":
    sys.exit(main(sys.argv[3:], trainer_options={"after_write": pause_at(int(sys.argv[1]), float(sys.argv[2]))}))
