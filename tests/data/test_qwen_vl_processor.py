"""Qwen2.5-VL / Qwen3-VL image and video processing at static buckets
(``gaze_jax.data.qwen_vl``) against transformers' processors on tiny folders: pixel_values and
grid_thw (the processor's pixel budget pinned to the bucket's area), the bucket choice, and the
prompt token ids of the pipeline (the folder's Qwen-style chat template) against the
processor's input_ids.

transformers' image processor is its Pillow backend here (no torchvision): equal bit for bit.
The video processors need torchvision: where it imports, video pixels are compared with them
(Pillow vs torchvision resizing: at most one 0-255 level; frames already at the bucket size:
float32 round-off); where not, the processor's prompt expansion reads our frames' grid and
sampled indices (``qwen_vl_folder._Frames``)."""

import numpy as np
import pytest

from gaze_jax.data.features import ExampleProcessor, FeatureConfig
from gaze_jax.data.qwen_vl import (PatchVisual, QwenVLMedia, QwenVLSettings, frame_timestamps,
                                   patchify, qwen_vl_bucket, qwen_vl_tokenizer, smart_resize)
from gaze_jax.gaze import Image, Text, Video
from tests.data.qwen_vl_folder import has_torchvision, photo, processor, save_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
# Buckets per family; the images below are sized so that transformers' own smart_resize gives
# the first two (their sides round to them), the square one is reached by pinning the budget.
BUCKETS = {"qwen2_5_vl": [(308, 392), (336, 252), (448, 448)],
           "qwen3_vl": [(288, 384), (320, 256), (448, 448)]}
IMAGES = [("astronaut", 300, 400), ("chelsea", 330, 250), ("astronaut", 512, 512)]
QUESTION, ANSWER = "What is in the picture?", "An astronaut and a cat."


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  return request.param


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
  return save_folder(tmp_path_factory.mktemp(family) / family, family)


@pytest.fixture(scope="module")
def media(folder, family):
  return QwenVLMedia.from_folder(folder, BUCKETS[family])


def _image_processor(folder):
  return transformers.Qwen2VLImageProcessorPil.from_pretrained(str(folder))


@pytest.mark.parametrize("name, h, w", IMAGES)
def test_image_pixels_equal_transformers(folder, media, name, h, w):
  """One image at its bucket: pixel_values equal bit for bit, grid_thw equal."""
  im = photo(name, h, w)
  b = media.bucket(h, w)
  assert b == BUCKETS[media.family][IMAGES.index((name, h, w))]
  pixels, grid = media.image_pixels(im)
  ref = _image_processor(folder)(images=[im], size=media.pinned_size(b), return_tensors="np")
  assert pixels.dtype == np.float32 and grid == tuple(ref["image_grid_thw"][0])
  np.testing.assert_array_equal(pixels, ref["pixel_values"])
  P = media.settings.image.patch_size
  assert grid == (1, b[0] // P, b[1] // P)
  vs, visual, ve = media.image(im)
  assert (vs, ve) == ("<|vision_start|>", "<|vision_end|>")
  assert isinstance(visual, PatchVisual) and visual.grid_thw == grid
  assert visual.segment == Image(grid[1] // 2, grid[2] // 2)
  np.testing.assert_array_equal(visual.pixels, pixels)


def test_two_images_two_buckets_equal_transformers(folder, media):
  """Two images of different sizes, each at its own bucket; transformers' processor (its own
  budget, unpinned) gives the same sizes, and its concatenated pixel_values equal ours."""
  ims = [photo(n, h, w) for n, h, w in IMAGES[:2]]
  ours = [media.image_pixels(im) for im in ims]
  assert [g for _, g in ours][0] != [g for _, g in ours][1]
  ref = _image_processor(folder)(images=ims, return_tensors="np")
  np.testing.assert_array_equal(np.concatenate([p for p, _ in ours]), ref["pixel_values"])
  assert [list(g) for _, g in ours] == ref["image_grid_thw"].tolist()


def _segments(folder, media, example):
  tok = qwen_vl_tokenizer(folder, media)
  proc = ExampleProcessor(tok, FeatureConfig(spec=None, image_size=8, patch_size=8),
                          media=media)
  segs, ids = proc.segments(example)
  return tok, segs, ids


def _sequence(tok, segs, ids, video=False):
  """Our ids in sequence order, each visual token as its pad token id (as the processor
  writes them; a Qwen3-VL video's frame groups are Image grids of video pads)."""
  image_id, video_id = tok.token_to_id("<|image_pad|>"), tok.token_to_id("<|video_pad|>")
  out, it = [], iter(ids)
  for s in segs:
    if isinstance(s, Text):
      out += [next(it) for _ in range(s.length)]
    elif isinstance(s, Video):
      out += [video_id] * (s.frames * s.gh * s.gw)
    else:
      out += [video_id if video else image_id] * (s.gh * s.gw)
  assert next(it, None) is None
  return out


def _reference_ids(folder, family, media, monkeypatch, content, **kw):
  proc = processor(folder, family, media, monkeypatch)
  text = proc.apply_chat_template([
      {"role": "user", "content": content},
      {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}])
  out = proc(text=[text], return_tensors="np", **kw)
  return out["input_ids"][0].tolist(), out


def test_two_images_prompt_ids_equal_transformers(folder, family, media, monkeypatch):
  ims = [photo(n, h, w) for n, h, w in IMAGES[:2]]
  tok, segs, ids = _segments(folder, media, {
      "id": "two", "images": ims,
      "turns": [{"question": "<image>\n<image>\n" + QUESTION, "answer": ANSWER}]})
  grids = [s for s in segs if isinstance(s, Image)]
  assert len(grids) == 2 and grids[0] != grids[1]
  want, _ = _reference_ids(folder, family, media, monkeypatch,
                           [{"type": "image"}, {"type": "image"},
                            {"type": "text", "text": QUESTION}], images=ims)
  assert _sequence(tok, segs, ids) == want


def _video(n, h=300, w=400):
  return [photo("astronaut" if i % 2 else "chelsea", h, w)[:, ::(-1) ** i].copy()
          for i in range(n)]


def test_video_pixels_equal_transformers(folder, family, media):
  """A video of 4 frames: 2 temporal groups; pixels against transformers' video processor
  where torchvision imports."""
  frames = _video(4)
  b = media.bucket(300, 400, video=True)
  pixels, grid, idx = media.video_pixels(frames)
  P = media.settings.video.patch_size
  assert grid == (2, b[0] // P, b[1] // P) and idx.tolist() == [0, 1, 2, 3]
  # Our patches are the resized, normalised frames in transformers' order.
  v = media.settings.video
  x = v.normalise(np.stack([np.asarray(media._resized(f, v, b)) for f in frames]))
  np.testing.assert_array_equal(patchify(x, P, 2, 2)[0], pixels)
  if not has_torchvision():
    pytest.skip("transformers' video processors need torchvision")
  cls = (transformers.Qwen2VLVideoProcessor if family == "qwen2_5_vl"
         else transformers.Qwen3VLVideoProcessor)
  vp = cls.from_pretrained(str(folder))
  ref = vp(videos=[np.stack(frames)], size=media.pinned_size(b, 4), return_tensors="np")
  assert grid == tuple(ref["video_grid_thw"][0])
  # Pillow vs torchvision's antialiased bicubic: at most one 0-255 level.
  tol = 1.001 / 255 / min(v.std)
  np.testing.assert_allclose(pixels, ref["pixel_values_videos"], rtol=0, atol=tol)
  # Frames already at the bucket are not resized: float32 round-off.
  at = [np.ascontiguousarray(f[:b[0], :b[1]]) for f in _video(4, b[0] + 2, b[1] + 2)]
  at = [np.asarray(media._resized(f, v, b)) for f in at]
  ref = vp(videos=[np.stack(at)], size=media.pinned_size(b, 4), return_tensors="np")
  np.testing.assert_allclose(media.video_pixels(at)[0], ref["pixel_values_videos"], rtol=0,
                             atol=1e-6)


@pytest.mark.parametrize("n", [4, 8])
def test_video_prompt_ids_equal_transformers(folder, family, media, monkeypatch, n):
  """Qwen2.5-VL: one Video grid between the markers; Qwen3-VL: ``<t seconds>`` and an Image
  per group of 2 frames (8 frames are sampled down to 4 at fps 2 of a 24 fps video)."""
  frames = _video(n)
  tok, segs, ids = _segments(folder, media, {
      "id": "v", "images": frames, "is_video": True,
      "turns": [{"question": "Describe the video.", "answer": ANSWER}]})
  b = media.bucket(300, 400, video=True)
  kept = len(media.sample(n))
  assert kept == (n if family == "qwen2_5_vl" else 4)
  want, out = _reference_ids(folder, family, media, monkeypatch,
                             [{"type": "video"}, {"type": "text", "text": "Describe the video."}],
                             videos=[np.stack(frames)], size=media.pinned_size(b, kept))
  assert _sequence(tok, segs, ids, video=True) == want
  visual = [p for p in media.video(frames) if isinstance(p, PatchVisual)]
  if family == "qwen2_5_vl":
    sec = visual[0].second_per_grid
    assert len(visual) == 1 and visual[0].segment == Video(n // 2, b[0] // 28, b[1] // 28,
                                                           time_interval=media.tokens_per_second
                                                           * sec)
    assert visual[0].second_per_grid == pytest.approx(out["second_per_grid_ts"][0])
  else:
    assert [v.segment for v in visual] == [Image(b[0] // 32, b[1] // 32)] * 2
    text = tok.decode(ids, skip_special=False)
    stamps = frame_timestamps(media.sample(n), 24.0, 2)
    assert all(f"<{s:.1f} seconds>" in text for s in stamps)


def test_qwen2_5_vl_and_qwen3_vl_bucket_rules():
  # Rule 1: transformers' own size when pinned to a bucket's area; the nearest area among them.
  assert qwen_vl_bucket(300, 400, [(308, 392), (616, 784)]) == (308, 392)
  assert qwen_vl_bucket(600, 800, [(308, 392), (616, 784)]) == (616, 784)
  assert qwen_vl_bucket(300, 400, [(288, 384), (448, 448)], factor=32) == (288, 384)
  # Rule 2: no bucket is exact: the nearest aspect ratio (the image is stretched to it).
  b = qwen_vl_bucket(300, 451, [(308, 392), (448, 448)])
  assert b == (308, 392) and smart_resize(300, 451, 28, b[0] * b[1], b[0] * b[1]) != b
  assert qwen_vl_bucket(1000, 200, [(308, 392), (448, 224)]) == (448, 224)
  for bad in ([(300, 392)], [], [(28,)], [(0, 28)]):
    with pytest.raises(ValueError, match="bucket"):
      qwen_vl_bucket(300, 400, bad)
  assert qwen_vl_bucket(100, 100, (56, 56)) == (56, 56)          # one bucket as a pair


def test_qwen2_5_vl_and_qwen3_vl_settings_refuse_what_we_do_not_reproduce(tmp_path):
  import json
  for family, edit, match in [
      ("qwen2_5_vl", {"do_sample_frames": True}, "do_sample_frames=true is not supported"),
      ("qwen3_vl", {"patch_size": 14}, "patch_size=14, but .*config.json vision_config says 16"),
      ("qwen3_vl", {"do_resize": False}, "do_resize=false is not supported")]:
    d = save_folder(tmp_path / family / str(len(match)), family)
    f = d / "video_preprocessor_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **edit}))
    with pytest.raises(ValueError, match=match):
      QwenVLSettings.from_folder(d)
  with pytest.raises(ValueError, match="multiple of 32"):
    QwenVLMedia(QwenVLSettings.defaults("qwen3_vl"), [(308, 392)])
