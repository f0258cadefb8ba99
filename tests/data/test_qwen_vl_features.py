"""Qwen2.5-VL / Qwen3-VL examples -> model features (``ExampleProcessor`` with ``QwenVLMedia``,
the run's wiring in ``gaze_jax.train.data`` and ``families.MEDIA``) against transformers'
processors on tiny folders (``tests/data/qwen_vl_folder.py``): ``patches`` (unpadded rows) equal
``pixel_values`` / ``pixel_values_videos``, ``patch_grids`` equal ``image_grid_thw`` /
``video_grid_thw``, ``second_per_grid`` equals ``second_per_grid_ts``, and the token ids at the
text slots equal the processor's ``input_ids`` without its image / video pad tokens (as many
PATCH slots as pads). The folder's own tokenizer (``load_model_tokenizer``) writes each vision
marker once."""

import types

import numpy as np
import pytest

from gaze_jax.convert.families import media_processor
from gaze_jax.data.features import (ExampleProcessor, FeatureConfig, PatchPixels,
                                    batch_to_model_inputs)
from gaze_jax.data.qwen_vl import QwenVLMedia
from gaze_jax.data.tokenizers import load_model_tokenizer
from gaze_jax.gaze import PATCH, TEXT, LayoutSpec, Video
from gaze_jax.train.sections import DataSection
from tests.data.qwen_vl_folder import has_torchvision, photo, processor, save_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

BUCKETS = {"qwen2_5_vl": [(308, 392), (336, 252), (448, 448)],
           "qwen3_vl": [(288, 384), (320, 256), (448, 448)]}
# Sized so that transformers' own (unpinned) smart_resize gives the first two buckets.
IMAGES = [("astronaut", 300, 400), ("chelsea", 330, 250)]
QUESTION, ANSWER = "What is in the picture?", "An astronaut and a cat."
SPEC = LayoutSpec(seq_len=1024, max_regions=256, max_images=4, region_shape=(2, 2), num_ctx=1)


def _folder(tmp_path_factory, family):
  return save_folder(tmp_path_factory.mktemp(family) / family, family)


@pytest.fixture(scope="module")
def qwen2_5_vl_folder(tmp_path_factory):
  return _folder(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen3_vl_folder(tmp_path_factory):
  return _folder(tmp_path_factory, "qwen3_vl")


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def family(request):
  return request.param


@pytest.fixture
def folder(family, request):
  return request.getfixturevalue(f"{family}_folder")


def _run_config(folder, family, **data):
  """What the run's data processing reads of a ``RunConfig`` (the folder holds the processor's
  files, not a model: no model is resolved)."""
  data = DataSection(**{"tokenizer": "model", "buckets": tuple(BUCKETS[family]),
                        "seq_len": 1024, "max_regions": 256, "max_images": 4, **data})
  return types.SimpleNamespace(init=f"hf:{folder}", data=data)


def _processor(folder, family, **data):
  """The run's ExampleProcessor (``gaze_jax.train.data.example_processor``) for the folder."""
  from gaze_jax.train.data import example_processor

  tok = load_model_tokenizer(folder)
  model = types.SimpleNamespace(decoder=types.SimpleNamespace(vocab_size=tok.vocab_size))
  return tok, example_processor(_run_config(folder, family, **data), tok, model, SPEC)


def _reference(folder, family, media, monkeypatch, content, **kw):
  proc = processor(folder, family, media, monkeypatch)
  text = proc.apply_chat_template([
      {"role": "user", "content": content},
      {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}])
  return proc(text=[text], return_tensors="np", **kw)


def _check_ids(tok, feats, input_ids):
  """Our ids at the TEXT slots (slot order is position order for text) are the processor's
  input_ids without the visual pads, and there are as many PATCH slots as pads."""
  pads = {tok.token_to_id("<|image_pad|>"), tok.token_to_id("<|video_pad|>")}
  ids = [int(i) for i in input_ids]
  kind = feats["kind"]
  assert feats["tokens"][kind == TEXT].tolist() == [i for i in ids if i not in pads]
  assert int((kind == PATCH).sum()) == sum(i in pads for i in ids)
  starts = [i for i in ids if i == tok.token_to_id("<|vision_start|>")]
  assert feats["tokens"][kind == TEXT].tolist().count(starts[0]) == len(starts)


def _check_patches(proc, feats, pixel_values, grids, atol=0.0):
  n = len(pixel_values)
  assert feats["patches"].shape == (proc.max_patches, proc.media.patch_dim)
  assert feats["patches"].dtype == np.float32 and "images" not in feats
  np.testing.assert_allclose(feats["patches"][:n], pixel_values, rtol=0, atol=atol)
  assert not feats["patches"][n:].any()
  g = feats["patch_grids"]
  assert g.shape == (SPEC.max_images, 3) and g.dtype == np.int32
  assert g[:len(grids)].tolist() == [list(map(int, r)) for r in grids]
  assert not g[len(grids):].any()


@pytest.mark.parametrize("count", [1, 2])
def test_qwen2_5_vl_and_qwen3_vl_image_features_equal_transformers(folder, family, monkeypatch,
                                                                   count):
  """One image, and two images at two different buckets."""
  tok, proc = _processor(folder, family)
  assert isinstance(proc.media, QwenVLMedia) and proc.patch_media
  # Every frame at the largest bucket by default (max_images frames).
  P = proc.media.settings.image.patch_size
  assert proc.max_patches == SPEC.max_images * 448 * 448 // (P * P)
  ims = [photo(n, h, w) for n, h, w in IMAGES[:count]]
  feats = proc.features({"id": "im", "images": ims,
                         "turns": [{"question": "<image>\n" * count + QUESTION,
                                    "answer": ANSWER}]})
  ref = _reference(folder, family, proc.media, monkeypatch,
                   [{"type": "image"}] * count + [{"type": "text", "text": QUESTION}],
                   images=ims)
  grids = ref["image_grid_thw"]
  if count == 2:
    assert grids[0].tolist() != grids[1].tolist()
  _check_patches(proc, feats, ref["pixel_values"], grids)
  assert not feats["second_per_grid"].any()
  _check_ids(tok, feats, ref["input_ids"][0])
  # The layout's frames are the segments' grids of merged tokens.
  m = proc.media.settings.image.merge_size
  assert feats["frame_grid"][:count].tolist() == (grids[:, 1:] // m).tolist()
  assert feats["frame_media"][:count].tolist() == list(range(count))


def test_qwen2_5_vl_and_qwen3_vl_video_features_equal_transformers(folder, family, monkeypatch):
  """A video of 8 frames: Qwen2.5-VL keeps all (one Video of 4 temporal groups), Qwen3-VL
  samples 4 of them at 2 fps of a 24 fps video (two groups, each an Image after its
  timestamp)."""
  tok, proc = _processor(folder, family)
  frames = [photo("astronaut" if i % 2 else "chelsea", 300, 400)[:, ::(-1) ** i].copy()
            for i in range(8)]
  feats = proc.features({"id": "v", "images": frames, "is_video": True,
                         "turns": [{"question": "Describe the video.", "answer": ANSWER}]})
  media = proc.media
  b = media.bucket(300, 400, video=True)
  kept = len(media.sample(8))
  ref = _reference(folder, family, media, monkeypatch,
                   [{"type": "video"}, {"type": "text", "text": "Describe the video."}],
                   videos=[np.stack(frames)], size=media.pinned_size(b, kept))
  grid = ref["video_grid_thw"]
  t = int(grid[0, 0])
  assert t == kept // 2
  # Qwen3-VL's model splits video_grid_thw into one (1, h, w) per temporal group.
  grids = grid if family == "qwen2_5_vl" else np.repeat(grid, t, axis=0) * [[0, 1, 1]] + [1, 0, 0]
  # Pillow vs torchvision's resize (where torchvision imports): at most one 0-255 level.
  atol = 1.001 / 255 / min(media.settings.video.std) if has_torchvision() else 0.0
  _check_patches(proc, feats, ref["pixel_values_videos"], grids, atol)
  _check_ids(tok, feats, ref["input_ids"][0])
  sec = feats["second_per_grid"]
  if family == "qwen2_5_vl":
    assert sec[0] == pytest.approx(ref["second_per_grid_ts"][0]) and not sec[1:].any()
    segs, _ = proc.segments({"id": "v", "images": frames, "is_video": True,
                             "turns": [{"question": "Describe the video.", "answer": ANSWER}]})
    video = [s for s in segs if isinstance(s, Video)]
    # The M-RoPE time step: vision_config.tokens_per_second (2) * second_per_grid_ts.
    assert video[0].time_interval == pytest.approx(2 * ref["second_per_grid_ts"][0])
  else:
    assert not sec.any()
  assert feats["frame_valid"].sum() == t


def test_qwen2_5_vl_and_qwen3_vl_features_batch_through_the_pipeline(folder, family):
  """Examples of one image, two images and a video stack into one batch (grain); the batch
  unpacks into PatchPixels for the model."""
  from gaze_jax.data import pipeline

  tok, proc = _processor(folder, family)
  ims = [photo(n, h, w) for n, h, w in IMAGES]
  frames = [photo("chelsea", 300, 400)] * 4
  examples = [
      {"id": "one", "images": ims[:1], "turns": [{"question": QUESTION, "answer": ANSWER}]},
      {"id": "two", "images": ims, "turns": [{"question": QUESTION, "answer": ANSWER}]},
      {"id": "video", "images": frames, "is_video": True,
       "turns": [{"question": "Describe the video.", "answer": ANSWER}]}]
  ds = pipeline.make_dataset(examples, proc, batch_size=3, shuffle=False, num_threads=1)
  batch = next(iter(ds))
  want = [proc.features(e) for e in examples]
  for k in ("patches", "patch_grids", "second_per_grid", "tokens"):
    np.testing.assert_array_equal(batch[k], np.stack([w[k] for w in want]))
  inputs = batch_to_model_inputs(batch, SPEC)
  assert isinstance(inputs.images, PatchPixels)
  assert inputs.images.patches.shape == (3, proc.max_patches, proc.media.patch_dim)
  assert inputs.images.grids.shape == (3, SPEC.max_images, 3)
  assert inputs.images.second_per_grid.shape == (3, SPEC.max_images)
  with pytest.raises(ValueError, match=r"missing \['patch_grids'\]"):
    batch_to_model_inputs({k: v for k, v in batch.items() if k != "patch_grids"}, SPEC)
  # Grids sum to the patch rows they index.
  g = batch["patch_grids"]
  rows = (g[..., 0] * g[..., 1] * g[..., 2]).sum(-1)
  for b in range(3):
    assert not batch["patches"][b, rows[b]:].any() and batch["patches"][b, :rows[b]].any()


def test_qwen2_5_vl_and_qwen3_vl_max_patches_limits_an_example(folder, family):
  """data.max_patches below an example's patch rows: ExampleTooLong naming the limit."""
  from gaze_jax.data.features import ExampleTooLong

  tok, proc = _processor(folder, family, max_patches=100)
  assert proc.max_patches == 100
  ex = {"id": "big", "images": [photo("astronaut", 300, 400)],
        "turns": [{"question": QUESTION, "answer": ANSWER}]}
  with pytest.raises(ExampleTooLong, match="patches") as e:
    proc.features(ex)
  assert e.value.needs["patches"][1] == 100


def test_qwen2_5_vl_and_qwen3_vl_folder_without_buckets_is_refused(folder, family):
  with pytest.raises(ValueError, match=r"config\.data\.buckets"):
    _processor(folder, family, buckets=())
  with pytest.raises(ValueError, match=r"config\.data\.buckets"):
    media_processor(folder)
  with pytest.raises(ValueError, match=r"config\.data\.image_grid"):
    media_processor(folder, (2, 2), buckets=BUCKETS[family])
  with pytest.raises(ValueError, match=r"config\.data\.buckets.*multiple of"):
    media_processor(folder, buckets=[(300, 400)])
  media = media_processor(folder, buckets=[[308 if family == "qwen2_5_vl" else 288, 448]],
                          video_fps=30.0)
  assert isinstance(media, QwenVLMedia) and media.video_fps == 30.0


def test_qwen2_5_vl_and_qwen3_vl_tokenizer_writes_each_marker_once(folder, family):
  """The folder's tokenizer replaces the whole wrapper (item 2 of issue 29)."""
  tok = load_model_tokenizer(folder)
  assert tok.template.image_token == "<|vision_start|><|image_pad|><|vision_end|>"
  assert tok.template.video_token == "<|vision_start|><|video_pad|><|vision_end|>"


def test_buckets_are_refused_for_another_family(tmp_path):
  import json

  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match=r"config\.data\.buckets.*Qwen-VL"):
    media_processor(tmp_path, buckets=[(308, 392)])
  assert media_processor(tmp_path) is None


def test_square_features_keep_images():
  """The square path is unchanged: images, no patch features."""
  from gaze_jax.data.tokenizers import ByteTokenizer

  spec = LayoutSpec(seq_len=64, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=0)
  proc = ExampleProcessor(ByteTokenizer(), FeatureConfig(spec=spec, image_size=16,
                                                         patch_size=8))
  assert not proc.patch_media
  f = proc.features({"id": "s", "images": [np.zeros((20, 20, 3), np.uint8)],
                     "turns": [{"question": "q", "answer": "a"}]})
  assert f["images"].shape == (1, 16, 16, 3) and "patches" not in f


def _rope_model(family, tok):
  """A tiny transformers model of ``family`` for ``get_rope_index`` (our folder's marker ids,
  vision_config.tokens_per_second 2 as the folder's config.json)."""
  import torch

  torch.manual_seed(0)
  ids = {k: tok.token_to_id(t) for k, t in (
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
  text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [2, 3, 3]})
  vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                spatial_merge_size=2, temporal_patch_size=2)
  if family == "qwen2_5_vl":
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        vision, patch_size=14, tokens_per_second=2, window_size=112,
        fullatt_block_indexes=[0]), **ids)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  cfg = transformers.Qwen3VLConfig(text_config=dict(text, head_dim=16), vision_config=dict(
      vision, patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0]), **ids)
  return transformers.Qwen3VLForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("what", ["two_images", "video"])
def test_qwen2_5_vl_and_qwen3_vl_mrope_positions_equal_get_rope_index(folder, family,
                                                                      monkeypatch, what):
  """With ``LayoutSpec(mrope=True)`` and no context tokens, the features' M-RoPE triples in
  sequence order are transformers' ``get_rope_index`` of the processor's input_ids (a
  Qwen2.5-VL video's time step from tokens_per_second * second_per_grid_ts)."""
  import dataclasses

  import torch

  from gaze_jax.data.features import ExampleProcessor as Proc
  from gaze_jax.gaze import PAD

  spec = dataclasses.replace(SPEC, num_ctx=0, mrope=True)
  tok, run_proc = _processor(folder, family)
  proc = Proc(tok, dataclasses.replace(run_proc.cfg, spec=spec), media=run_proc.media)
  media = proc.media
  if what == "video":
    frames = [photo("astronaut" if i % 2 else "chelsea", 300, 400) for i in range(8)]
    ex = {"id": "v", "images": frames, "is_video": True,
          "turns": [{"question": "Describe the video.", "answer": ANSWER}]}
    b = media.bucket(300, 400, video=True)
    ref = _reference(folder, family, media, monkeypatch,
                     [{"type": "video"}, {"type": "text", "text": "Describe the video."}],
                     videos=[np.stack(frames)], size=media.pinned_size(b, len(media.sample(8))))
  else:
    ims = [photo(n, h, w) for n, h, w in IMAGES]
    ex = {"id": "two", "images": ims,
          "turns": [{"question": "<image>\n<image>\n" + QUESTION, "answer": ANSWER}]}
    ref = _reference(folder, family, media, monkeypatch,
                     [{"type": "image"}] * 2 + [{"type": "text", "text": QUESTION}], images=ims)
  feats = proc.features(ex)
  ids = torch.tensor(ref["input_ids"])
  types = torch.zeros_like(ids)
  types[ids == tok.token_to_id("<|image_pad|>")] = 1
  types[ids == tok.token_to_id("<|video_pad|>")] = 2
  kw = {k: torch.tensor(np.asarray(ref[k])) for k in ("image_grid_thw", "video_grid_thw",
                                                       "second_per_grid_ts") if k in ref}
  if family == "qwen3_vl":
    kw.pop("second_per_grid_ts", None)
  want, _ = _rope_model(family, tok).model.get_rope_index(ids, types, **kw)
  kind, pos = feats["kind"], feats["position"]
  slots = np.flatnonzero(kind != PAD)
  order = slots[np.argsort(pos[slots], kind="stable")]
  np.testing.assert_array_equal(feats["rope_position"][order], want[:, 0].numpy().T)
