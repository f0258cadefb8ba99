"""Checkpoint damage: every saved step records the checksums of its files; a flipped, truncated
or missing file is reported naming the step and the file, and the restore falls back to the
previous step (or raises with ``fallback=False``), in the trainer's ``Checkpointer`` and in
``restore_model``."""

import json
import logging

import jax
import numpy as np
import pytest

from gaze_jax.train import checkpoint as ckpt_lib
from gaze_jax.train.checkpoint import CheckpointError, Checkpointer, DamagedCheckpoint

# Random 64 x 256 float32 (64 KiB, incompressible like trained weights): the array's data file
# is the largest, and bytes flipped in its middle land inside the values.
SHAPE = (64, 256)


def _weights(step):
  return np.random.default_rng(step).standard_normal(SHAPE).astype(np.float32)


def _state(step):
  w = _weights(step)
  return {"params": {"w": jax.numpy.asarray(w), "b": jax.numpy.asarray(-w[0])},
          "opt_state": {"m": jax.numpy.asarray(2 * w)}}


def _abstract():
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  s = jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=dev)
  b = jax.ShapeDtypeStruct(SHAPE[1:], np.float32, sharding=dev)
  return {"w": s, "b": b}, {"m": s}


def _save(directory, steps=(2, 4, 6), *, async_save=True):
  ck = Checkpointer(directory, save_every=2, keep=5, async_save=async_save)
  for step in steps:
    ck.save(step, _state(step), {"pos": step})
  ck.close()


def _largest_params_file(folder):
  return max((p for p in (folder / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip(path, n=64):
  raw = bytearray(path.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + n] = bytes(255 - x for x in raw[mid:mid + n])
  path.write_bytes(bytes(raw))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:-100])


def _remove(path):
  path.unlink()


@pytest.mark.parametrize("async_save", [True, False])
def test_every_committed_step_records_the_checksums_of_its_files(tmp_path, async_save):
  _save(tmp_path, async_save=async_save)
  for step in (2, 4, 6):
    folder = tmp_path / str(step)
    rec = json.loads((folder / ckpt_lib.CHECKSUMS).read_text())
    assert rec["algorithm"] == "crc32"
    assert sorted(rec["files"]) == ckpt_lib.item_files(folder, ckpt_lib.ITEMS)
    assert {f.split("/")[0] for f in rec["files"]} == set(ckpt_lib.ITEMS)
    assert ckpt_lib.damaged_files(folder, rec, ckpt_lib.ITEMS) == []
  assert not list(tmp_path.glob(f"*{ckpt_lib.TMP_MARKER}*"))


@pytest.mark.parametrize("damage,says", [
    (_flip, r"has CRC-32 \w+, \w+ when saved \(same size: altered bytes\)"),
    (_truncate, r"has \d+ bytes, \d+ when saved"),
    (_remove, r"is missing")])
def test_damaged_file_falls_back_naming_the_step_and_file_or_raises(tmp_path, caplog, damage,
                                                                     says):
  _save(tmp_path)
  target = _largest_params_file(tmp_path / "6")
  size = target.stat().st_size
  damage(target)
  if damage is _flip:
    assert target.stat().st_size == size
  rel = target.relative_to(tmp_path / "6").as_posix()
  caplog.set_level(logging.WARNING)
  ck = Checkpointer(tmp_path, save_every=2, keep=5, read_only=True)     # damage stays in place
  got = ck.restore(*_abstract())
  assert got.step == 4
  np.testing.assert_array_equal(np.asarray(got.params["w"]), _weights(4))
  assert got.data["states"] == [{"pos": 4}]
  assert f"checkpoint {tmp_path / '6'} is damaged (step 6): {rel} " in caplog.text
  assert "falling back to the previous checkpoint" in caplog.text
  with pytest.raises(DamagedCheckpoint, match=f"damaged \\(step 6\\): {rel} {says}"):
    ck.restore(*_abstract(), fallback=False)
  with pytest.raises(DamagedCheckpoint, match=rel):
    ck.restore(*_abstract(), step=6)
  # An undamaged step restores exactly.
  got = ck.restore(*_abstract(), step=2)
  np.testing.assert_array_equal(np.asarray(got.params["w"]), _weights(2))
  ck.close()


def test_optimizer_state_is_verified_only_when_restored(tmp_path):
  _save(tmp_path, steps=(2,))
  _flip(max((p for p in (tmp_path / "2" / "opt_state").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size))
  ck = Checkpointer(tmp_path, read_only=True)
  assert ck.restore(_abstract()[0]).step == 2            # parameters only: not read
  with pytest.raises(CheckpointError, match="opt_state/.* when saved"):
    ck.restore(*_abstract())
  ck.close()


def test_restore_model_falls_back_past_flipped_bytes(tmp_path, caplog):
  """What eval_main.py restores through: a step whose weights were altered on disk is not
  evaluated."""
  from gaze_jax.train.trainer import build, init_state
  from tests.train.helpers import small_config
  cfg = small_config("unused")
  s = build(cfg)
  ck = Checkpointer(tmp_path / ckpt_lib.CHECKPOINT_DIR, save_every=1, keep=3)
  for step in (1, 2):
    ck.save(step, init_state(s, seed=step), {"pos": step})
  ck.close()
  _flip(_largest_params_file(tmp_path / ckpt_lib.CHECKPOINT_DIR / "2"))
  caplog.set_level(logging.WARNING)
  _, step = ckpt_lib.restore_model(tmp_path, cfg)
  assert step == 1
  assert "is damaged (step 2): params/" in caplog.text
  with pytest.raises(DamagedCheckpoint, match="step 2"):
    ckpt_lib.restore_model(tmp_path, cfg, fallback=False)


def test_unreadable_checksums_are_damage_and_absent_ones_a_warning(tmp_path, caplog):
  _save(tmp_path, steps=(2, 4))
  (tmp_path / "4" / ckpt_lib.CHECKSUMS).write_text("{not json")
  (tmp_path / "2" / ckpt_lib.CHECKSUMS).unlink()          # as saved before checksums existed
  caplog.set_level(logging.WARNING)
  ck = Checkpointer(tmp_path, read_only=True)
  assert ck.restore(*_abstract()).step == 2
  assert "checksums.json is unreadable" in caplog.text
  assert f"checkpoint {tmp_path / '2'} has no checksums.json" in caplog.text
  assert "not verified" in caplog.text
  ck.close()


def test_damaged_step_is_moved_aside_no_longer_counts_and_is_saved_anew(tmp_path, caplog):
  _save(tmp_path, steps=(2, 4, 6, 8))
  _flip(_largest_params_file(tmp_path / "8"))
  _truncate(_largest_params_file(tmp_path / "6"))
  caplog.set_level(logging.WARNING)
  ck = Checkpointer(tmp_path, save_every=2, keep=3)
  assert ck.restore(*_abstract()).step == 4
  assert ck.steps() == [2, 4] and ck.should_save(6)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4", "6.damaged", "8.damaged"]
  assert f"moved damaged step 8 aside to {tmp_path / '8.damaged'}" in caplog.text
  # The resumed run saves steps 6 and 8 again; keep=3 counts only restorable steps.
  for step in (6, 8, 10):
    assert ck.save(step, _state(step + 100), {"pos": step})
  ck.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "6", "6.damaged", "8", "8.damaged"]
  caplog.clear()
  ck = Checkpointer(tmp_path, save_every=2, keep=3)
  assert "2 damaged step(s)" in caplog.text and "'6.damaged', '8.damaged'" in caplog.text
  assert ck.steps() == [6, 8, 10]
  got = ck.restore(*_abstract(), step=8)
  np.testing.assert_array_equal(np.asarray(got.params["w"]), _weights(108))
  # Damaged again: step 8's second copy goes beside the first.
  _flip(_largest_params_file(tmp_path / "10"))
  _remove(_largest_params_file(tmp_path / "8"))
  assert ck.restore(*_abstract()).step == 6
  assert ck.steps() == [6]
  assert (tmp_path / "10.damaged").is_dir() and (tmp_path / "8.damaged-2").is_dir()
  ck.close()


def test_nothing_is_moved_when_no_step_restores_or_read_only(tmp_path):
  _save(tmp_path, steps=(2, 4))
  _flip(_largest_params_file(tmp_path / "4"))
  Checkpointer(tmp_path, read_only=True).restore(*_abstract())      # evaluation: read-only
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]
  # Another model (other shapes): every step fails, none is damage to move aside.
  other = jax.ShapeDtypeStruct((3, 3), np.float32,
                               sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  ck = Checkpointer(tmp_path, save_every=2, keep=3)
  with pytest.raises(CheckpointError, match="could be restored"):
    ck.restore({"w": other, "b": other}, None)
  ck.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]


def test_trainer_resumes_past_a_damaged_step_and_saves_it_anew(train_data_dir, tmp_path):
  """The issue's run: step 6 damaged, the trainer falls back to step 4, and its save at step 6
  is no longer skipped."""
  from gaze_jax.train.trainer import train
  from tests.train.helpers import small_config
  train(small_config(train_data_dir, train__num_steps=6), tmp_path)
  ckdir = tmp_path / ckpt_lib.CHECKPOINT_DIR
  assert sorted(p.name for p in ckdir.iterdir()) == ["2", "4", "6"]
  _flip(_largest_params_file(ckdir / "6"))
  train(small_config(train_data_dir, train__num_steps=8), tmp_path)
  assert sorted(p.name for p in ckdir.iterdir()) == ["4", "6", "6.damaged", "8"]
  ck = Checkpointer(ckdir, read_only=True)
  assert ck.verify(6)
  ck.close()
