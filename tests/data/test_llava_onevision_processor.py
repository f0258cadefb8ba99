"""LLaVA-OneVision image and video processing (``gaze_jax.data.llava_onevision``) against
transformers on a tiny folder: pixels, the prompt token ids of the pipeline (the folder's own
Jinja chat template), the anyres grid arithmetic, and bad processor files named by file and key.

transformers' ``LlavaOnevisionImageProcessor`` is its Pillow backend here (no torchvision);
the video processor needs torchvision, so its pixels are compared only where torchvision
imports, and its prompt expansion is checked with our frames."""

import json
import shutil

import numpy as np
import pytest

from gaze_jax.data.features import ExampleProcessor, FeatureConfig
from gaze_jax.data.llava_onevision import (LlavaOnevisionMedia, OnevisionSettings, natural_grid,
                                           patch_output_size, unpadded_grid)
from gaze_jax.data.tokenizers import load_model_tokenizer
from gaze_jax.gaze import PAD, PATCH, Image, LayoutSpec, Video
from tests.llava_onevision_folder import G, TILE, VOCAB, photo, processor, save_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("llava_ov_proc")
  save_folder(path, seed=1)
  return path


def _image_processor(folder):
  return transformers.LlavaOnevisionImageProcessorPil.from_pretrained(folder)


# (h, w) of the image, and the grid transformers chooses for it among PINPOINTS.
SIZES = [((40, 60), (2, 2)), ((30, 70), (1, 2)), ((70, 30), (2, 1)), ((50, 50), (2, 2)),
         ((20, 25), (1, 1)), ((60, 41), (2, 2))]


@pytest.mark.parametrize("hw, grid", SIZES)
def test_tiles_equal_transformers_image_processor(folder, hw, grid):
  """The base image and the tiles are transformers' pixel values to the bit (tolerance 0: the
  same Pillow resizes of the same uint8 pixels, rescaled in float64 and normalised in float32
  as its Pillow backend does), at sizes for which transformers chooses our grid; the segments
  hold its number of image tokens (the unpadded grid with a newline per row)."""
  media = LlavaOnevisionMedia.from_folder(folder, grid)
  img = photo(*hw, seed=sum(hw))
  assert media.natural_grid(*hw) == grid
  want = _image_processor(folder)(images=[img], return_tensors="np")
  np.testing.assert_array_equal(media.pixels(img), want["pixel_values"][0].transpose(0, 2, 3, 1))
  base, tiles = media.image(img)
  uh, uw = tiles.segment.gh, tiles.segment.gw
  assert base.segment == Image(G, G) and tiles.segment.tiles == grid
  proc = transformers.LlavaOnevisionProcessor.__new__(transformers.LlavaOnevisionProcessor)
  proc.image_processor, proc.num_image_tokens = _image_processor(folder), G * G
  proc.vision_aspect_ratio = "anyres_max_9"
  assert G * G + uh * (uw + 1) == proc._get_number_of_features(*hw, TILE, TILE)


@pytest.mark.parametrize("channels", [1, 4])
def test_grey_and_transparent_images_convert_as_transformers(folder, channels):
  img = photo(40, 60, seed=3)
  img = img[..., :1] if channels == 1 else np.concatenate(
      [img, np.linspace(0, 255, 60, dtype=np.uint8)[None, :, None].repeat(40, 0)], -1)
  media = LlavaOnevisionMedia.from_folder(folder, (2, 2))
  want = _image_processor(folder)(images=[img], return_tensors="np")["pixel_values"][0]
  np.testing.assert_array_equal(media.pixels(img), want.transpose(0, 2, 3, 1))


def test_base_image_only_equals_transformers_multi_image_processing(folder):
  """Grid (0, 0): an image among several in one example, padded to a square with the mean
  colour and resized (transformers' processing when an example has several images)."""
  a, b = photo(40, 60, seed=4), photo(50, 30, seed=5)
  media = LlavaOnevisionMedia.from_folder(folder, (0, 0))
  # One entry per image, each a single square.
  want = _image_processor(folder)(images=[[a, b]], return_tensors="np")["pixel_values"][:, 0]
  got = np.concatenate([media.pixels(a), media.pixels(b)])
  np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
  visual, newline = media.image(a)
  assert visual.segment == Image(G, G) and newline == "<image>"


def test_video_frames(folder):
  """Frames resized to the tower's size, rescaled and normalised. A square frame is what
  transformers' image processor gives it on its own (to the bit: Pillow, as ours). Where
  torchvision imports, against transformers' video processor, which resizes with torchvision's
  antialiased bicubic: tolerance one 0-255 level after normalisation, 1 / 255 / min(std)."""
  media = LlavaOnevisionMedia.from_folder(folder, (2, 2))
  square = [photo(48, 48, seed=s) for s in range(3)]
  want = _image_processor(folder)(images=[square], return_tensors="np")["pixel_values"][:, 0]
  np.testing.assert_array_equal(media.frames(square), want.transpose(0, 2, 3, 1))
  visual, newline = media.video(square)
  assert visual.segment == Video(3, 2, 2) and newline == "<video>"
  pytest.importorskip("torchvision")
  frames = [photo(36, 48, seed=s) for s in range(3)]
  video = transformers.LlavaOnevisionVideoProcessor.from_pretrained(folder)
  want = video(videos=[np.stack(frames)], return_tensors="np")["pixel_values_videos"][0]
  tol = 1 / 255 / min(media.settings.video.std)
  np.testing.assert_allclose(media.frames(frames), want.transpose(0, 2, 3, 1), atol=tol)


def test_grid_arithmetic_matches_transformers():
  """natural_grid, the fitted size and the unpadded grid against transformers' own functions
  on many sizes (default pinpoints, 384 px tiles of 27 x 27 tokens)."""
  from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
  from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image
  torch = pytest.importorskip("torch")
  pins = [[h * 384, w * 384] for h in range(1, 7) for w in range(1, 7)]
  rng = np.random.default_rng(0)
  for h, w in rng.integers(20, 3000, size=(60, 2)).tolist():
    H, W = select_best_resolution((h, w), pins)
    assert natural_grid(h, w, pins, 384) == (H // 384, W // 384)
    assert patch_output_size(h, w, H, W) == get_patch_output_size(np.zeros((1, h, w)), (H, W),
                                                                  "channels_first")
    grid = (H // 384, W // 384)
    feats = torch.zeros(1, grid[0] * 27, grid[1] * 27)
    assert unpadded_grid(h, w, grid, 27) == tuple(unpad_image(feats, [h, w]).shape[1:])


def test_anyres_max_downsampling_is_refused(folder, tmp_path):
  """With anyres_max_1, a 2 x 2 grid of a square image keeps 8 x 8 tokens, more than
  1.1^2 x 16: transformers would downsample them; we refuse by name."""
  d = tmp_path / "f"
  shutil.copytree(folder, d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "vision_aspect_ratio": "anyres_max_1"}))
  proc = json.loads((d / "processor_config.json").read_text())
  (d / "processor_config.json").write_text(json.dumps({**proc,
                                                       "vision_aspect_ratio": "anyres_max_1"}))
  media = LlavaOnevisionMedia.from_folder(d, (2, 2))
  with pytest.raises(ValueError, match=r"a 50x50 image at the grid \(2, 2\) keeps 8x8 tokens, "
                     r"more than anyres_max_1 allows.*not supported"):
    media.image(photo(50, 50))
  assert media.tiled_grid(20, 80) == (2, 8)       # one tile's worth of tokens: kept


def _features(folder, media, example, spec):
  tok = load_model_tokenizer(folder)
  cfg = FeatureConfig(spec=spec, image_size=TILE, patch_size=TILE // G, vocab_size=VOCAB)
  return tok, ExampleProcessor(tok, cfg, media=media).features(example)


def _in_position_order(f, media_id):
  """Our token ids in position order, patch slots read as the media token id."""
  kind, pos = f["kind"], f["position"]
  live = kind != PAD
  out = np.zeros(int(pos[live].max()) + 1, np.int64)
  out[pos[live]] = np.where(kind[live] == PATCH, media_id, f["tokens"][live])
  return out.tolist()


SPEC = LayoutSpec(seq_len=200, max_regions=80, max_images=6, region_shape=(1, 2), num_ctx=0)
TURN = ("What is in the picture?", "A red cat on a mat.")


def _reference_ids(folder, media, monkeypatch, content, answer, **media_kw):
  proc = processor(folder, media, monkeypatch)
  text = proc.apply_chat_template([{"role": "user", "content": content},
                                   {"role": "assistant",
                                    "content": [{"type": "text", "text": answer}]}])
  return proc(text=[text], return_tensors="np", **media_kw)["input_ids"][0].tolist()


def test_video_prompt_token_ids_equal_transformers(folder, monkeypatch):
  media = LlavaOnevisionMedia.from_folder(folder, (2, 2))
  frames = [photo(36, 48, seed=s) for s in range(3)]
  q, a = "Describe the video.", "A ball rolls left."
  _, f = _features(folder, media, {"id": "v", "images": frames, "is_video": True,
                                   "turns": [{"question": q, "answer": a}]}, SPEC)
  want = _reference_ids(folder, media, monkeypatch, [{"type": "video"},
                                                     {"type": "text", "text": q}], a,
                        videos=[frames])
  assert _in_position_order(f, media.settings.video_token_id) == want


def test_two_images_prompt_token_ids_equal_transformers(folder, monkeypatch):
  """Two images in one example: transformers processes each as the base image alone plus a
  newline (grid (0, 0))."""
  media = LlavaOnevisionMedia.from_folder(folder, (0, 0))
  imgs = [photo(40, 60, seed=7), photo(50, 30, seed=8)]
  _, f = _features(folder, media, {"id": "two", "images": imgs, "turns": [
      {"question": "<image>\n<image>\n" + TURN[0], "answer": TURN[1]}]}, SPEC)
  want = _reference_ids(folder, media, monkeypatch, [{"type": "image"}, {"type": "image"},
                                                     {"type": "text", "text": TURN[0]}],
                        TURN[1], images=[imgs])
  assert _in_position_order(f, media.settings.image_token_id) == want


def test_tiled_image_prompt_token_ids_equal_transformers(folder, monkeypatch):
  """One image at 2 x 2 tiles: the base image, then the unpadded grid with a newline (the
  image token id, the part's text_ids) after each row."""
  media = LlavaOnevisionMedia.from_folder(folder, (2, 2))
  img = photo(40, 60, seed=9)
  _, f = _features(folder, media, {"id": "one", "images": [img], "turns": [
      {"question": TURN[0], "answer": TURN[1]}]}, SPEC)
  want = _reference_ids(folder, media, monkeypatch, [{"type": "image"},
                                                     {"type": "text", "text": TURN[0]}],
                        TURN[1], images=[img])
  assert _in_position_order(f, media.settings.image_token_id) == want


def _edit(folder, tmp_path, name, edit):
  d = tmp_path / "bad"
  shutil.copytree(folder, d)
  cfg = json.loads((d / name).read_text())
  edit(cfg)
  (d / name).write_text(json.dumps(cfg))
  return d


@pytest.mark.parametrize("name, edit, match", [
    ("preprocessor_config.json", lambda c: c.update(size={"height": 48, "width": 48}),
     r"preprocessor_config.json: size 48 is not supported \(only the vision tower's image "
     r"size, 32\)"),
    ("preprocessor_config.json", lambda c: c.update(size={"height": 32, "width": 40}),
     r"preprocessor_config.json: size=.* is not supported \(only a square"),
    ("preprocessor_config.json", lambda c: c.update(do_center_crop=True),
     r"preprocessor_config.json: do_center_crop=true is not supported"),
    ("preprocessor_config.json", lambda c: c.update(resample="bicubic"),
     r"preprocessor_config.json: resample='bicubic' is not supported"),
    ("preprocessor_config.json", lambda c: c.update(image_processor_type="CLIPImageProcessor"),
     r"image_processor_type='CLIPImageProcessor' is not supported"),
    ("preprocessor_config.json", lambda c: c.update(image_grid_pinpoints=[[32]]),
     r"preprocessor_config.json: image_grid_pinpoints=\[\[32\]\] must be \[height, width\]"),
    ("video_preprocessor_config.json", lambda c: c.update(do_sample_frames=True),
     r"video_preprocessor_config.json: do_sample_frames=true is not supported"),
    ("processor_config.json", lambda c: c.update(vision_feature_select_strategy="default"),
     r"processor_config.json: vision_feature_select_strategy='default' is not supported"),
    ("processor_config.json", lambda c: c.update(num_image_tokens=17),
     r"processor_config.json: num_image_tokens=17, but \S*config.json gives 16"),
    ("processor_config.json", lambda c: c.update(vision_aspect_ratio="anyres_max_4"),
     r"processor_config.json: vision_aspect_ratio='anyres_max_4', but \S*config.json says "
     r"'anyres_max_9'"),
    ("config.json", lambda c: c.update(vision_aspect_ratio="anyres", model_type="llava_onevision"),
     r"processor_config.json: vision_aspect_ratio='anyres_max_9', but \S*config.json says "
     r"'anyres'"),
])
def test_bad_processor_fields_name_file_and_key(folder, tmp_path, name, edit, match):
  with pytest.raises(ValueError, match=match):
    OnevisionSettings.from_folder(_edit(folder, tmp_path, name, edit))


def test_bad_grids_and_folders(folder, tmp_path):
  for grid, match in [((1, 0), "both 0"), ((-1, 2), "two ints >= 0"), ((2.0, 2), "two ints")]:
    with pytest.raises(ValueError, match=match):
      LlavaOnevisionMedia.from_folder(folder, grid)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    OnevisionSettings.from_folder(tmp_path)
  d = tmp_path / "novideo"
  shutil.copytree(folder, d)
  (d / "video_preprocessor_config.json").unlink()
  media = LlavaOnevisionMedia.from_folder(d, (2, 2))       # images still work
  assert media.pixels(photo(40, 60)).shape == (5, TILE, TILE, 3)
  with pytest.raises(ValueError, match=r"transformers' video processor defaults: size 384 is "
                     r"not supported"):
    media.video([photo(32, 32)])
  with pytest.raises(ValueError, match=r"an image must be uint8"):
    media.image(np.zeros((40, 60, 3), np.float32))
