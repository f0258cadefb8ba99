"""Run paths on ``gs://`` against the Cloud Storage emulator (``tests/gcs_emulator.py``): the
Checkpointer (save, restore, keep, a damaged object found by the checksums, moved aside), the
metrics writer (a JSONL rewritten whole, the records a resumed run redoes dropped, TensorBoard
event files) and the dataset through its local mirror. A whole run in the bucket (trained from
a Hugging Face folder in the bucket, killed, resumed, evaluated, asked, exported) is
``tests/test_journey.py``."""

import json
import logging

import numpy as np
import pytest

from gaze_jax import paths
from gaze_jax.train import checkpoint as ckpt_lib
from gaze_jax.train import metrics as metrics_lib
from gaze_jax.train.checkpoint import Checkpointer, DamagedCheckpoint
from tests.train.test_checkpoint import _abstract, _state, _weights


def _flip_largest(folder):
  """Flips bytes in the middle of the largest parameter file of a step folder (an epath)."""
  target = max(paths.list_files(folder / "params"), key=lambda p: p.stat().length)
  raw = bytearray(target.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 64] = bytes(255 - x for x in raw[mid:mid + 64])
  target.write_bytes(bytes(raw))
  return target.relative_to(folder).as_posix()


def test_gcs_paths_stay_uris():
  """``epath.Path("gs://b/x").absolute()`` is the local ``<cwd>/gs:/b/x``: absolute() keeps
  URIs."""
  assert str(paths.absolute("gs://b/run/checkpoints")) == "gs://b/run/checkpoints"
  assert not paths.is_local("gs://b/run") and paths.is_local("run")
  assert paths.absolute("run").is_absolute()


def test_gcs_checkpointer_saves_verifies_and_falls_back(gcs, gcs_dir, caplog):
  ck = Checkpointer(str(gcs_dir), save_every=2, keep=2)
  assert str(ck.directory) == str(gcs_dir)
  for step in (2, 4, 6):
    ck.save(step, _state(step), {"pos": step})
  ck.close()
  prefix = gcs_dir.name + "/"
  objects = gcs.objects(prefix)
  # keep=2 deleted step 2; orbax committed each step in place with its commit file, after the
  # checksums.
  assert sorted({n[len(prefix):].split("/")[0] for n in objects}) == ["4", "6"]
  for step in (4, 6):
    assert f"{prefix}{step}/commit_success.txt" in objects
    rec = json.loads((gcs_dir / str(step) / ckpt_lib.CHECKSUMS).read_text())
    assert sorted(rec["files"]) == ckpt_lib.item_files(gcs_dir / str(step), ckpt_lib.ITEMS)
    assert {f.split("/")[0] for f in rec["files"]} == set(ckpt_lib.ITEMS)
    for rel, want in rec["files"].items():
      assert objects[f"{prefix}{step}/{rel}"] == want["size"]
  ck = Checkpointer(gcs_dir, save_every=2, keep=2, read_only=True)
  got = ck.restore(*_abstract())
  assert got.step == 6 and got.data["states"] == [{"pos": 6}]
  np.testing.assert_array_equal(np.asarray(got.params["w"]), _weights(6))
  ck.close()
  rel = _flip_largest(gcs_dir / "6")
  caplog.set_level(logging.WARNING)
  ck = Checkpointer(gcs_dir, save_every=2, keep=2)
  with pytest.raises(DamagedCheckpoint, match=f"{gcs_dir / '6'} is damaged \\(step 6\\): "
                                              f"{rel} has CRC-32"):
    ck.restore(*_abstract(), fallback=False)
  got = ck.restore(*_abstract())
  assert got.step == 4
  np.testing.assert_array_equal(np.asarray(got.params["w"]), _weights(4))
  assert f"moved damaged step 6 aside to {gcs_dir / '6.damaged'}" in caplog.text
  assert ck.steps() == [4] and (gcs_dir / "6.damaged" / "commit_success.txt").exists()
  ck.close()


def test_gcs_incomplete_step_is_reported(gcs_dir, caplog):
  """On gs:// orbax writes a step in place: a step folder without its commit file is an
  interrupted save, reported (and removed by orbax), never restored."""
  ck = Checkpointer(gcs_dir, save_every=2, keep=3)
  ck.save(2, _state(2), {"pos": 2})
  ck.close()
  (gcs_dir / "4" / "params").mkdir(parents=True)
  (gcs_dir / "4" / "params" / "manifest.ocdbt").write_bytes(b"partial")
  caplog.set_level(logging.WARNING)
  ck = Checkpointer(gcs_dir, save_every=2, keep=3)
  assert "1 incomplete checkpoint folder(s)" in caplog.text and "['4']" in caplog.text
  assert ck.steps() == [2] and ck.restore(*_abstract()).step == 2
  ck.close()
  assert not (gcs_dir / "4").exists()


def test_gcs_metrics_hold_each_step_once_and_tensorboard_reads_them(gcs, gcs_dir, tmp_path):
  from tests.train.test_units import _event_scalars

  log = metrics_lib.MetricsLogger(gcs_dir)
  for step in (2, 4, 5, 6):
    log.write(step, {"loss": float(step)})
  # Every write is in the object already (rewritten whole: no appends in Cloud Storage).
  assert len((gcs_dir / "metrics.jsonl").read_text().splitlines()) == 4
  log.close()
  log = metrics_lib.MetricsLogger(gcs_dir, start_step=4)     # resumed from step 4
  assert log.dropped == 2
  for step in (5, 6):
    log.write(step, {"loss": 10.0 + step})
  log.close()
  lines = [json.loads(x) for x in (gcs_dir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in lines] == [(2, 2.0), (4, 4.0), (5, 15.0), (6, 16.0)]
  events = sorted(p for p in gcs.objects(f"{gcs_dir.name}/tb/") if "tfevents" in p)
  assert len(events) == 2
  local = tmp_path / "tb"
  local.mkdir()
  for name in events:
    (local / name.rsplit("/", 1)[1]).write_bytes((gcs.root / name).read_bytes())
  got = sorted(x for x in _event_scalars(local) if x[1] == "train/loss")
  assert got == [(2, "train/loss", 2.0), (4, "train/loss", 4.0), (5, "train/loss", 15.0),
                 (6, "train/loss", 16.0)]


def test_gcs_dataset_is_built_in_a_local_mirror_and_copied_both_ways(gcs, gcs_dir, tmp_path,
                                                                    monkeypatch, caplog):
  """array_record reads local files only: prepare builds the dataset in the local mirror and
  copies it to the bucket; another host (another cache) copies it down, once."""
  tfds = pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
  from gaze_jax.data import builders

  tfds.disable_progress_bar()
  kw = dict(num_train=8, num_validation=8, num_test=8)
  monkeypatch.setenv(builders.CACHE_ENV, str(tmp_path / "host0"))
  caplog.set_level(logging.INFO, logger="gaze_jax.data.builders")
  b = builders.prepare("gaze_shapes", str(gcs_dir), "tiny", **kw)
  local = builders.data_dir_of(b)
  assert str(local).startswith(str(tmp_path / "host0" / "gs" / gcs.bucket / gcs_dir.name))
  rel = local.relative_to(builders.local_data_dir(gcs_dir)).as_posix()
  up = gcs.objects(f"{gcs_dir.name}/{rel}/")
  assert f"{gcs_dir.name}/{rel}/dataset_info.json" in up and len(up) == len(list(local.iterdir()))
  assert f"copied to {gcs_dir / rel}" in caplog.text
  monkeypatch.setenv(builders.CACHE_ENV, str(tmp_path / "host1"))
  caplog.clear()
  other = builders.builder("gaze_shapes", gcs_dir, "tiny", **kw)
  assert other.is_prepared() and f"{gcs_dir / rel} copied to {tmp_path / 'host1'}" in caplog.text
  a, c = b.as_data_source("validation"), other.as_data_source("validation")
  assert len(a) == len(c) == 8 and a[3]["id"] == c[3]["id"]
  caplog.clear()
  builders.prepare("gaze_shapes", gcs_dir, "tiny", **kw)          # nothing to copy now
  assert "copied" not in caplog.text
  assert not list((tmp_path / "host1").rglob("*.incomplete-*"))


# ----------------------------------------------------------------------------- a whole run
