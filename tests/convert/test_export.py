"""``gaze_jax.convert.export``: our (changed) parameters written back as a Hugging Face folder.
transformers loads it, reporting only the gaze parts as unused, and computes our dense model's
logits and image features; ``plan_hf`` of the export restores our gaze model exactly."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert.export import GAZE_CONFIG, export_hf
from gaze_jax.convert.families import plan_hf
from gaze_jax.convert.hf import build_planned
from gaze_jax.convert.mapping import param_paths
from gaze_jax.gaze import Text
from gaze_jax.model import GazeConfig
from gaze_jax.train.checkpoint import abstract_params
from tests.hf_folders import V, fine_tuned, save_llava_onevision

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GAZE = GazeConfig(attention="gaze", num_ctx=2, region_shape=(2, 2), top_k=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny LLaVA-OneVision folder, and our gaze model from it with every weight changed (as
  fine-tuning would): ``(source folder, plan, model)``."""
  src = tmp_path_factory.mktemp("src")
  save_llava_onevision(src, seed=2)
  plan = plan_hf(src, GAZE)
  return src, plan, fine_tuned(plan, seed=4)


def _params(model):
  return {k: np.asarray(v.get_value()) for k, v in param_paths(model).items()}


def _ours_dense(model, tokens):
  """Our model's logits with dense attention (the same weights): ``[1, N, V]``."""
  cfg = dataclasses.replace(model.cfg, gaze=GazeConfig(attention="dense", num_ctx=2))
  gd, _, rest = abstract_params(cfg)
  dense = nnx.merge(gd, nnx.state(model, nnx.Param), rest)
  layout = dense.build_layout([[Text(tokens.shape[1])]], seq_len=tokens.shape[1])
  return np.asarray(dense(tokens, layout))


def test_export_loads_in_transformers_with_our_logits(trained, tmp_path):
  src, plan, model = trained
  out = tmp_path / "export"
  summary = export_hf(_params(model), plan, out, gaze=GAZE, max_shard_bytes=200_000)
  assert len([f for f in summary["files"] if f.endswith(".safetensors")]) > 1   # sharded
  assert (out / "model.safetensors.index.json").is_file()
  assert json.loads((out / GAZE_CONFIG).read_text())["num_ctx"] == 2
  hf, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  hf.eval()
  assert not info["missing_keys"]
  assert sorted(info["unexpected_keys"]) == ["gaze.ctx_embed"]
  tokens = np.random.default_rng(1).integers(0, V - 2, size=(1, 12)).astype(np.int32)
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  got = _ours_dense(model, tokens)
  diff = float(np.max(np.abs(got - want)))
  print(f"\n[export] text logits max abs diff {diff:.2e}")
  assert diff <= 1e-4
  # The vision tower and projector: transformers' features of the same image.
  images = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    hs = hf.model.vision_tower(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)),
                               output_hidden_states=True).hidden_states
    feats_hf = hf.model.multi_modal_projector(hs[hf.config.vision_feature_layer]).numpy()
  feats, _ = model.image_features(images[:, None])
  assert float(np.max(np.abs(np.asarray(feats[:, 0]) - feats_hf))) <= 1e-4


def test_export_restores_our_gaze_model_exactly(trained, tmp_path):
  src, plan, model = trained
  out = tmp_path / "export"
  export_hf(_params(model), plan, out, gaze=GAZE)
  back = build_planned(plan_hf(out, GAZE), seed=99)       # no fresh parameter left
  got, want = _params(back), _params(model)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The tensors we do not build (the last SigLIP block, post-LayerNorm) are the source's.
  from gaze_jax.convert.hf_io import load_safetensors
  s, e = load_safetensors(src), load_safetensors(out)
  for k in s:
    if "post_layernorm" in k or ".encoder.layers.2." in k:
      np.testing.assert_array_equal(s[k], e[k])


def test_export_dtype_and_bad_inputs(trained, tmp_path):
  src, plan, model = trained
  params = _params(model)
  export_hf(params, plan, tmp_path / "bf16", gaze=GAZE, dtype="bfloat16")
  from gaze_jax.convert.hf_io import load_safetensors
  ck = load_safetensors(tmp_path / "bf16")
  key = next(k for k in ck if k.endswith("q_proj.weight"))
  assert str(ck.dtype(key)) == "bfloat16" and str(ck.dtype("gaze.ctx_embed")) == "float32"
  # A folder whose context tokens do not fit the model: named when it is planned and checked.
  with pytest.raises(ValueError, match="gaze.ctx_embed"):
    build_planned(plan_hf(tmp_path / "bf16", GazeConfig(attention="gaze", num_ctx=3,
                                                        region_shape=(2, 2), top_k=2)))
