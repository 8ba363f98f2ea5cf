"""python -m pretrain.bench: the setdiff-bench command."""
import sys

from pretrain.bench.cli import main

if __name__ == "__main__":  # importing the module (as tests/gpu/test_check_script.py does) runs nothing
    sys.exit(main())
