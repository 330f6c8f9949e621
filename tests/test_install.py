"""A non-editable install (pip install .) finds the zoo."""
import importlib.util
import os
import subprocess
import sys

from helpers import REPO


def _can_build_wheels():
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_non_editable_install_finds_the_zoo(tmp_path):
    target = tmp_path / "site"
    # Build with the environment's setuptools where it can build a wheel (it needs the wheel package
    # before setuptools 70.1); else pip fetches a build environment (a Python 3.12+ venv has no setuptools).
    isolation = ["--no-build-isolation"] if _can_build_wheels() else []
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation,
                            "--no-compile", "--target", str(target), str(REPO)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    assert (target / "pyro_lvm" / "zoo" / "vae.py").is_file()
    assert (target / "pyro_lvm" / "data" / "faithful.csv").is_file()
    code = ("import pyro_lvm, pyro_lvm.protocol as p; "
            "assert pyro_lvm.__file__.startswith(%r), pyro_lvm.__file__; "
            "print(sorted(p.zoo_models())); print(p.load_model_class('pixelcnn-vae').__name__); "
            "from pyro_lvm.data import load_dataset; print(load_dataset('faithful').sizes())") % str(target)
    # The install first on the path; whatever else the environment's path holds (its dependencies) after it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "'mog', 'pixelcnn-vae', 'ppca', 'vae'" in result.stdout
    assert "PixelCNNVAE" in result.stdout


def test_every_subpackage_is_listed_in_setup_cfg():
    """A subpackage missing from setup.cfg's ``packages`` is left out of a non-editable install
    (the editable one finds it anyway), so every folder of pyro_lvm with an ``__init__.py`` is listed."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "pyro_lvm").rglob("__init__.py")}
    assert found <= listed, f"add to setup.cfg's packages: {sorted(found - listed)}"
