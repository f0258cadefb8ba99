"""How the entry points (``train_main.py``, ``eval_main.py``, ``predict_main.py``,
``export_main.py``) end on an error: one line saying what to fix, not a traceback.

  from gaze_jax import cli
  if __name__ == "__main__":
    cli.run(main)                                  # or cli.run(main, log_dir=<the workdir>)

``run`` is ``absl.app.run`` with these rules:

* A user error (``is_user_error``) prints ``error: <message>`` to stderr and exits with status
  1. The message is printed as it is: one line, or several only where the message itself has
  several. ``--verbose`` prints the traceback above it. With ``log_dir`` (a run's own workdir,
  local or ``gs://``, that already exists) the traceback is also appended to
  ``<log_dir>/errors.log`` and the line says so; otherwise the line says ``--verbose`` shows it.
* A usage error (a bad flag value, ``app.UsageError`` from ``main``) prints ``error: <message>``
  and a pointer to ``--helpshort``, and exits with status 2 (the shell convention for a bad
  command line; absl itself exits with 1 and prints the module docstring and every flag).
* Ctrl-C (``KeyboardInterrupt``) prints ``interrupted`` and exits with status 130.
* Any other exception is a bug: its traceback is printed as Python prints it.

Logging (``gaze_jax.logs.configure_main``): the project's INFO lines are printed once, through
absl's handler (stderr); orbax's, tfds' and the other libraries' INFO lines and their known
harmless warnings only with ``--verbose``.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, NoReturn, Optional

from absl import app, flags
from etils import epath

from gaze_jax import logs, paths

FLAGS = flags.FLAGS
VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print its traceback too (else one "
                            "line says what went wrong); also log the libraries' (orbax, tfds) "
                            "INFO lines.")

ERRORS_LOG = "errors.log"
# The project's errors about a run, not its input: a checkpoint that cannot be restored or
# saved, a workdir another run holds, a training that diverged.
_RUN_ERRORS = (("gaze_jax.train.errors", "CheckpointError"),
               ("gaze_jax.train.workdir_lock", "WorkdirBusy"),
               ("gaze_jax.train.nonfinite", "TrainingDiverged"))

# OSError numbers that describe the machine, not the program: the disk or quota is full, the
# filesystem is read-only.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_user_error(e: BaseException) -> bool:
  """Whether ``e`` is meant for the user (printed as one line) rather than a bug (traceback).

  The rule: the project raises ValueError for input it refuses (a bad config field, image,
  question, record; ``ExampleTooLong``, ``json.JSONDecodeError`` and ``UnicodeError`` are
  ValueErrors too), ``gaze_jax.train.checkpoint.CheckpointError`` for a checkpoint it cannot
  restore or save, ``WorkdirBusy`` for a workdir another run holds and ``TrainingDiverged``
  for a run whose loss stopped being finite; the operating system raises ``FileNotFoundError``, ``FileExistsError``,
  ``NotADirectoryError``, ``IsADirectoryError`` and ``PermissionError`` for paths the user
  gave, and an OSError with errno ENOSPC, EDQUOT or EROFS when the disk is full or read-only.
  Everything else (TypeError, KeyError, AttributeError, other OSErrors, ...) is a bug.
  """
  if isinstance(e, ValueError):
    return True
  if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                    PermissionError)):
    return True
  if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
    return True
  # Only a loaded module can have raised its error: no import (orbax, jax) just to check.
  for module, name in _RUN_ERRORS:
    loaded = sys.modules.get(module)
    if loaded is not None and isinstance(e, getattr(loaded, name)):
      return True
  return False


def message(e: BaseException) -> str:
  """The text after ``error:``: the exception's message, or its type when it has none."""
  text = str(e).strip()
  return text or type(e).__name__


def _log_name() -> str:
  """``errors.log``; ``errors.<i>.log`` for process i of a multi-process run, whose processes
  would otherwise rewrite one another's log on ``gs://``."""
  jax = sys.modules.get("jax")        # not imported here: an error may come before jax is
  if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
    return ERRORS_LOG.replace(".log", f".{jax.process_index()}.log")
  return ERRORS_LOG


def append_traceback(log_dir, e: BaseException) -> Optional[str]:
  """Appends ``e``'s traceback, with the command line, to ``<log_dir>/errors.log`` and returns
  that path; None when ``log_dir`` is unset or does not exist (an error before the run wrote
  anything must not create its workdir) or the log cannot be written (the disk may be full)."""
  if not log_dir:
    return None
  try:
    folder = epath.Path(log_dir)
    if not folder.is_dir():
      return None
    path = folder / _log_name()
    text = (f"$ {' '.join(sys.argv)}\n" + "".join(traceback.format_exception(e)) + "\n")
    paths.append_text(path, text)
    return os.fspath(path)
  except Exception:            # noqa: BLE001  (the one-line error matters more than its log)
    return None


def _verbose() -> bool:
  return FLAGS.is_parsed() and VERBOSE.value


def _fail(line: str, status: int, e: Optional[BaseException] = None) -> NoReturn:
  if e is not None and _verbose():
    traceback.print_exception(e, file=sys.stderr)
  print(line, file=sys.stderr)
  sys.stderr.flush()
  sys.exit(status)


def _usage_hint() -> str:
  return f"({os.path.basename(sys.argv[0] if sys.argv else 'main')} --helpshort lists the flags)"


# absl's help flags: each prints the help, then exits with status 1.
HELP_FLAGS = ("-?", "-h", "--help", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag value (e.g. ``--max_new_tokens=0``) as one usage
  line naming the flag (status 2), and the help asked for with ``--help`` as a success
  (status 0; absl exits with 1, which scripts and CI read as a failure)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"error: {message(e)} {_usage_hint()}", 2)
  except SystemExit as e:
    if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None
    raise


def guarded(main: Callable[[list[str]], object],
            log_dir: Optional[Callable[[], Optional[str]]] = None):
  """``main`` with the errors handled as the module docstring says; ``log_dir()`` is called on
  an error (after flag parsing) for the folder of ``errors.log``."""

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      _fail(f"error: {message(e)} {_usage_hint()}", 2, e)
    except KeyboardInterrupt as e:
      _fail("interrupted", 130, e)
    except Exception as e:           # noqa: BLE001  (sorted by is_user_error; bugs re-raised)
      if not is_user_error(e):
        raise
      log = append_traceback(log_dir() if log_dir else None, e)
      if log:
        where = f" (traceback in {log})"
      else:
        where = "" if _verbose() else " (--verbose prints the traceback)"
      _fail(f"error: {message(e)}{where}", 1, e)

  return wrapped


def run(main: Callable[[list[str]], object],
        log_dir: Optional[Callable[[], Optional[str]]] = None) -> None:
  """``app.run(main)`` with one-line errors (see the module docstring) and the entry points'
  logging (``gaze_jax.logs.configure_main``: our INFO lines once, the libraries' internals only
  with ``--verbose``). ``log_dir``: a callable giving the run's own workdir, where
  ``errors.log`` collects the tracebacks of user errors."""

  def logged(argv):
    logs.configure_main(verbose=_verbose())
    return main(argv)

  app.run(guarded(logged, log_dir), flags_parser=parse_flags)
