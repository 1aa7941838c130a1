"""The wheel carries the top-level models.yaml as registry/models.yaml (registry/models.py looks there first),
so an installed copy knows its models from any directory. The file itself stays at the top of the checkout,
where the design fixes it; this copies it at build time instead of keeping a second copy in the tree.
Editable installs skip the copy: they read the checkout's models.yaml directly."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MODELS_FILE = ROOT / "models.yaml"


class BuildPyWithRegistry(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not MODELS_FILE.is_file():
            raise FileNotFoundError(f"{MODELS_FILE} is missing: the wheel must carry the model registry")
        target = Path(self.build_lib) / "registry" / "models.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODELS_FILE, target)


setup(cmdclass={"build_py": BuildPyWithRegistry})
