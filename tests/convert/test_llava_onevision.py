"""LLaVA-OneVision as transformers runs it: logits of an image prompt (the base image and the
anyres tiles with a newline after each row) and of a video prompt (frames pooled by bilinear
interpolation, a newline after the video) against ``LlavaOnevisionForConditionalGeneration``'s
full forward (float32, CPU), on a tiny random folder. transformers' processor makes the
``input_ids``, ``pixel_values`` and ``image_sizes``; our segments come from
``gaze_jax.data.llava_onevision``; our slot ``s`` is compared with transformers' position
``layout.position[s]``."""

import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert.families import media_processor, plan_hf
from gaze_jax.convert.hf import load_llava_onevision
from gaze_jax.data.features import Visual
from gaze_jax.data.llava_onevision import LlavaOnevisionMedia
from gaze_jax.gaze import PAD, Image, Text, frames_needed, num_regions
from gaze_jax.model import GazeConfig
from gaze_jax.model.mllm import pack_images
from tests.convert.test_hf_parity import _max_diff, _report
from tests.llava_onevision_folder import G, photo, processor, save_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
DENSE = GazeConfig(attention="dense", num_ctx=0, region_shape=(1, 2))
# K = all regions. Regions one patch row high: a newline row then sees every region above it
# whole, as dense attention does (regions two rows high would hide half a region row from the
# newline in their middle: candidates are whole regions, docs/method.md step 5).
GAZE_ALL = GazeConfig(attention="gaze", num_ctx=0, region_shape=(1, 2), top_k=1.0)
IMAGE_HW = (40, 60)        # transformers chooses 2 x 2 tiles and keeps 6 x 8 of their 8 x 8
FRAMES = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("llava_ov")
  return path, save_folder(path, seed=5)


@pytest.fixture(scope="module")
def models(folder):
  path, _ = folder
  return {name: load_llava_onevision(path, gaze) for name, gaze in
          (("dense", DENSE), ("gaze", GAZE_ALL))}


@nnx.jit
def _forward(model, tokens, layout, images):
  return model(tokens, layout, images)


def _segments(parts, ids, tok, n_media_tokens, media_id):
  """Our segments for transformers' ``ids``: text runs, and the media parts in place of its
  run of media tokens (a text part there is the newline, one media token)."""
  start = ids.index(media_id)
  segs, frames, n = [Text(start)], [], 0
  for p in parts:
    if isinstance(p, Visual):
      segs.append(p.segment)
      frames.extend(p.pixels)
      g = p.segment
      rows = getattr(g, "newline_rows", False)
      n += (g.frames if hasattr(g, "frames") else 1) * g.gh * g.gw + (g.gh if rows else 0)
    else:
      assert tok.convert_tokens_to_ids(p) == media_id
      segs.append(Text(1))
      n += 1
  assert n == n_media_tokens        # our layout holds transformers' count of media tokens
  segs.append(Text(len(ids) - start - n))
  return segs, np.stack(frames)


def _compare(model, ids, segs, frames, want, name):
  """Our logits on ``segs`` (tokens read from transformers' ``ids`` by position) against
  transformers' ``want [n, V]``; returns the max |diff| and our logits by position."""
  regions = sum((s.frames if hasattr(s, "frames") else 1) *
                num_regions(s.gh, s.gw, model.cfg.gaze.region_shape)
                for s in segs if not isinstance(s, Text))
  n = len(ids)
  layout = model.build_layout([segs], seq_len=n + 5, max_regions=regions,
                              max_images=frames_needed(segs))
  kind, pos = np.asarray(layout.kind[0]), np.asarray(layout.position[0])
  valid = kind != PAD
  assert sorted(pos[valid]) == list(range(n))       # every transformers position once
  tokens = np.where(valid, np.asarray(ids)[np.minimum(pos, n - 1)], 0)[None].astype(np.int32)
  got = np.asarray(_forward(model, tokens, layout, pack_images([[frames]], layout)))[0]
  diff = _max_diff(got[valid], want[pos[valid]])
  _report(name, diff)
  out = np.zeros_like(want)
  out[pos[valid]] = got[valid]
  return diff, out


def _hf_logits(hf, inputs):
  with torch.no_grad():
    return hf(**{k: torch.as_tensor(v) for k, v in inputs.items()
                 if k != "batch_num_images"}).logits[0].numpy()


def test_image_prompt_logits_match_transformers(folder, models, monkeypatch):
  """One image (2 x 2 tiles, unpadded to 6 x 8 tokens, a newline after each row, after the
  4 x 4 base image) in a chat prompt."""
  path, hf = folder
  media = LlavaOnevisionMedia.from_folder(path, (2, 2))
  img = photo(*IMAGE_HW)
  assert media.natural_grid(*IMAGE_HW) == (2, 2)
  proc = processor(path, media, monkeypatch)
  text = proc.apply_chat_template([{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
      add_generation_prompt=True)
  inputs = proc(images=[img], text=[text], return_tensors="np")
  ids = inputs["input_ids"][0].tolist()
  image_id = hf.config.image_token_id
  parts = media.image(img)
  assert [p.segment for p in parts] == [Image(G, G), Image(6, 8, newline_rows=True,
                                                           tiles=(2, 2))]
  assert parts[1].text_ids == (image_id,) * 6          # the newline rows hold the image token
  # Our tiles are transformers' pixels (to the bit: the same Pillow steps).
  np.testing.assert_array_equal(np.concatenate([p.pixels for p in parts]),
                                inputs["pixel_values"][0].transpose(0, 2, 3, 1))
  segs, frames = _segments(parts, ids, proc.tokenizer, ids.count(image_id), image_id)
  want = _hf_logits(hf, inputs)
  assert np.abs(want).max() > 1.0
  dense, dense_logits = _compare(models["dense"], ids, segs, frames, want,
                                 "llava-onevision image prompt (dense)")
  assert dense <= ATOL
  gaze, gaze_logits = _compare(models["gaze"], ids, segs, frames, want,
                               "llava-onevision image prompt (gaze, K = all regions)")
  assert gaze <= ATOL
  np.testing.assert_allclose(gaze_logits, dense_logits, atol=1e-5)


def test_video_prompt_logits_match_transformers(folder, models, monkeypatch):
  """Three frames, each pooled from 4 x 4 to 2 x 2 tokens by bilinear interpolation, then one
  newline, in a chat prompt."""
  path, hf = folder
  media = LlavaOnevisionMedia.from_folder(path, (2, 2))
  video = [photo(36, 48, seed=s) for s in range(FRAMES)]
  proc = processor(path, media, monkeypatch)
  text = proc.apply_chat_template([{"role": "user", "content": [
      {"type": "video"}, {"type": "text", "text": "Describe the video."}]}],
      add_generation_prompt=True)
  inputs = proc(videos=[video], text=[text], return_tensors="np")
  ids = inputs["input_ids"][0].tolist()
  video_id = hf.config.video_token_id
  assert ids.count(video_id) == FRAMES * 2 * 2 + 1
  segs, frames = _segments(media.video(video), ids, proc.tokenizer, ids.count(video_id),
                           video_id)
  want = _hf_logits(hf, inputs)
  dense, dense_logits = _compare(models["dense"], ids, segs, frames, want,
                                 "llava-onevision video prompt (dense)")
  assert dense <= ATOL
  gaze, gaze_logits = _compare(models["gaze"], ids, segs, frames, want,
                               "llava-onevision video prompt (gaze, K = all regions)")
  assert gaze <= ATOL
  np.testing.assert_allclose(gaze_logits, dense_logits, atol=1e-5)


def test_newline_and_pooling_load_from_the_folder(folder):
  path, hf = folder
  plan = plan_hf(path, DENSE)
  cfg = plan.model
  assert cfg.newline_token_ids == (hf.config.image_token_id, hf.config.video_token_id)
  assert (cfg.vision.video_pool, cfg.vision.video_pool_mode) == (2, "bilinear")
  assert cfg.vision.pooled_grid(5, 5) == (3, 3)        # ceil, as apply_pooling
  model, unused = load_llava_onevision(path, DENSE, return_unused=True)
  np.testing.assert_array_equal(model.image_newline[...],
                                hf.model.image_newline.detach().numpy())
  assert not any("image_newline" in k for k in unused)
  media = media_processor(path, (2, 2))           # the family's processing, for training runs
  assert isinstance(media, LlavaOnevisionMedia) and media.grid == (2, 2)


def test_a_grid_that_is_not_a_window_of_its_tiles_is_refused(models):
  """A grid smaller than its stitched tiles on both sides would be transformers' anyres_max
  downsampling, which we do not reproduce: named, not computed wrong."""
  model = models["dense"]
  segs = [Text(1), Image(6, 6, newline_rows=True, tiles=(2, 2))]
  layout = model.build_layout([segs], seq_len=60, max_regions=40, max_images=4)
  images = np.zeros((1, 4, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match=r"example 0, frame 0: a 6x6 grid cannot be cut from 2x2 "
                     r"tiles of 4x4 tokens .*anyres_max downsampling"):
    model(np.zeros((1, 60), np.int32), layout, images)
  with pytest.raises(ValueError, match=r"has 1 images/frames but its description has 4 "
                     r"image/frame placeholders \(tiles included\)"):
    pack_images([[np.zeros((32, 32, 3))]], layout)
