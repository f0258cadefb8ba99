"""Packaging: pyproject.toml describes the package (setup.py is a shim), the console scripts
``gaze-train``, ``gaze-eval``, ``gaze-predict`` and ``gaze-export`` resolve to the entry points at
the repository's root and run them, and the LICENSE and CITATION.cff agree with the metadata.

The venv must hold the current metadata: ``make install`` reinstalls when pyproject.toml
changes; by hand, ``.venv/bin/pip install -e . --no-deps``."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import gaze_jax
from gaze_jax import scripts
from tests import makefile

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REFRESH = "the venv's metadata is stale: run .venv/bin/pip install -e . --no-deps"


def _mine(ep) -> bool:
  return ep.value.split(":")[0] == "gaze_jax.scripts"


def test_pyproject_metadata():
  project = PYPROJECT["project"]
  assert project["name"] == "gaze-jax" and project["license"] == "Apache-2.0"
  assert project["license-files"] == ["LICENSE"] and "version" in project["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gaze_jax.__version__"}
  assert set(project["optional-dependencies"]) >= {"test", "data", "study", "convert",
                                                   "notebooks"}
  # The installed metadata is this file's.
  dist = importlib.metadata.distribution("gaze-jax")
  assert dist.version == gaze_jax.__version__
  assert dist.metadata["License-Expression"] == "Apache-2.0", REFRESH


def test_console_scripts_resolve_to_the_mains():
  declared = PYPROJECT["project"]["scripts"]
  assert set(declared) == set(scripts.SCRIPTS) == {"gaze-train", "gaze-eval", "gaze-predict",
                                                   "gaze-export"}
  installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
               if _mine(ep)}
  assert {n: ep.value for n, ep in installed.items()} == declared, REFRESH
  for name, ep in installed.items():
    assert callable(ep.load())
    module = scripts.SCRIPTS[name]
    # The main it runs is the repository's own file, installed as a top-level module.
    assert module in PYPROJECT["tool"]["setuptools"]["py-modules"]
    spec = importlib.util.find_spec(module)
    assert spec is not None and Path(spec.origin).resolve() == ROOT / f"{module}.py"


def test_gaze_train_help_runs(tmp_path):
  exe = Path(sys.executable).with_name("gaze-train")
  assert exe.exists(), REFRESH
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  # From another folder: the command finds train_main through the installed package.
  p = subprocess.run([str(exe), "--help"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.stdout.startswith("Train a gaze-attention MLLM.") and "--workdir" in p.stdout, \
      p.stderr[-3000:]
  # As `python train_main.py --help`: the help asked for is a success (absl's own status is 1).
  assert p.returncode == 0
  script = subprocess.run([sys.executable, "train_main.py", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  # (absl names the flags' module by its path: the full one here.)
  shown = p.stdout.replace(f"{ROOT / 'train_main.py'}:", "train_main.py:")
  assert (p.returncode, shown, p.stderr) == (script.returncode, script.stdout, script.stderr)
  # A bad command line ends as `python train_main.py` does: status 2, one line.
  p = subprocess.run([str(exe), "--no_such_flag"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2 and "no_such_flag" in p.stderr


def test_setup_py_is_a_shim():
  p = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == gaze_jax.__version__


def test_license_and_citation():
  license_text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "Copyright 2026 The gaze-jax authors" in license_text
  cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
  assert cff["version"] == gaze_jax.__version__ and cff["license"] == "Apache-2.0"
  assert cff["authors"] == [{"name": "The gaze-jax authors"}]
  assert "Gaze Attention" in cff["message"] and "doi" not in cff


def test_the_makefile_reinstalls_when_the_metadata_changes():
  for venv in ("$(VENV)", "$(AOT_GPU_VENV)", "$(AOT_TPU_VENV)"):
    assert "pyproject.toml" in makefile.prerequisites(f"{venv}/.installed")
  assert any('-e ".[test,data,study,convert,notebooks]"' in line
             for line in makefile.recipe("$(VENV)/.installed"))
