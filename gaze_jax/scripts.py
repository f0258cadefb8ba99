"""The console scripts ``gaze-train``, ``gaze-eval``, ``gaze-predict`` and ``gaze-export``
(pyproject.toml, ``[project.scripts]``): each runs its entry point at the repository's root
(``train_main.py``, ``eval_main.py``, ``predict_main.py``, ``export_main.py``, installed as
top-level modules) as ``python <script>.py`` would, with the same flags, help and exit status.

  gaze-train --config=configs/demo.py --workdir=/tmp/gaze_demo     # = python train_main.py ...
"""

from __future__ import annotations

import runpy

# Console script -> the module it runs.
SCRIPTS = {"gaze-train": "train_main", "gaze-eval": "eval_main",
           "gaze-predict": "predict_main", "gaze-export": "export_main"}


def _run(module: str) -> None:
  # As `python <module>.py`: the module runs as __main__ (its flags, its docstring as --help).
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
  """``gaze-train``: ``train_main.py``."""
  _run(SCRIPTS["gaze-train"])


def evaluate() -> None:
  """``gaze-eval``: ``eval_main.py``."""
  _run(SCRIPTS["gaze-eval"])


def predict() -> None:
  """``gaze-predict``: ``predict_main.py``."""
  _run(SCRIPTS["gaze-predict"])


def export() -> None:
  """``gaze-export``: ``export_main.py``."""
  _run(SCRIPTS["gaze-export"])
