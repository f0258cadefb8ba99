"""Where the project's log lines go.

The project logs through ``logging.getLogger("gaze_jax.<part>")``: INFO for progress (the
training's step lines, a checkpoint restored, an image resized), WARNING for what needs a look.
The libraries underneath (orbax, tensorflow_datasets, grain, ml_collections) log through absl,
i.e. the ``absl`` logger, and orbax logs every file operation at INFO.

* The entry points (``train_main.py``, ``eval_main.py``, ``predict_main.py``,
  ``export_main.py``, through ``gaze_jax.cli.run``) call ``configure_main``: our INFO lines go
  out once, through the handler absl's ``app.run`` puts on the root logger (stderr); the
  libraries' loggers are kept at WARNING and their known harmless warnings dropped, unless
  ``--verbose``.
* From Python or a notebook, ``trainer.train`` and ``predict`` call ``show_progress``: where
  nobody configured logging (no handler, or only the one ``logging.basicConfig()`` adds by
  itself on a first ``logging.warning`` / absl log call), the ``gaze_jax`` logger gets one
  stderr handler at INFO, so the step lines show. A caller that configured logging keeps its
  configuration: set the ``gaze_jax`` logger's level, add a handler, or configure the root
  logger with your own format before the first call, and nothing is added.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

from absl import logging as absl_logging

PACKAGE = "gaze_jax"
# The loggers of the libraries below us: absl (orbax, tensorflow_datasets, grain and
# ml_collections log through it), and the few that use their own.
THIRD_PARTY = ("absl", "orbax", "etils", "tensorflow", "tensorflow_datasets", "grain", "jax")
# Warnings the libraries give for what the project does on purpose: orbax on every read-only
# checkpoint manager (restores for eval, predict, export), tfds on every builder config of ours
# and when Pillow rather than OpenCV decodes images.
KNOWN_NOISE = ("CheckpointManagerOptions.read_only=True, setting save_interval_steps=0",
               "Given directory is read only",
               "Using custom data configuration",
               "OpenCV is not installed")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class DropMessages(logging.Filter):
  """Drops records below ERROR whose message starts with one of ``prefixes``."""

  def __init__(self, prefixes: Iterable[str]):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      return True
    return not str(record.msg).startswith(self.prefixes)


def drop_known_noise() -> None:
  """Drops the libraries' ``KNOWN_NOISE`` warnings, which orbax and tfds log through absl's
  logger (a logger's filter sees the records logged on it; added once)."""
  absl = logging.getLogger("absl")
  if not any(isinstance(f, DropMessages) for f in absl.filters):
    absl.addFilter(DropMessages(KNOWN_NOISE))


def _basic_config_handler(h: logging.Handler) -> bool:
  """Whether ``h`` is the handler ``logging.basicConfig()`` adds without arguments, as
  ``logging.warning`` and absl's log calls do by themselves when the root has no handler."""
  fmt = getattr(h.formatter, "_fmt", None)
  return type(h) is logging.StreamHandler and fmt == logging.BASIC_FORMAT


def show_progress(package: Optional[logging.Logger] = None,
                  root: Optional[logging.Logger] = None) -> bool:
  """Makes the project's INFO lines visible where the caller has not configured logging.

  When the ``gaze_jax`` logger has no handler and no level of its own, INFO is below what it
  lets through, and the root logger has no handler but ``logging.basicConfig()``'s default one:
  adds one stderr handler at INFO to the ``gaze_jax`` logger, which then stops passing its
  records up to the root (whose default handler would print them a second time). Also drops
  the libraries' known harmless warnings (``drop_known_noise``). Returns whether it added the
  handler. ``package`` / ``root``: the loggers to look at (tests).
  """
  drop_known_noise()
  package = package or logging.getLogger(PACKAGE)
  root = root or logging.getLogger()
  if package.handlers or package.level != logging.NOTSET:
    return False                       # configured for us (e.g. by configure_main)
  if package.getEffectiveLevel() <= logging.INFO:
    return False                       # the root lets INFO through to its own handlers
  if not all(_basic_config_handler(h) for h in root.handlers):
    return False                       # the caller's handlers, at the caller's level
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
  package.addHandler(handler)
  package.setLevel(logging.INFO)
  package.propagate = False
  return True


def configure_main(verbose: bool = False) -> None:
  """The entry points' logging, under absl's ``app.run`` (whose handler on the root logger
  prints every line): the project's loggers at INFO; the libraries' at WARNING without their
  known harmless warnings, or at INFO with everything when ``verbose``; TensorFlow's C++ lines
  at WARNING unless ``verbose`` or ``TF_CPP_MIN_LOG_LEVEL`` is set."""
  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  for name in THIRD_PARTY:
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
  logging.getLogger(PACKAGE).setLevel(logging.INFO)
  if not verbose:
    drop_known_noise()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
