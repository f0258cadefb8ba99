"""Faults that must neither lose data nor pass in silence: two runs on one workdir, a run that
diverges, a resume with another config or model, duplicated data-log rows after a resume, and a
full disk during a save. Each test drives ``trainer.train`` on the tiny shared config."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import ROOT, set_fields, small_config


def _train(config, workdir, **kw):
  from gaze_jax.train import trainer
  return trainer.train(config, str(workdir), **kw)


# ----------------------------------------------------------------------------- one run per workdir

def test_a_second_run_on_a_held_workdir_is_refused_before_writing(train_data_dir, tmp_path):
  from gaze_jax.train.workdir_lock import WorkdirBusy, WorkdirLock

  with WorkdirLock(tmp_path):
    with pytest.raises(WorkdirBusy, match=f"--workdir={tmp_path} is in use by another training "
                       f"run .*pid {os.getpid()}"):
      _train(small_config(train_data_dir), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]   # nothing else written


def test_the_lock_of_a_killed_run_is_free(tmp_path):
  """flock ends with its process: a SIGKILLed run never blocks the next one."""
  from gaze_jax.train.workdir_lock import WorkdirBusy, WorkdirLock

  code = ("import sys, time; from gaze_jax.train.workdir_lock import WorkdirLock; "
          f"lock = WorkdirLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)")
  p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  try:
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusy, match=f"pid {p.pid}"):
      WorkdirLock(tmp_path).acquire()
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  with WorkdirLock(tmp_path):
    pass


def test_a_cloud_storage_lock_refuses_a_live_run_and_takes_over_a_dead_one(gcs_dir, caplog):
  import socket

  from gaze_jax.train.workdir_lock import WorkdirBusy, WorkdirLock

  first = WorkdirLock(gcs_dir, heartbeat_s=0.2)
  first.acquire()
  with pytest.raises(WorkdirBusy, match="heartbeat is advancing.*pid"):
    WorkdirLock(gcs_dir, heartbeat_s=0.2).acquire()
  first.release()
  assert not (gcs_dir / "run.lock").exists()          # a run that ends removes it
  caplog.set_level(logging.WARNING)
  # A run on another host killed without releasing: its heartbeat no longer advances.
  (gcs_dir / "run.lock").write_text(json.dumps({"pid": 1, "host": "gone", "heartbeat": 7}))
  with WorkdirLock(gcs_dir, heartbeat_s=0.2):
    assert "taking over the lock" in caplog.text and "gone" in caplog.text
  # Killed on this host (a restart after SIGKILL): its pid is gone, no need to watch.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  (gcs_dir / "run.lock").write_text(json.dumps({"pid": int(dead), "heartbeat": 3,
                                               "host": socket.gethostname()}))
  t0 = time.monotonic()
  with WorkdirLock(gcs_dir, heartbeat_s=100):
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------- divergence

def _diverging(data_dir, **kw):
  c = small_config(data_dir, **kw)
  c.optim.learning_rate = 1e4
  c.optim.clip_norm = 0.0
  return c


def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(train_data_dir, tmp_path):
  from gaze_jax.train.checkpoint import Checkpointer, restore_model
  from gaze_jax.train.nonfinite import TrainingDiverged

  with pytest.raises(TrainingDiverged, match=r"step \d+ had a non-finite loss or gradient.*"
                     r"saved nothing past its last finite step") as e:
    _train(_diverging(train_data_dir, checkpoint__save_every=1, checkpoint__keep=2), tmp_path)
  bad = int(str(e.value).split()[1])
  kept = Checkpointer(tmp_path / "checkpoints", read_only=True).steps()
  assert kept and max(kept) == bad - 1           # every finite step saved, none after
  for step in kept:
    model, _ = restore_model(tmp_path, small_config(train_data_dir), step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx_params(model)))


def nnx_params(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)


def test_skip_mode_skips_nonfinite_steps_and_finishes_finite(train_data_dir, tmp_path):
  summary = _train(_diverging(train_data_dir, train__on_nonfinite="skip",
                              train__max_skipped=100), tmp_path)
  assert summary["step"] == 8 and summary["train"]["skipped_steps"] >= 1
  from gaze_jax.train.checkpoint import restore_model
  model, step = restore_model(tmp_path, small_config(train_data_dir))
  assert step == 8
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx_params(model)))


@pytest.mark.slow              # a third diverging run; the guard's rule is the stop mode's
def test_skip_mode_stops_after_too_many_skipped_steps_in_a_row(train_data_dir, tmp_path):
  from gaze_jax.train.nonfinite import TrainingDiverged

  with pytest.raises(TrainingDiverged, match="more than config.train.max_skipped=0 steps"):
    _train(_diverging(train_data_dir, train__on_nonfinite="skip", train__max_skipped=0),
           tmp_path)


def test_nonfinite_weights_are_not_restored_or_served_without_a_flag(tmp_path):
  from gaze_jax.train.checkpoint import Checkpointer
  from gaze_jax.train.nonfinite import NonFiniteCheckpoint, check_finite

  w = np.ones((4, 3), np.float32)
  w[1, 2] = np.nan
  ck = Checkpointer(tmp_path, save_every=1, async_save=False)
  ck.save(1, {"params": {"layer": {"w": jnp.asarray(w), "b": jnp.zeros(3)}}, "opt_state": None})
  ck.close()
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"layer": {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=dev),
                        "b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=dev)}}
  got = Checkpointer(tmp_path, read_only=True).restore(abstract)
  with pytest.raises(NonFiniteCheckpoint, match=r"step 1 .*non-finite parameters \(layer/w\)"):
    check_finite(got.params, "step 1")
  check_finite(got.params, "step 1", allow=True)       # asked for: a warning only


@pytest.mark.slow              # the refusal itself is tested fast (check_finite, above)
def test_restore_model_refuses_a_diverged_run_unless_allowed(train_data_dir, tmp_path):
  from gaze_jax.train.checkpoint import Checkpointer, restore_model
  from gaze_jax.train.nonfinite import NonFiniteCheckpoint

  c = small_config(train_data_dir, train__num_steps=1)
  _train(c, tmp_path)
  # Poison the saved step as a run before this guard could have saved it.
  from gaze_jax.train import trainer
  s = trainer.build(c)
  ck = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
  state = trainer.init_state(s, 0)
  state["params"] = jax.tree.map(lambda x: x * jnp.nan, state["params"])
  ck.save(2, state, None, force=True)
  ck.close()
  with pytest.raises(NonFiniteCheckpoint, match="checkpoint step 2"):
    restore_model(tmp_path, c)
  _, step = restore_model(tmp_path, c, allow_nonfinite=True)
  assert step == 2


# ----------------------------------------------------------------------------- resume checks

@pytest.fixture(scope="module")
def stopped_run(train_data_dir, tmp_path_factory):
  """A run stopped (with a checkpoint) after 3 of its 8 steps; its config.json's text."""
  wd = tmp_path_factory.mktemp("stopped")
  _train(small_config(train_data_dir, train__log_fingerprints=True), wd, stop_after=3)
  return wd, (wd / "config.json").read_text()


@pytest.mark.parametrize("field, value, named", [
    ("model.gaze.top_k", 2, "model.gaze.top_k: checkpoint 1, now 2"),
    ("model.gaze.region_shape", (4, 4), "model.gaze.region_shape"),
    ("model.gaze.attention", "dense", "model.gaze.attention: checkpoint 'gaze', now 'dense'"),
    ("data.builder_config", "other", "data.builder_config"),
    ("optim.learning_rate", 0.5, "optim.learning_rate"),
])
def test_resume_with_another_config_is_refused_naming_the_field(stopped_run, train_data_dir,
                                                                field, value, named):
  from gaze_jax.train.checkpoint import CheckpointError
  from gaze_jax.train.resume import config_changes

  wd, config_json = stopped_run
  c = set_fields(small_config(train_data_dir), {field: value})
  assert list(config_changes(json.loads(config_json), c)) == [field]
  with pytest.raises(CheckpointError, match=f"checkpoint step 3 .*{named}.*allow_config_changes"):
    _train(c, wd)
  assert (wd / "config.json").read_text() == config_json   # the run's own, not overwritten


def test_resume_with_another_width_names_the_field_in_one_sentence(stopped_run, train_data_dir):
  from gaze_jax.train.checkpoint import CheckpointError

  wd, config_json = stopped_run
  c = small_config(train_data_dir)
  c.model.decoder.hidden_size = 64
  with pytest.raises(CheckpointError) as e:
    _train(c, wd)
  msg = str(e.value)
  assert "model.decoder.hidden_size: checkpoint 32, config 64" in msg and len(msg) < 600
  assert (wd / "config.json").read_text() == config_json


def test_runtime_fields_and_num_steps_may_change_on_resume(stopped_run, train_data_dir,
                                                          tmp_path, caplog):
  import shutil

  wd, _ = stopped_run
  copy = tmp_path / "run"
  shutil.copytree(wd, copy)
  c = small_config(train_data_dir, train__num_steps=5, train__log_every=2)
  c.checkpoint.keep = 5
  caplog.set_level(logging.WARNING)
  assert _train(c, copy)["step"] == 5
  assert "train.num_steps changed from 8 to 5" in caplog.text
  # Asked for explicitly, a training change is taken, with a warning naming it.
  c.model.gaze.top_k = 2
  c.train.num_steps = 6
  c.checkpoint.allow_config_changes = True
  assert _train(c, copy)["step"] == 6
  assert "resuming with config changes" in caplog.text and "model.gaze.top_k" in caplog.text


def test_data_log_holds_each_step_once_after_a_resume(stopped_run, train_data_dir, tmp_path):
  import shutil

  wd, _ = stopped_run
  copy = tmp_path / "run"
  shutil.copytree(wd, copy)
  log_path = copy / "data_log.0.jsonl"
  # What a run killed after step 5 (checkpoint at 3) leaves: rows for 4 and 5, the last cut.
  with log_path.open("a") as f:
    f.write(json.dumps({"step": 4, "process": 0, "fingerprint": "x"}) + "\n")
    f.write('{"step": 5, "proc')
  _train(small_config(train_data_dir, train__log_fingerprints=True), copy)
  steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
  assert steps == list(range(1, 9))


# ----------------------------------------------------------------------------- disk full

def test_a_full_disk_during_a_save_is_one_error_that_keeps_the_committed_steps(
    tmp_path, monkeypatch):
  from gaze_jax.train import checkpoint as ckpt_lib

  ck = ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=3)
  state = {"params": {"w": jnp.ones((4, 3))}, "opt_state": {"m": jnp.ones((4, 3))}}
  ck.save(1, state)
  ck.wait()

  def full(folder):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ckpt_lib, "record_checksums", full)   # fails in the save's own thread
  ck.save(2, state)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"no space left on the device while saving checkpoint step 2 in .*"
                     r"the committed steps \(\[1\]\) are intact") as e:
    ck.save(3, state)
  assert "\n" not in str(e.value)
  monkeypatch.undo()
  ck.close()
  got = ckpt_lib.Checkpointer(tmp_path, read_only=True).restore(
      {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))})
  assert got.step == 1


# ----------------------------------------------------------------------------- SIGTERM

def test_sigterm_before_the_first_step_ends_the_run(train_data_dir, tmp_path):
  """Nothing to save yet (the first batch, the compile): SIGTERM ends it at once, where the
  handler used to only set a flag read after a step that might never come."""
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from tests.train.helpers import small_config\n\n\ndef get_config():\n"
                 f"  return small_config({str(train_data_dir)!r})\n")
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, str(ROOT / "train_main.py"), f"--config={cfg}",
                        f"--workdir={tmp_path / 'wd'}"], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in p.stdout:                      # the loop is about to take its first batch
    lines.append(line)
    if "train FLOPs per step" in line:
      break
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 128 + signal.SIGTERM, "".join(lines) + out
  assert "SIGTERM received before the first step" in out
  assert not list((tmp_path / "wd" / "checkpoints").glob("[0-9]*"))
