"""Everything about the package is in setup.cfg; this file only adds the start-up hook that
lets ``lm_eval --model setdiff`` find our model (pretrain/inference/lm_eval_hook.py)."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "setdiff-lm-eval.pth"


class BuildPyWithPth(build_py):
    """Writes setdiff-lm-eval.pth at the top of the built tree, so a wheel installs it into
    site-packages beside the packages (and uninstalls it with them: it is in the RECORD)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH)
        with open(target, "w") as f:
            f.write("import pretrain.inference.lm_eval_hook\n")

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
