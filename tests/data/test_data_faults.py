"""Bad inputs fail with a short error naming the file and the record (issue 28): photos with an
EXIF orientation, damaged dataset files, empty llava splits and lone surrogates, a too-long
record mid-run, and skip_too_long when no example fits."""

import json
import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
pytest.importorskip("grain", reason="the [data] extra is not installed")
from PIL import Image as PILImage  # noqa: E402

from gaze_jax.data import builders, llava, pipeline  # noqa: E402
from gaze_jax.data.features import ExampleTooLong  # noqa: E402


def _next_within(it, seconds: float = 120):
  """``next(it)`` in a thread: a pipeline that spins forever fails the test instead of hanging
  it. Returns the batch, or raises what ``next`` raised."""
  out = {}

  def run():
    try:
      out["batch"] = next(it)
    except BaseException as e:    # handed to the test thread
      out["error"] = e

  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), f"next(iterator) did not return within {seconds} s"
  if "error" in out:
    raise out["error"]
  return out["batch"]


# --------------------------------------------------------------------------- item 4

def test_exif_orientation_is_applied(tmp_path):
  # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 = displayed turned
  # 90 degrees clockwise: 20 wide x 40 high, red on top.
  stored = np.zeros((20, 40, 3), np.uint8)
  stored[:, :20, 0] = 255
  stored[:, 20:, 2] = 255
  exif = PILImage.Exif()
  exif[0x0112] = 6
  path = tmp_path / "phone.jpg"
  PILImage.fromarray(stored).save(path, exif=exif, quality=95)
  from gaze_jax.predict import read_image           # the training data and predict_main

  for im in (llava.load_image(path), read_image(path)):
    assert im.shape == (40, 20, 3)
    np.testing.assert_allclose(im[:15].mean((0, 1)), [255, 0, 0], atol=12)
    np.testing.assert_allclose(im[25:].mean((0, 1)), [0, 0, 255], atol=12)


# --------------------------------------------------------------------------- item 7

@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  """A prepared gaze_shapes dataset of 4 training examples (copied before damaging it)."""
  d = tmp_path_factory.mktemp("faults")
  builders.prepare("gaze_shapes", d, "tiny", num_train=4, num_validation=0, num_test=0)
  return d


def _damage(folder, case: str):
  """Damages the prepared dataset in ``folder``; returns the file the error must name."""
  rec = next(folder.glob("gaze_shapes/*/*/gaze_shapes-train.array_record-*"))
  info = rec.parent / "dataset_info.json"
  if case == "truncated_records":
    rec.write_bytes(rec.read_bytes()[:5000])
  elif case == "flipped_bytes":
    data = bytearray(rec.read_bytes())
    data[100:110] = bytes(b ^ 0xFF for b in data[100:110])   # inside the first chunk
    rec.write_bytes(bytes(data))
  elif case == "deleted_records":
    rec.unlink()
  elif case == "truncated_info":
    info.write_bytes(info.read_bytes()[:300])
  elif case == "deleted_info":
    info.unlink()
  return info if "info" in case else rec


@pytest.mark.parametrize("case", ["truncated_records", "flipped_bytes", "deleted_records",
                                  "truncated_info", "deleted_info"])
def test_damaged_dataset_files_are_named(shapes_dir, tmp_path, case):
  d = tmp_path / "tfds"
  shutil.copytree(shapes_dir, d)
  bad = _damage(d, case)
  with pytest.raises(builders.DamagedDatasetError) as e:
    b = builders.prepare("gaze_shapes", d, "tiny", num_train=4, num_validation=0, num_test=0)
    src = pipeline.data_source(b, "train", process_index=0, process_count=1)
    for i in range(len(src)):
      src[i]
  msg = str(e.value)
  assert str(bad) in msg and f"delete the folder {bad.parent}" in msg, msg
  if case == "flipped_bytes":
    assert "record 0 cannot be read" in msg, msg


# --------------------------------------------------------------------------- item 8

GOOD = {"id": "good", "image": "a.png", "conversations": [
    {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Grey."}]}


def _llava_files(tmp_path, splits: dict) -> tuple[dict, str]:
  imgs = tmp_path / "images"
  imgs.mkdir(exist_ok=True)
  PILImage.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(imgs / "a.png")
  files = {}
  for split, records in splits.items():
    files[split] = str(tmp_path / f"{split}.json")
    with open(files[split], "w") as f:
      json.dump(records, f)       # ensure_ascii: a lone surrogate is written as an escape
  return files, str(imgs)


MISSING_IMAGE = dict(GOOD, id="no-image", image="missing.png")
SURROGATE = {"id": "odd", "image": "a.png", "conversations": [
    {"from": "human", "value": "Why \ud800?"}, {"from": "gpt", "value": "No."}]}


@pytest.mark.parametrize("splits,skip_bad,bad_split,want", [
    ({"train": []}, False, "train", "split 'train' has no examples: it holds no records"),
    ({"train": [MISSING_IMAGE]}, True, "train", "all 1 of its records were skipped as bad"),
    ({"train": [GOOD], "validation": []}, False, "validation", "split 'validation' has no"),
    ({"train": [GOOD, SURROGATE]}, False, "train",
     r"record 'odd' (index 1): conversations[0] holds '\ud800' at character 4"),
])
def test_empty_llava_splits_and_lone_surrogates_name_the_file(data_dir, tmp_path, splits,
                                                               skip_bad, bad_split, want):
  files, imgs = _llava_files(tmp_path, splits)
  with pytest.raises(llava.LlavaRecordError) as e:
    builders.prepare("llava_json", data_dir, json_files=files, image_dir=imgs,
                     skip_bad=skip_bad)
  assert str(e.value).startswith(files[bad_split]) and want in str(e.value), str(e.value)


# --------------------------------------------------------------------------- items 9 and 13

LONG_QUESTION = "Describe every part of this picture in detail, please. " * 4   # > seq_len 80


def _llava_iterator(tmp_path, records, **data):
  """gaze_jax.train.data's iterator over a llava_json train split of ``records`` (the tiny
  train-test model: seq_len 80, batch 2)."""
  from configs import common
  from gaze_jax.runs import run_tokenizer
  from gaze_jax.train import data as data_lib
  from gaze_jax.train.config import run_config
  from tests.train.helpers import small_config

  files, imgs = _llava_files(tmp_path, {"train": records})
  c = common.llava_json_data(small_config(tmp_path / "tfds"), files, imgs)
  c.data.batch_size = 2
  c.data.update(data)
  run = run_config(c)
  b = data_lib.prepare(run, tmp_path)
  return (data_lib.make_iterator(run, b, run_tokenizer(run), run.train_model, run.spec),
          files["train"])


def _record(i: int, question: str) -> dict:
  return dict(GOOD, id=f"r{i}", conversations=[{"from": "human", "value": question},
                                                {"from": "gpt", "value": "Grey."}])


def test_a_too_long_record_mid_run_raises_naming_its_file_and_record(tmp_path):
  records = [_record(i, "What colour?") for i in range(5)]
  records[3] = _record(3, LONG_QUESTION)
  it, path = _llava_iterator(tmp_path, records)
  with pytest.raises(ExampleTooLong) as e:
    for _ in range(8):            # the endless, shuffled train iterator meets it in epoch one
      _next_within(it)
  msg = str(e.value)
  assert msg.startswith(f"{path} record 3: example 'r3' needs ") and "slots" in msg, msg
  assert len(msg) < 400 and "\n" not in msg, msg


def test_skip_too_long_fails_when_no_example_fits(tmp_path):
  records = [_record(i, LONG_QUESTION + "x" * i) for i in range(3)]
  it, path = _llava_iterator(tmp_path, records, skip_too_long=True)
  with pytest.raises(ExampleTooLong) as e:
    _next_within(it)
  msg = str(e.value)
  assert "split 'train'" in msg and path in msg and "all of the first 3 examples" in msg, msg
  assert "(seq_len=80)" in msg, msg
