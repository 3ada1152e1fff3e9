"""Only what pyproject.toml cannot say: install alignkit-launch.pth at the root of site-packages, from a wheel and from
an editable install alike. That one line gives `accelerate launch` / `torchrun` alignkit's clean-error path
(alignkit/launch_guard.py); it does nothing in any other process."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "alignkit-launch.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib, PTH)), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]


class editable_wheel_with_pth(editable_wheel):
    # An editable wheel carries its .pth files in the folder it zips up; setuptools writes its namespace .pth files
    # there in this step, so ours goes in with them.
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, Path(installation_dir, PTH))


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
