"""setdiff-prepare that dies like a killed job (exit 75, no clean-up) once K slices are written.

    python tests/data_pipeline/prepare_killed.py K --input ... --out ... [setdiff-prepare flags]
"""
from __future__ import annotations

import os
import sys

from data_pipeline.prepare import main

KILLED_EXIT_CODE = 75


def die_after(slices: int):
    def after_slice(finished: int, pool) -> None:
        if finished == slices:
            pool.terminate()
            os._exit(KILLED_EXIT_CODE)

    return after_slice


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], after_slice=die_after(int(sys.argv[1]))))
