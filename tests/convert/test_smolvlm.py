"""SmolVLM / Idefics3 converter: parity with transformers (CPU torch, float32) on tiny random
models saved with ``save_pretrained``, the vision tower's position buckets, and clear errors for
bad folders. Each tiny model is built and saved once per module."""

import json

import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert import families
from gaze_jax.convert.hf import load_safetensors, read_hf_config
from gaze_jax.convert.smolvlm import load_smolvlm, plan_smolvlm
from gaze_jax.gaze import PAD, Image, LayoutSpec, Text
from gaze_jax.model import GazeConfig
from gaze_jax.model.mllm import pack_images
from gaze_jax.model.vision import bucket_position_ids
from tests.convert.test_hf_parity import _copy_with, _max_diff, _report, _save

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
V = 160
IMAGE_TOKEN = V - 1
TEXT_KW = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
# 48 px tiles, patch 8: a 6 x 6 patch grid, pixel-shuffled by 2 into 3 x 3 tokens.
VISION_KW = dict(image_size=48, patch_size=8, hidden_size=32, intermediate_size=56,
                 num_hidden_layers=2, num_attention_heads=4)
TILE, G = 48, 3
# Per example: text lengths and images (each image: how many tiles, the global one included).
# Example 0: one image as 2 x 1 tiles + the global image; example 1: two images.
EXAMPLES = [[4, 3, 5], [3, 1, 2, 1, 4]]     # text, tiles, text, tiles, ... alternating


def _family_config(family, tie=False):
  cls = {"smolvlm": transformers.SmolVLMConfig, "idefics3": transformers.Idefics3Config}[family]
  return cls(text_config=dict(model_type="llama", **TEXT_KW), vision_config=VISION_KW,
             scale_factor=2, image_token_id=IMAGE_TOKEN, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """family -> (model dir, HF model); each model is built and saved once per module."""
  cache = {}

  def get(family):
    if family not in cache:
      cls = {"smolvlm": transformers.SmolVLMForConditionalGeneration,
             "idefics3": transformers.Idefics3ForConditionalGeneration}[family]
      hf = cls(_family_config(family, tie=family == "idefics3"))
      path = tmp_path_factory.mktemp(family)
      cache[family] = (path, _save(hf, path, seed=len(family)))
    return cache[family]

  return get


@nnx.jit
def _forward(model, tokens, layout, images):
  return model(tokens, layout, images)


def _sequences(rng):
  """Per example: segments (tiles as ``Image(G, G)``), token ids by position (the image token
  at visual positions) and tiles ``[T, 48, 48, 3]``."""
  out = []
  for spec in EXAMPLES:
    segs, ids, tiles = [], [], []
    for k, n in enumerate(spec):
      if k % 2 == 0:
        segs.append(Text(n))
        ids += list(rng.integers(0, V - 1, size=n))
      else:
        segs += [Image(G, G)] * n
        ids += [IMAGE_TOKEN] * (n * G * G)
        tiles += list(rng.normal(size=(n, TILE, TILE, 3)).astype(np.float32))
    out.append((segs, np.asarray(ids), np.stack(tiles)))
  return out


def _hf_logits(hf, ids, tiles):
  with torch.no_grad():
    return hf(input_ids=torch.as_tensor(ids)[None],
              pixel_values=torch.as_tensor(tiles.transpose(0, 3, 1, 2))[None]).logits[0].numpy()


@pytest.mark.parametrize("family,gaze", [
    ("smolvlm", GazeConfig(attention="dense", num_ctx=0, region_shape=(3, 3))),
    # 2 x 2 regions on a 3 x 3 tile grid (padded): 4 regions per tile, K = all 12 of them.
    ("smolvlm", GazeConfig(attention="gaze", num_ctx=0, region_shape=(2, 2), top_k=12)),
    ("idefics3", GazeConfig(attention="dense", num_ctx=0, region_shape=(3, 3))),
], ids=["smolvlm_dense", "smolvlm_gaze_all_regions", "idefics3_dense_tied"])
def test_logits_match_transformers(saved, family, gaze):
  """Our MLLM on tiled images vs transformers' ``...ForConditionalGeneration``; our slot ``s``
  is compared with HF's position ``layout.position[s]``."""
  path, hf = saved(family)
  model, unused = load_smolvlm(path, gaze, return_unused=True)
  cfg = model.cfg
  assert (cfg.projector, cfg.scale_factor, cfg.token_pixels) == ("pixel_shuffle", 2, 16)
  assert cfg.vision.pos_resize == "buckets" and cfg.decoder.tie_embeddings == (family == "idefics3")
  assert unused == []
  seqs = _sequences(np.random.default_rng(0))
  layout = model.build_layout([s for s, _, _ in seqs], seq_len=80, max_regions=12, max_images=3)
  kind, pos = np.asarray(layout.kind), np.asarray(layout.position)
  tokens = np.zeros(kind.shape, np.int32)
  for i, (_, ids, _) in enumerate(seqs):
    tokens[i] = np.where(kind[i] == PAD, 0, ids[np.minimum(pos[i], len(ids) - 1)])
  images = pack_images([list(t) for _, _, t in seqs], layout)
  got = np.asarray(_forward(model, tokens, layout, images))
  diffs = []
  for i, (_, ids, tiles) in enumerate(seqs):
    valid = kind[i] != PAD
    assert sorted(pos[i][valid]) == list(range(len(ids)))   # every HF position compared once
    want = _hf_logits(hf, ids, tiles)
    diffs.append(_max_diff(got[i][valid], want[pos[i][valid]]))
  diff = max(diffs)
  _report(f"{family} logits ({gaze.attention}, region {gaze.region_shape})", diff)
  assert np.abs(want).max() > 1.0
  assert diff <= ATOL


def test_image_features_match_transformers(saved):
  """Vision tower (position buckets, post-LayerNorm) + pixel shuffle + projection, per tile."""
  path, hf = saved("smolvlm")
  model = load_smolvlm(path)
  tiles = np.random.default_rng(1).normal(size=(3, TILE, TILE, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf.model.get_image_features(
        torch.as_tensor(tiles.transpose(0, 3, 1, 2))[None]).pooler_output[0].numpy()
  feats, _ = model.image_features(tiles[None])                         # [1, 3, G*G, E]
  diff = _max_diff(np.asarray(feats[0]).reshape(-1, feats.shape[-1]), want)
  _report("smolvlm image features", diff)
  assert diff <= ATOL


def test_bucket_position_ids_match_transformers():
  """The position entry of every patch as SmolVLM's embeddings index it (read through a position
  table holding each entry's index), for native grids 1..64 at several sizes. We bucket
  exactly; transformers' float32 may give the bucket below where a coordinate ``i / gh`` lies
  exactly on a boundary ``k / grid``: only there may the two differ, by one bucket, and never
  at the native size of the released checkpoints' grids (26, 27, 32)."""
  from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings
  on_boundary = 0
  for n in range(1, 65):
    emb = SmolVLMVisionEmbeddings(transformers.SmolVLMVisionConfig(
        hidden_size=1, image_size=n, patch_size=1, num_channels=1))
    with torch.no_grad():
      emb.patch_embedding.weight.zero_()
      emb.patch_embedding.bias.zero_()
      emb.position_embedding.weight.copy_(torch.arange(n * n, dtype=torch.float32)[:, None])
    for gh, gw in {(n, n), (max(1, n // 2), n), (n, n + 3), (max(1, n - 5), max(1, n // 3))}:
      with torch.no_grad():
        want = emb(torch.zeros(1, 1, gh, gw), torch.ones(1, gh, gw, dtype=torch.bool))
      want = want[0, :, 0].numpy().astype(np.int64).reshape(gh, gw)
      got = bucket_position_ids(n, gh, gw).reshape(gh, gw)
      for axis, size in ((0, gh), (1, gw)):
        g_, w_ = (got // n, want // n) if axis == 0 else (got % n, want % n)
        diff = g_ - w_
        index = np.indices((gh, gw))[axis]
        assert set(np.unique(diff)) <= {0, 1}, (n, gh, gw)
        assert ((index * n % size)[diff != 0] == 0).all(), (n, gh, gw)
        on_boundary += int(diff.any())
      if n in (26, 27, 32) and (gh, gw) == (n, n):
        np.testing.assert_array_equal(got.reshape(-1), np.arange(n * n))
        np.testing.assert_array_equal(want.reshape(-1), np.arange(n * n))
  assert on_boundary          # the float32 rounding does show on this machine


def test_registered_for_both_model_types(saved):
  path, _ = saved("smolvlm")
  assert families.PLANS["smolvlm"] is families.PLANS["idefics3"] is plan_smolvlm
  plan = families.plan_hf(path, GazeConfig(attention="gaze", num_ctx=2, region_shape=(3, 3)))
  assert plan.model.projector == "pixel_shuffle" and plan.weights.fresh == ("ctx_embed",)
  assert plan.model.vision.video_pool == 1 and plan.model.token_grid == G


# ------------------------------------------------------------------ clear errors

def _bad_config(saved, tmp_path, name, edit):
  path, _ = saved("smolvlm")
  return _copy_with(path, tmp_path / name, edit_config=edit)


@pytest.mark.parametrize("name,edit,match", [
    ("model_type", lambda c: c.update(model_type="idefics2"),
     r"config.json: model_type='idefics2', expected one of 'smolvlm', 'idefics3'"),
    ("vision_type", lambda c: c["vision_config"].update(model_type="clip_vision_model"),
     r"config.json: vision_config.model_type='clip_vision_model' is not supported"),
    ("act", lambda c: c["vision_config"].update(hidden_act="gelu"),
     r"config.json: vision_config.hidden_act='gelu' is not supported"),
    ("image_size", lambda c: c["vision_config"].update(image_size=[48, 64]),
     r"config.json: vision_config.image_size=\[48, 64\] is not supported"),
    ("scale", lambda c: c.update(scale_factor=4),
     r"config.json: scale_factor=4 does not divide the vision tower's 6x6 patch grid"),
    ("text_act", lambda c: c["text_config"].update(hidden_act="gelu"),
     r"config.json: text_config: llama config: hidden_act='gelu' is not supported"),
    ("text_type", lambda c: c["text_config"].update(model_type="mistral"),
     r"config.json: text_config: model_type='mistral' is not a supported decoder"),
])
def test_unsupported_config_fields_name_file_and_key(saved, tmp_path, name, edit, match):
  with pytest.raises(ValueError, match=match):
    plan_smolvlm(_bad_config(saved, tmp_path, name, edit))


def test_missing_or_misshaped_tensor_is_named(saved, tmp_path):
  path, _ = saved("smolvlm")
  key = "model.connector.modality_projection.proj.weight"

  def missing(t):
    del t["model.vision_model.encoder.layers.1.mlp.fc2.bias"]

  def shape(t):
    t[key] = t[key][:, :-1]

  with pytest.raises(ValueError, match=r"no tensor 'model.vision_model.encoder.layers.1.mlp.fc2"
                     r".bias' \(needed for vision.blocks.1.fc2.bias\)"):
    load_smolvlm(_copy_with(path, tmp_path / "missing", missing))
  with pytest.raises(ValueError, match=rf"{key} has shape \(127, 64\) after conversion, but "
                     r"projector.proj.kernel is \(128, 64\)"):
    load_smolvlm(_copy_with(path, tmp_path / "shape", shape))
  with pytest.raises(ValueError, match="no pixel-shuffle connector in the checkpoint"):
    load_smolvlm(_copy_with(path, tmp_path / "no_connector", lambda t: t.pop(key)))
  assert read_hf_config(path)["model_type"] == "smolvlm"


# ------------------------------------------------------------------ one grid definition

def test_token_pixels_drive_every_visual_grid():
  """``MLLMConfig.token_pixels`` (patch x scale factor) is the grid everywhere: the training
  config and features, the memory plan's regions and the FLOPs' projector term."""
  import types
  from gaze_jax.gaze.accounting import train_flops
  from gaze_jax.model.config import DecoderConfig, MLLMConfig, VisionConfig
  from gaze_jax.model.memory import _visual_shape
  from gaze_jax.train.config import mllm_config, model_fields
  from gaze_jax.train.data import feature_config
  dec = DecoderConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2)
  vis = VisionConfig(image_size=48, patch_size=8, hidden_size=32, intermediate_size=56,
                     num_layers=2, num_heads=4, video_pool=1, pos_resize="buckets")
  gaze = GazeConfig(attention="gaze", num_ctx=0, region_shape=(3, 3))
  shuffle = MLLMConfig(dec, vis, gaze, projector="pixel_shuffle", scale_factor=2)
  assert (shuffle.token_pixels, shuffle.token_grid) == (16, 3)
  assert mllm_config(model_fields(shuffle)) == shuffle       # a training config's model
  spec = LayoutSpec(seq_len=64, max_regions=4, max_images=2, region_shape=(3, 3), num_ctx=0)
  run = types.SimpleNamespace(data=types.SimpleNamespace(skip_too_long=False), init="")
  assert feature_config(run, shuffle, spec).grid == 3
  assert _visual_shape(shuffle, 2, 0) == (2, 2, 18)         # 2 tiles of one 3x3 region each
  # The projector's FLOPs: Ev*E per patch for pixel_shuffle (s^2 Ev x E per s^2 patches),
  # Ev*E + E*E for mlp2x_gelu.
  mlp = MLLMConfig(dec, vis, gaze)
  kw = dict(batch=2, seq_len=64, frames=3, patches=36)
  assert train_flops(mlp, **kw) - train_flops(shuffle, **kw) == 3 * 2 * 2 * 3 * 36 * 64 * 64
  with pytest.raises(ValueError, match="scale_factor=2 needs projector='pixel_shuffle'"):
    MLLMConfig(dec, vis, projector="mlp2x_gelu", scale_factor=2)
  with pytest.raises(ValueError, match="scale_factor=4 must divide the vision tower's native "
                     "grid 6"):
    MLLMConfig(dec, vis, projector="pixel_shuffle", scale_factor=4)
  with pytest.raises(ValueError, match="projector='resampler' is not one of"):
    MLLMConfig(dec, vis, projector="resampler")
  with pytest.raises(ValueError, match="pos_resize='nearest' is not one of"):
    VisionConfig(pos_resize="nearest")


def test_export_round_trip(saved, tmp_path):
  """The weight map inverts (``convert.export``): our loaded SmolVLM written back is the source
  checkpoint, tensor for tensor, plus our context tokens, which ``plan_hf`` reads back."""
  from gaze_jax.convert.export import export_hf
  from gaze_jax.convert.hf import build_planned
  from gaze_jax.convert.mapping import param_paths
  path, _ = saved("smolvlm")
  gaze = GazeConfig(attention="gaze", num_ctx=2, region_shape=(3, 3), top_k=1)
  plan = families.plan_hf(path, gaze)
  params = {k: np.asarray(v.get_value()) for k, v in param_paths(build_planned(plan)).items()}
  export_hf(params, plan, tmp_path / "out", gaze=gaze)
  src, out = load_safetensors(path), load_safetensors(tmp_path / "out")
  assert sorted(out) == sorted(list(src) + ["gaze.ctx_embed"])
  for k in src:
    np.testing.assert_array_equal(out[k], src[k], err_msg=k)
  back = build_planned(families.plan_hf(tmp_path / "out", gaze))
  np.testing.assert_array_equal(np.asarray(back.ctx_embed[...]), params["ctx_embed"])
