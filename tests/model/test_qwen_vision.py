"""Qwen2.5-VL and Qwen3-VL vision towers (gaze_jax.model.qwen_vision) against transformers'
``Qwen2_5_VisionTransformerPretrainedModel`` / ``Qwen3VLVisionModel`` on tiny random configs,
float32 on CPU: one image, two images of different grids, a 4-frame video (t = 2)."""

import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert.qwen_vl import (load_qwen_vision, qwen_vision_config, qwen_vision_rules,
                                      vision_prefix)
from gaze_jax.model.qwen_vision import QwenVisionTower, merge_block_coords, window_index
from gaze_jax.model.resample import bilinear_matrix

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# Tolerance on max |ours - transformers| / max |transformers|.
RTOL = 1e-4

# Tiny towers: hidden 32, 2 heads (head_dim 16), 4 blocks.
QWEN2_5 = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
               patch_size=14, window_size=56, fullatt_block_indexes=[2])   # 2x2-token windows
QWEN3 = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
             patch_size=16, num_position_embeddings=36, deepstack_visual_indexes=[0, 2])

ONE = ((1, 6, 10),)                       # merged 3x5: windows cut short at the border
TWO = ((1, 4, 8), (1, 10, 6))
VIDEO = ((2, 6, 8),)                      # 4 frames, temporal_patch_size 2


def _torch_tower(family: str):
  """transformers' vision model with random weights (norms and biases too, so that every
  parameter matters), float32, eager attention."""
  import transformers as tf
  torch.manual_seed(0)
  if family == "qwen2_5_vl":
    cfg = tf.Qwen2_5_VLVisionConfig(**QWEN2_5)
    cls = tf.Qwen2_5_VisionTransformerPretrainedModel
  else:
    cfg = tf.Qwen3VLVisionConfig(**QWEN3)
    cls = tf.Qwen3VLVisionModel
  cfg._attn_implementation = "eager"
  model = cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn_like(p)
      if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      elif name.endswith("pos_embed.weight"):
        p.copy_(noise)
      elif p.ndim > 1:                      # fan-in scaling keeps activations O(1)
        p.copy_(noise / p[0].numel() ** 0.5)
      else:
        p.copy_(0.1 * noise)
  return model, cfg


def _ours(family: str, model, cfg):
  ours_cfg = qwen_vision_config({"model_type": family, "vision_config": cfg.to_dict()})
  tower = QwenVisionTower(ours_cfg, rngs=nnx.Rngs(0))
  load_qwen_vision(tower, model.state_dict(), prefix="")
  return tower


@nnx.jit(static_argnames=("grid",))
def _run(tower, pixels, grid):
  return tower(pixels, grid)


def _compare(family: str, grid) -> list[float]:
  model, cfg = _torch_tower(family)
  tower = _ours(family, model, cfg)
  n = sum(t * h * w for t, h, w in grid)
  dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  pixels = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
  got = _run(tower, pixels, grid)
  if family == "qwen2_5_vl":
    pairs = [(got, ref.pooler_output)]
  else:
    assert len(got[1]) == len(ref.deepstack_features) == len(QWEN3["deepstack_visual_indexes"])
    pairs = [(got[0], ref.pooler_output)] + list(zip(got[1], ref.deepstack_features))
  errs = []
  for ours, theirs in pairs:
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape == (n // 4, cfg.out_hidden_size)
    errs.append(float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs))))
  print(f"{family} {grid}: max|diff| / max|ref| = {['%.2e' % e for e in errs]}")
  assert max(errs) <= RTOL, errs
  return errs


@pytest.mark.parametrize("grid", [ONE, TWO, VIDEO], ids=["one_image", "two_images", "video"])
def test_qwen2_5_vl_vision_parity(grid):
  _compare("qwen2_5_vl", grid)


@pytest.mark.parametrize("grid", [ONE, TWO, VIDEO], ids=["one_image", "two_images", "video"])
def test_qwen3_vl_vision_parity(grid):
  _compare("qwen3_vl", grid)


def test_qwen2_5_vl_window_index_matches_transformers():
  """Our static window order equals transformers' get_vision_window_index, windows included."""
  from transformers.vision_utils import get_vision_window_index
  grid = ((1, 6, 10), (2, 8, 8), (1, 2, 14))
  order, segs = window_index(grid, 2, 2)
  ref_order, cu = get_vision_window_index(torch.tensor(grid), spatial_merge_size=2,
                                          window_size=56, patch_size=14)
  np.testing.assert_array_equal(order, ref_order.numpy())
  bounds = np.flatnonzero(np.diff(np.repeat(segs, 4))) + 1
  np.testing.assert_array_equal(np.concatenate([[0], bounds, [len(segs) * 4]]), cu.numpy())


def test_qwen3_vl_position_resampling_matches_transformers():
  """Bilinear align_corners=True weights and merge-block coordinates equal transformers'."""
  import torch.nn.functional as F
  from transformers.vision_utils import get_vision_position_ids
  grid = ((2, 4, 6), (1, 10, 2))
  np.testing.assert_array_equal(merge_block_coords(grid, 2),
                                get_vision_position_ids(torch.tensor(grid), 2).numpy())
  x = torch.randn(1, 1, 6, 1)
  ref = F.interpolate(x, size=(10, 1), mode="bilinear", align_corners=True)[0, 0, :, 0]
  np.testing.assert_allclose(bilinear_matrix(6, 10, align_corners=True) @ x[0, 0, :, 0].numpy(),
                             ref.numpy(), atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen2_5_vl_qwen3_vl_saved_folder_prefix(family, tmp_path):
  """The tower's keys in a save_pretrained folder: ``visual.`` (Qwen2.5-VL's legacy names) or
  ``model.visual.`` (Qwen3-VL); every one of them is covered by our rules."""
  import transformers as tf
  from safetensors import safe_open
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, vocab_size=128,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                               "mrope_section": [2, 3, 3]})
  torch.manual_seed(0)
  if family == "qwen2_5_vl":
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=QWEN2_5)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
  else:
    cfg = tf.Qwen3VLConfig(text_config=text, vision_config=QWEN3)
    model = tf.Qwen3VLForConditionalGeneration(cfg)
  model.save_pretrained(tmp_path)
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  prefix = vision_prefix(tensors)
  assert prefix == {"qwen2_5_vl": "visual.", "qwen3_vl": "model.visual."}[family]
  ours_cfg = qwen_vision_config(cfg.to_dict())
  tower = QwenVisionTower(ours_cfg, rngs=nnx.Rngs(1))
  load_qwen_vision(tower, tensors)
  want = model.model.visual.state_dict()
  got = nnx.state(tower, nnx.Param)
  np.testing.assert_array_equal(np.asarray(got["blocks"][1]["attn"]["qkv"]["kernel"][...]),
                                want["blocks.1.attn.qkv.weight"].numpy().T)
  assert len(qwen_vision_rules(ours_cfg, prefix)) > 0


# The ``vision_config`` of the released checkpoints' config.json (Qwen2.5-VL writes ``in_chans``).
PUBLIC = {
    "qwen2_5_vl_7b": ("qwen2_5_vl", dict(
        depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
        in_chans=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
        spatial_patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2, temporal_patch_size=2)),
    "qwen3_vl_8b": ("qwen3_vl", dict(
        deepstack_visual_indexes=[8, 16, 24], depth=27, hidden_act="gelu_pytorch_tanh",
        hidden_size=1152, in_channels=3, initializer_range=0.02, intermediate_size=4304,
        model_type="qwen3_vl", num_heads=16, num_position_embeddings=2304, out_hidden_size=4096,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2)),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_qwen2_5_vl_qwen3_vl_presets_match_full_size_towers(name):
  """The presets are what the public configs parse to, and at full size every rule reads a
  tensor of transformers' tower (built on the meta device: shapes only) with the right shape,
  covering all of them."""
  import transformers as tf
  from gaze_jax.convert.mapping import expand
  from gaze_jax.convert.qwen_vl import qwen_vision_counts
  from gaze_jax.model.qwen_vision import PRESETS
  family, vc = PUBLIC[name]
  cfg = qwen_vision_config({"model_type": family, "vision_config": vc})
  assert cfg == PRESETS[name]
  with torch.device("meta"):
    if family == "qwen2_5_vl":
      ref = tf.Qwen2_5_VisionTransformerPretrainedModel(tf.Qwen2_5_VLVisionConfig(**vc))
    else:
      ref = tf.Qwen3VLVisionModel(tf.Qwen3VLVisionConfig(**vc))
  shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  tower = nnx.eval_shape(lambda: QwenVisionTower(cfg, rngs=nnx.Rngs(0)))
  params = {".".join(map(str, p)): v.get_value().shape
            for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}
  used = set()
  for ours, src, hook in expand(qwen_vision_rules(cfg, ""), qwen_vision_counts(cfg)):
    assert hook.source_shape(params.pop(ours)) == shapes[src], (ours, src)
    used.add(src)
  assert not params and used == set(shapes)
  assert sum(np.prod(s) for s in shapes.values()) > 4e8      # the ~0.4-0.7B-parameter towers


def test_qwen2_5_vl_qwen3_vl_bad_inputs():
  """A pixel_values shape that grid_thw does not give, or a grid the merger cannot fuse,
  raise a ValueError saying what is expected."""
  import jax.numpy as jnp
  cfg = qwen_vision_config({"model_type": "qwen3_vl", "vision_config": QWEN3})
  tower = QwenVisionTower(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"needs \(24, 1536\)"):
    tower(jnp.zeros((20, cfg.patch_dim)), ((1, 4, 6),))
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    tower(jnp.zeros((15, cfg.patch_dim)), ((1, 3, 5),))
