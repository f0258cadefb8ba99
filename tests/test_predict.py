"""predict_main / gaze_jax.predict on a checkpoint of the demo recipe (configs/demo.py, trained a
few steps here): the answer, the regions per layer, the gaze map (titled with the model's
answer, no ground truth, and a note when a non-square image was stretched), and clear errors
for an unreadable image, a workdir without a checkpoint or config, and a question too long.
Also what predict_main and eval_main print: our lines once, no orbax internals."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train.helpers import library_log_lines

pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
from PIL import Image as PILImage  # noqa: E402

from gaze_jax import predict as predict_lib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """A run of configs/demo.py (its model, data and tokenizer) trained 4 steps on a small split."""
  from configs import demo
  from gaze_jax.train import trainer

  tmp = tmp_path_factory.mktemp("predict")
  c = demo.get_config()
  c.data.builder_overrides.num_train = 64
  c.data.builder_overrides.num_validation = 8
  c.data.builder_overrides.num_test = 8
  c.data.data_dir = str(tmp / "tfds")
  c.train.num_steps = 4
  c.train.eval_every = 0
  c.checkpoint.save_every = 4
  trainer.train(c, tmp / "run")
  return tmp / "run", c


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
  """A gaze_shapes scene saved at 200 px (the model takes 64 px) and its question."""
  from gaze_jax.data import scenes

  ex = scenes.shapes_example(np.random.default_rng([7, 123]), image_size=64, grid=4,
                             min_objects=6, max_objects=10, question_types=("where",),
                             example_id="x", source=0)
  path = tmp_path_factory.mktemp("img") / "scene.png"
  PILImage.fromarray(np.asarray(ex["images"][0])).resize((200, 200)).save(path)
  return path, ex["turns"][0]["question"]


def test_predict_answers_and_counts_the_heads_per_layer(demo_run, scene, tmp_path, caplog):
  workdir, c = demo_run
  image, question = scene
  with caplog.at_level("INFO", logger="gaze_jax.predict"):
    p = predict_lib.predict(workdir, image, question, max_new_tokens=4)
  assert "resizing the image from 200x200 to the model's 64x64" in caplog.text
  assert p.question == question and p.image_size == (200, 200) and p.model_image_size == (64, 64)
  assert p.resize_note is None                       # square to square: not stretched
  assert isinstance(p.answer, str)
  assert len(p.regions) == c.model.decoder.num_layers
  heads = c.model.decoder.num_heads
  for layer, shares in enumerate(p.regions):
    # Group routing: each GQA group of heads keeps K regions, so the heads of all regions of a
    # layer sum to heads x K, and no region has more heads than there are.
    assert sum(s.heads for s in shares) == heads * c.model.gaze.top_k, layer
    assert all(1 <= s.heads <= s.of_heads == heads for s in shares)
    assert [s.heads for s in shares] == sorted((s.heads for s in shares), reverse=True)
  assert p.summary().count("\n") == c.model.decoder.num_layers - 1
  png = p.write_gaze_map(tmp_path / "map.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_region_shares_by_hand():
  """Two layers, 4 heads, K = 2, at the first answer row (slot 2)."""
  from gaze_jax.data.features import ModelInputs
  from gaze_jax.gaze import Image, LayoutSpec, Text, build_layout

  layout = build_layout([[Image(2, 4), Text(3)]], LayoutSpec(seq_len=16, max_regions=2,
                                                               max_images=1,
                                                               region_shape=(2, 2), num_ctx=0))
  mask = np.zeros((1, 16), np.float32)
  first = int(np.flatnonzero(np.asarray(layout.kind[0]) == 0)[1])
  mask[0, first:first + 2] = 1
  inputs = ModelInputs(None, None, layout, None, mask, None)
  ids = np.full((1, 16, 4, 2), -1, np.int32)
  layer0, layer1 = ids.copy(), ids.copy()
  layer0[0, first] = [[0, 1], [1, -1], [1, -1], [0, 1]]
  layer1[0, first] = [[1, -1], [1, -1], [1, -1], [1, -1]]
  layer1[0, first + 1] = [[0, -1]] * 4          # a later answer row does not count
  got = predict_lib.region_shares(inputs, [layer0, layer1])
  assert [(s.region, s.col, s.heads) for s in got[0]] == [(1, 1, 4), (0, 0, 2)]
  assert [(s.region, s.heads, s.share) for s in got[1]] == [(1, 4, 1.0)]
  assert predict_lib.region_shares(inputs, [None]) == []


def test_predict_main_prints_and_writes_the_gaze_map(demo_run, scene):
  workdir, _ = demo_run
  image, question = scene
  out = subprocess.run([sys.executable, str(ROOT / "predict_main.py"), f"--workdir={workdir}",
                        f"--image={image}", f"--question={question}", "--max_new_tokens=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"question: {question}" in out.stdout and "answer:" in out.stdout
  assert "layer 0: row " in out.stdout and "of 4 heads" in out.stdout
  gaze_map = image.with_name("scene_gaze.png")
  assert f"gaze map: {gaze_map}" in out.stdout and gaze_map.is_file()
  # Our lines once (the resize line used to come twice), and none of orbax's.
  printed = out.stdout + out.stderr
  assert printed.count("resizing the image from 200x200 to the model's 64x64") == 1, printed
  assert library_log_lines(printed) == [], printed


def test_eval_main_prints_no_orbax_internals_and_names_exact_match(demo_run, tmp_path):
  import json

  workdir, _ = demo_run
  out = tmp_path / "eval"
  p = subprocess.run([sys.executable, str(ROOT / "eval_main.py"), f"--workdir={workdir}",
                      f"--out_dir={out}", "--splits=train", "--max_batches=1",
                      "--num_gaze_maps=0", "--baselines=dense", "--noanswer_prior"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  printed = p.stdout + p.stderr
  assert printed.count(f"evaluating {workdir} at step 4 as trained") == 1, printed
  assert "gaze exact match so far" in printed
  assert library_log_lines(printed) == [], printed
  # (The train split: the validation split's 8 examples are less than one batch of 32.)
  # eval_results.json: exact_match, and accuracy as its older name for the readers of results.
  rows = json.loads((out / "eval_results.json").read_text())["splits"][0]["results"]
  for name in ("gaze", "dense"):
    row = rows[name]
    assert row["exact_match"] == row["accuracy"] and 0.0 <= row["token_accuracy"] <= 1.0


def test_a_stretched_image_is_said_so_and_the_map_shows_the_models_answer(demo_run, scene,
                                                                         tmp_path, caplog,
                                                                         monkeypatch):
  """A 300x200 image for the 64x64 model: the log, ``resize_note`` and the gaze map's title say
  it was stretched; the map titles the answer "model's answer" (there is no true one) and its
  legend names no ground truth (none is drawn)."""
  from gaze_jax.eval import gaze_maps
  from tests.eval.test_gaze_maps import spy_on_titles

  workdir, _ = demo_run
  image, question = scene
  wide = tmp_path / "wide.png"
  PILImage.open(image).resize((300, 200)).save(wide)
  with caplog.at_level("INFO", logger="gaze_jax.predict"):
    p = predict_lib.predict(workdir, wide, question, max_new_tokens=4)
  note = "the image was stretched from 300x200 to the model's 64x64 (aspect ratio 1.50 -> 1.00)"
  assert p.image_size == (200, 300) and p.resize_note == note
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [note]
  seen = spy_on_titles(monkeypatch)
  assert p.write_gaze_map(tmp_path / "map.png").is_file()
  _, answer_line, note_line, legend = seen["titles"][0]        # the question first
  assert answer_line == f"model's answer: {p.answer}"
  assert note_line == note
  assert legend == gaze_maps.legend() and "ground truth" not in legend


def test_resize_note_only_for_a_changed_aspect_ratio():
  assert predict_lib.resize_note((200, 200), (64, 64)) is None
  assert predict_lib.resize_note((480, 640), (448, 588)) is None     # a Qwen-VL bucket: 1.6%
  assert predict_lib.resize_note((640, 480), (64, 64)) == (
      "the image was stretched from 480x640 to the model's 64x64 (aspect ratio 0.75 -> 1.00)")


def test_bad_inputs_name_the_file_or_field(demo_run, scene, tmp_path):
  from gaze_jax.train.checkpoint import CheckpointError

  workdir, _ = demo_run
  image, question = scene
  broken = tmp_path / "broken.png"
  broken.write_text("not an image")
  with pytest.raises(ValueError, match=f"image file {broken} cannot be read"):
    predict_lib.predict(workdir, broken, question)
  with pytest.raises(FileNotFoundError, match="nosuch.png does not exist"):
    predict_lib.predict(workdir, tmp_path / "nosuch.png", question)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    predict_lib.predict(tmp_path, image, question)
  empty = tmp_path / "run"
  empty.mkdir()
  (empty / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(CheckpointError, match="no checkpoint"):
    predict_lib.predict(empty, image, question)
  with pytest.raises(ValueError, match="does not fit the model's context"):
    predict_lib.predict(workdir, image, "where " * 200)
  with pytest.raises(ValueError, match="question must be a non-empty string"):
    predict_lib.predict(workdir, image, "  ")


def test_a_config_json_of_an_older_version_loads_with_defaults_said_and_checked(
    demo_run, scene, tmp_path, caplog):
  """A run whose config.json lacks fields added since loads with their defaults, in a warning
  naming the fields and the file; a default that is not what the run trained with (here the
  tokenizer: the demo's is "words", the default "byte") is refused by the checkpoint's
  tokenizer fingerprint, not used."""
  import json
  import shutil

  from gaze_jax.train.checkpoint import CHECKPOINT_DIR, CheckpointError

  workdir, _ = demo_run
  image, question = scene
  copy = tmp_path / "run"
  shutil.copytree(workdir / CHECKPOINT_DIR, copy / CHECKPOINT_DIR)
  config = json.loads((workdir / "config.json").read_text())
  del config["data"]["video_fps"], config["train"]["profile_steps"]
  (copy / "config.json").write_text(json.dumps(config))
  with caplog.at_level("WARNING", logger="gaze_jax.train"):
    got = predict_lib.predict(copy, image, question, max_new_tokens=2)
  assert (f"{copy / 'config.json'} lacks the fields data.video_fps, train.profile_steps"
          in caplog.text)
  assert got.answer == predict_lib.predict(workdir, image, question, max_new_tokens=2).answer
  assert config["data"].pop("tokenizer") == "words"
  (copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="tokenizer"):
    predict_lib.predict(copy, image, question, max_new_tokens=1)
