"""What a training prints and records: from plain Python (as in a notebook, nothing configured)
the progress lines show, once; under ``train_main.py`` (absl's handler) once too, without
orbax's internals; ``gaze_jax.logs.show_progress`` leaves a caller's logging alone; and the
metric names (``token_accuracy`` per answer token, ``exact_match`` per example) in
``metrics.jsonl``, TensorBoard and the summary."""

import json
import logging
import os
import subprocess
import sys

from gaze_jax import logs
from tests.train.helpers import ROOT, library_log_lines, run_python

STEPS = 3
CONFIG = """
from tests.train.helpers import small_config


def get_config():
  return small_config({data!r}, train__num_steps={steps}, train__eval_every={steps},
                      train__eval_batches=1)
"""


def _progress(output: str, step: int) -> list[str]:
  return [line for line in output.splitlines() if f"step {step}/{STEPS} | loss " in line]


def _config_file(tmp_path, data_dir):
  path = tmp_path / "tiny.py"
  path.write_text(CONFIG.format(data=str(data_dir), steps=STEPS))
  return path


def test_plain_python_training_shows_its_progress_once_and_names_its_metrics(train_data_dir,
                                                                            tmp_path):
  from tests.train.test_units import _event_scalars

  work = tmp_path / "run"
  code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
          "import tiny\n"
          "from gaze_jax.train import trainer\n"
          f"s = trainer.train(tiny.get_config(), {str(work)!r})\n"
          "print('EVAL', sorted(s['eval']))\n")
  _config_file(tmp_path, train_data_dir)
  p = run_python(code)
  for step in range(1, STEPS + 1):
    assert len(_progress(p.stderr, step)) == 1, p.stderr[-3000:]
  assert "token acc " in _progress(p.stderr, 1)[0]
  evals = [line for line in p.stderr.splitlines() if f"eval step {STEPS}: loss" in line]
  assert len(evals) == 1 and "token accuracy" in evals[0] and "exact match" in evals[0]
  assert not library_log_lines(p.stdout + p.stderr)
  # The names: token_accuracy (answer tokens) and exact_match (examples), never "accuracy".
  eval_keys = ["exact_match", "examples", "loss", "token_accuracy"]
  assert f"EVAL {eval_keys}" in p.stdout
  records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert all("token_accuracy" in r and "accuracy" not in r for r in train)
  (ev,) = [r for r in records if r["split"] == "eval"]
  assert sorted(set(ev) - {"step", "split"}) == eval_keys
  tags = {tag for _, tag, _ in _event_scalars(work / "tb")}
  assert {"train/token_accuracy", "eval/token_accuracy", "eval/exact_match"} <= tags
  assert not {t for t in tags if t.endswith(("/accuracy", "/exact"))}, tags
  assert sorted(json.loads((work / "summary.json").read_text())["eval"]) == eval_keys


def test_train_main_prints_each_line_once_without_orbax_internals(train_data_dir, tmp_path):
  """Also with a profile of the step after the compiling one (``train.profile_steps``)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cfg = _config_file(tmp_path, train_data_dir)
  p = subprocess.run([sys.executable, str(ROOT / "train_main.py"), f"--config={cfg}",
                      f"--workdir={tmp_path / 'run'}", "--config.train.profile_steps=1"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert p.returncode == 0, p.stderr[-4000:]
  out = p.stdout + p.stderr
  for step in range(1, STEPS + 1):
    assert len(_progress(out, step)) == 1, out[-3000:]
  assert out.count("done: ") == 1
  assert library_log_lines(out) == [], out[-3000:]
  assert out.count(f"profile of steps 2-2 written under {tmp_path / 'run' / 'profile'}") == 1
  assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb")), out[-3000:]


def _loggers(*root_handlers: logging.Handler):
  """A fresh (root, gaze_jax) pair of loggers, not the process's, the root with these
  handlers, at WARNING as Python starts."""
  root = logging.RootLogger(logging.WARNING)
  for h in root_handlers:
    root.addHandler(h)
  package = logging.Logger(logs.PACKAGE)
  package.parent = root
  return root, package


def _basic_config_handler() -> logging.Handler:
  h = logging.StreamHandler()
  h.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
  return h


def test_show_progress_adds_one_handler_only_where_nothing_is_configured():
  # Nothing configured, or only the handler that logging.basicConfig() adds by itself (absl
  # and logging.warning do on a first call): one handler, INFO, not passed to the root again.
  for handlers in ((), (_basic_config_handler(),)):
    root, package = _loggers(*handlers)
    assert logs.show_progress(package, root)
    assert len(package.handlers) == 1 and package.level == logging.INFO
    assert not package.propagate
    assert not logs.show_progress(package, root)              # a second call adds nothing
    assert len(package.handlers) == 1
  # The caller's own handler, or the root at INFO, or our logger's level set: left alone.
  mine = logging.StreamHandler()
  mine.setFormatter(logging.Formatter("%(message)s"))
  root, package = _loggers(mine)
  assert not logs.show_progress(package, root) and not package.handlers
  root, package = _loggers(_basic_config_handler())
  root.setLevel(logging.INFO)
  assert not logs.show_progress(package, root) and package.propagate
  root, package = _loggers()
  package.setLevel(logging.WARNING)
  assert not logs.show_progress(package, root) and not package.handlers


def test_known_library_noise_is_dropped_and_errors_kept():
  drop = logs.DropMessages(logs.KNOWN_NOISE)

  def record(level, msg):
    return logging.LogRecord("absl", level, "checkpoint_manager.py", 1, msg, (), None)

  assert not drop.filter(record(logging.WARNING, "Given directory is read only=/x"))
  assert not drop.filter(record(logging.WARNING, "OpenCV is not installed. We recommend ..."))
  assert drop.filter(record(logging.WARNING, "a step could not be read"))
  assert drop.filter(record(logging.ERROR, "Given directory is read only=/x"))
