"""The entry points' errors (``gaze_jax.cli``): a user error is one line on stderr (status 1; 2
for a bad command line), its traceback under ``--verbose`` or in the run's ``errors.log``; a bug
keeps its traceback. Also the inputs that used to fail deep inside: a question that is not
UTF-8, ``--max_new_tokens`` below 1, a run's ``config.json`` cut short or lacking a field."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app

from gaze_jax import cli, paths, runs

ROOT = Path(__file__).resolve().parents[1]


def _exit(capsys, fn):
  """``(status, stderr lines)`` of ``fn()``, which must exit."""
  with pytest.raises(SystemExit) as stop:
    fn()
  return stop.value.code, capsys.readouterr().err.splitlines()


def _raising(e):
  def main(argv):
    raise e
  return main


def _main(script, *args, timeout=300):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                        capture_output=True, timeout=timeout)


def _image(folder):
  """A small PNG in ``folder``: predict_main reads the image before the run."""
  from PIL import Image as PILImage

  PILImage.new("RGB", (8, 8)).save(folder / "x.png")
  return folder / "x.png"


def test_the_rule_of_user_errors():
  from gaze_jax.data.features import ExampleTooLong
  from gaze_jax.train.checkpoint import CheckpointError
  from gaze_jax.train.nonfinite import NonFiniteCheckpoint, TrainingDiverged
  from gaze_jax.train.workdir_lock import WorkdirBusy

  users = [ValueError("x"), ExampleTooLong("x"), json.JSONDecodeError("x", "{", 1),
           UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"), FileNotFoundError("x"),
           NotADirectoryError("x"), IsADirectoryError("x"), PermissionError("x"),
           OSError(errno.ENOSPC, "No space left on device"), CheckpointError("x"),
           NonFiniteCheckpoint("x"), WorkdirBusy("x"), TrainingDiverged("x")]
  bugs = [KeyError("x"), TypeError("x"), AttributeError("x"), RuntimeError("x"),
          OSError(errno.EIO, "I/O error")]
  assert [e for e in users if not cli.is_user_error(e)] == []
  assert [e for e in bugs if cli.is_user_error(e)] == []


def test_a_user_error_is_one_line_with_status_1(capsys):
  main = cli.guarded(_raising(OSError(errno.ENOSPC, "No space left on device")))
  status, err = _exit(capsys, lambda: main(["x"]))
  assert status == 1
  assert err == ["error: [Errno 28] No space left on device (--verbose prints the traceback)"]


def test_a_multi_line_message_keeps_its_lines(capsys):
  status, err = _exit(capsys, lambda: cli.guarded(_raising(ValueError("first\nsecond")))(["x"]))
  assert status == 1 and err == ["error: first", "second (--verbose prints the traceback)"]


def test_the_traceback_goes_to_the_runs_errors_log(capsys, tmp_path):
  main = cli.guarded(_raising(ValueError("record 7 is too long")), log_dir=lambda: tmp_path)
  status, err = _exit(capsys, lambda: main(["x"]))
  log = tmp_path / "errors.log"
  assert status == 1 and err == [f"error: record 7 is too long (traceback in {log})"]
  text = log.read_text()
  assert "Traceback (most recent call last)" in text and "ValueError: record 7" in text
  _exit(capsys, lambda: main(["x"]))
  assert log.read_text().count("ValueError: record 7") == 2        # appended, not replaced


def test_no_workdir_is_created_for_the_log(capsys, tmp_path):
  work = tmp_path / "work"
  status, err = _exit(capsys, lambda: cli.guarded(_raising(ValueError("bad")),
                                                  log_dir=lambda: work)(["x"]))
  assert status == 1 and err == ["error: bad (--verbose prints the traceback)"]
  assert not work.exists()


def test_usage_errors_and_ctrl_c_are_one_line(capsys):
  status, err = _exit(capsys, lambda: cli.guarded(_raising(app.UsageError("--x is bad")))(["x"]))
  assert status == 2 and len(err) == 1 and err[0].startswith("error: --x is bad (")
  status, err = _exit(capsys, lambda: cli.guarded(_raising(KeyboardInterrupt()))(["x"]))
  assert status == 130 and err == ["interrupted"]


def test_a_bug_keeps_its_traceback():
  with pytest.raises(KeyError, match="oops"):
    cli.guarded(_raising(KeyError("oops")))(["x"])


def test_append_text_adds_to_the_end(tmp_path):
  paths.append_text(tmp_path / "log", "a\n")
  paths.append_text(tmp_path / "log", "b\n")
  assert (tmp_path / "log").read_text() == "a\nb\n"


def test_a_config_json_cut_short_names_the_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text('{"model": {"decoder": {"num_la')
  with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
    runs.load_run_config(tmp_path)
  path.write_bytes(b'{"data": "\xff"}')
  with pytest.raises(ValueError, match=f"{path} is not UTF-8 text"):
    runs.load_run_config(tmp_path)


def test_config_json_of_an_older_run_takes_the_defaults_and_a_bad_field_names_the_file(
    tmp_path, caplog):
  """A run of an older version, whose config.json lacks fields added since, loads with their
  defaults, said in a warning naming them; a bad value is an error naming the file and field."""
  from configs import common
  d = common.base_config("tiny").to_dict()
  del d["data"]["tokenizer"], d["distributed"]
  (tmp_path / "config.json").write_text(json.dumps(d))
  with caplog.at_level("WARNING", logger="gaze_jax.train"):
    config = runs.load_run_config(tmp_path)
  assert config.data.tokenizer == "byte" and config.distributed.cpu_collectives == "gloo"
  assert "lacks the fields data.tokenizer, distributed" in caplog.text
  d["train"]["num_steps"] = 0
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: config\.train\.num_steps="
                                       r"0 must be an int >= 1"):
    runs.load_run_config(tmp_path)


def test_a_question_that_is_not_utf8_or_no_token_to_answer_is_refused(tmp_path):
  from gaze_jax import predict as predict_lib

  # What absl hands over for the bytes b"wh\xffere" on the command line.
  question = b"wh\xffere".decode("utf-8", "surrogateescape")
  with pytest.raises(ValueError, match=r"not UTF-8 text \(bytes 0xff at character 2\)"):
    predict_lib.predict(tmp_path, tmp_path / "x.png", question)
  for n in (0, -3):
    with pytest.raises(ValueError, match=f"max_new_tokens={n}: the answer needs at least 1"):
      predict_lib.predict(tmp_path, tmp_path / "x.png", "where?", max_new_tokens=n)


@pytest.mark.parametrize("flag, says", [
    (b"--question=wh\xffere", b"flag --question="),
    (b"--max_new_tokens=0", b"flag --max_new_tokens=0"),
    (b"--max_new_tokens=-3", b"flag --max_new_tokens=-3"),
])
def test_predict_main_refuses_bad_flags_in_one_line(tmp_path, flag, says):
  """Refused while parsing the flags, before anything is loaded."""
  args = [f"--workdir={tmp_path}".encode(), f"--image={_image(tmp_path)}".encode(),
          b"--question=where?", flag]
  p = _main("predict_main.py", *args)
  err = p.stderr.decode("utf-8", "replace").splitlines()
  assert p.returncode == 2, err
  assert len(err) == 1 and err[0].startswith("error: ") and says.decode() in err[0], err


def test_eval_main_refuses_bad_flags_in_one_line(tmp_path):
  for args, says in [(["--max_batches=-1"], "flag --max_batches=-1"),
                     (["--splits="], "give at least one split"),
                     (["--compare_name=x"], "give it too")]:
    p = _main("eval_main.py", f"--workdir={tmp_path}", *args)
    err = p.stderr.decode().splitlines()
    assert p.returncode == 2 and len(err) == 1 and says in err[0], err


@pytest.mark.parametrize("script, args", [
    ("predict_main.py", ["--image={tmp}/x.png", "--question=where?"]),
    ("eval_main.py", []),
    ("export_main.py", ["--out={tmp}/out"]),
])
def test_a_missing_workdir_is_one_line_and_verbose_adds_the_traceback(tmp_path, script, args):
  _image(tmp_path)
  args = [a.format(tmp=tmp_path) for a in args]
  workdir = f"--workdir={tmp_path / 'nosuch'}"
  p = _main(script, workdir, *args)
  err = p.stderr.decode().splitlines()
  assert p.returncode == 1, err
  assert err == [f"error: --workdir {tmp_path / 'nosuch'} does not exist (--verbose prints the "
                 "traceback)"]
  if script == "predict_main.py":                # one of them is enough for --verbose
    p = _main(script, workdir, *args, "--verbose")
    err = p.stderr.decode().splitlines()
    assert p.returncode == 1 and "Traceback (most recent call last):" in err
    assert err[-1] == f"error: --workdir {tmp_path / 'nosuch'} does not exist"
