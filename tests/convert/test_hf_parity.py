"""Hugging Face converters: parity with transformers (CPU torch, float32) on tiny random models
saved with ``save_pretrained``, safetensors reading (bf16, shards, corrupt files) and clear
errors. Each tiny model is built and saved once per module."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert.hf import (decoder_config_from_hf, load_causal_lm, load_llava_onevision,
                                 load_safetensors, load_siglip_vision, read_hf_config,
                                 vision_config_from_hf)
from gaze_jax.gaze import PAD, Image, Text
from gaze_jax.model import GazeConfig
from tests.hf_folders import randomize

# The references; gaze_jax itself needs none of them.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

ATOL = 1e-4
V = 128
TEXT_KW = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
VISION_KW = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=80,
                 num_hidden_layers=3, num_attention_heads=4)


def _save(model, path, seed):
  randomize(model, seed)
  model.eval()
  model.save_pretrained(path)
  return model


@nnx.jit
def _forward(model, tokens, layout, images=None):
  """One compiled forward (many small eager ops would each compile on their own: slower)."""
  return model(tokens, layout, images)


@nnx.jit
def _tower(tower, images):
  return tower(images)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _report(name, diff):
  print(f"\n[parity] {name}: max abs diff {diff:.3e}")


# ------------------------------------------------------------------ causal LMs

def _llama():
  return transformers.LlamaConfig(**TEXT_KW, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def _qwen2():
  return transformers.Qwen2Config(**TEXT_KW, rope_parameters={"rope_type": "default",
                                                              "rope_theta": 1e6})


def _qwen3(tie):
  return transformers.Qwen3Config(**TEXT_KW, head_dim=24, tie_word_embeddings=tie,
                                  rope_parameters={"rope_type": "default", "rope_theta": 2000.0})


# Llama 3.1 RoPE scaling; wavelengths of the 8 frequencies (head_dim 16, theta 1e4) are
# 6.3, 20, 63, ...: with original_max_position_embeddings=32 one stays (< 32 / 4), one is
# blended and the rest are divided by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def _llama3_rope():
  return transformers.LlamaConfig(**TEXT_KW, rope_parameters=dict(LLAMA3_ROPE))


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "qwen3": lambda: _qwen3(False),
            "qwen3_tied": lambda: _qwen3(True), "llama3_rope": _llama3_rope}
N_TEXT = 12


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
  """family -> (model dir, token ids [2, N], HF logits [2, N, V]); each model is built, saved
  and run once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](),
                                                         attn_implementation="eager")
      path = tmp_path_factory.mktemp(name)
      _save(hf, path, seed=len(name))
      ids = np.random.default_rng(0).integers(0, V, size=(2, N_TEXT))
      with torch.no_grad():
        logits = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
      cache[name] = (path, ids, logits)
    return cache[name]

  return get


# The gaze model (no visual tokens: nothing to route) on two families, to keep the file fast.
@pytest.mark.parametrize("name,attention", [(n, "dense") for n in sorted(FAMILIES)] +
                         [("llama", "gaze"), ("qwen3", "gaze")])
def test_causal_lm_logits_match_transformers(saved_lm, name, attention):
  path, ids, want = saved_lm(name)
  gaze = GazeConfig(attention=attention, num_ctx=0, region_shape=(1, 1), top_k=1)
  model, unused = load_causal_lm(path, gaze, return_unused=True)
  cfg = model.cfg.decoder
  assert (cfg.qkv_bias, cfg.qk_norm, cfg.tie_embeddings) == (
      name == "qwen2", name.startswith("qwen3"), name == "qwen3_tied")
  assert (cfg.rope_scaling is not None) == (name == "llama3_rope")
  assert unused == []
  layout = model.build_layout([[Text(N_TEXT)], [Text(N_TEXT)]], seq_len=N_TEXT)
  got = np.asarray(_forward(model, np.asarray(ids, np.int32), layout))
  diff = _max_diff(got, want)
  _report(f"{name} ({attention})", diff)
  assert np.abs(want).max() > 1.0          # logits of a meaningful size
  assert diff <= ATOL


def test_llama3_rope_frequencies_match_transformers():
  """Our Llama 3.1 frequencies against transformers' ``rope_type="llama3"`` init, at Llama 3.1
  8B's settings (theta 5e5, head_dim 128, factor 8, original context 8192)."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from gaze_jax.model.layers import rope_frequencies
  params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
  hf_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                    max_position_embeddings=131072, rope_parameters=params)
  want, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
  cfg = decoder_config_from_hf(dict(model_type="llama", hidden_size=4096, num_attention_heads=32,
                                    rope_parameters=params))
  got = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  assert scale == 1.0
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
  plain = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta))
  assert (got < plain).any() and (got == plain).any()   # some scaled, some kept


def test_tied_config_with_its_own_lm_head_loads_untied_like_transformers(saved_lm, tmp_path,
                                                                         caplog):
  """config.json says tie_word_embeddings=true but the checkpoint holds an lm_head.weight that
  differs from the embeddings: transformers keeps them apart and uses the head (with a
  warning); we match its logits and warn naming the file and the tensor."""
  path, ids, _ = saved_lm("qwen3_tied")
  head = np.random.default_rng(7).normal(size=(V, 64)).astype(np.float32)
  bad = _copy_with(path, tmp_path / "untied",
                   lambda t: t.update({"lm_head.weight": head}))
  hf = transformers.AutoModelForCausalLM.from_pretrained(bad, attn_implementation="eager")
  np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), head)
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
  with caplog.at_level("WARNING", logger="gaze_jax.convert.hf"):
    model, unused = load_causal_lm(bad, return_unused=True)
  assert not model.cfg.decoder.tie_embeddings and unused == []
  msg = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert "'lm_head.weight'" in msg and "model.safetensors" in msg and "tie_word_embeddings" in msg
  layout = model.build_layout([[Text(N_TEXT)], [Text(N_TEXT)]], seq_len=N_TEXT)
  diff = _max_diff(_forward(model, np.asarray(ids, np.int32), layout), want)
  _report("qwen3 tied config with its own lm_head", diff)
  assert diff <= ATOL
  # A head equal to the embeddings keeps the tie (reported unused), without a warning.
  caplog.clear()
  same = _copy_with(path, tmp_path / "same", lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"]}))
  with caplog.at_level("WARNING", logger="gaze_jax.convert.hf"):
    model, unused = load_causal_lm(same, return_unused=True)
  assert model.cfg.decoder.tie_embeddings and unused == ["lm_head.weight"]
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ------------------------------------------------------------------ SigLIP

@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  """(model dir, images NHWC [2, 32, 32, 3], HF output with hidden states)."""
  cfg = transformers.SiglipVisionConfig(**VISION_KW)
  hf = transformers.SiglipVisionModel(cfg)
  path = tmp_path_factory.mktemp("siglip")
  _save(hf, path, seed=1)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)),
             output_hidden_states=True)
  return path, images, out


@pytest.mark.parametrize("feature_layer,post_layernorm", [(-1, True), (-1, False), (-2, False)])
def test_siglip_vision_matches_transformers(siglip, feature_layer, post_layernorm):
  path, images, out = siglip
  tower, unused = load_siglip_vision(path, feature_layer, post_layernorm, return_unused=True)
  want = (out.last_hidden_state if post_layernorm else out.hidden_states[feature_layer]).numpy()
  diff = _max_diff(_tower(tower, images), want)
  _report(f"siglip feature_layer={feature_layer} post_layernorm={post_layernorm}", diff)
  assert diff <= ATOL
  # The head is never built; the last block only when it is used.
  assert all(k.startswith("head.") or k.startswith("post_layernorm.") or
             k.startswith("encoder.layers.2.") for k in unused)
  assert any(k.startswith("head.") for k in unused)
  assert (not post_layernorm) == any(k.startswith("post_layernorm.") for k in unused)


@pytest.mark.parametrize("hw", [(48, 48), (24, 24), (40, 56)])
def test_siglip_at_other_sizes_matches_interpolate_pos_encoding(siglip, hw):
  """At a size other than the native 32 px the position embeddings are resized as
  transformers' ``interpolate_pos_encoding=True`` does (PyTorch bicubic); our former
  ``jax.image.resize`` differed by 0.06-0.2."""
  path, _, _ = siglip
  hf = transformers.SiglipVisionModel.from_pretrained(path)
  images = np.random.default_rng(5).normal(size=(2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)),
              interpolate_pos_encoding=True).last_hidden_state.numpy()
  tower = load_siglip_vision(path)
  diff = _max_diff(_tower(tower, images), want)
  _report(f"siglip at {hw[0]}x{hw[1]} px (native 32)", diff)
  assert diff <= ATOL


def test_siglip_vision_from_full_siglip_model(tmp_path):
  """A SiglipModel checkpoint (``vision_model.`` prefix beside a text tower) loads its vision
  half."""
  cfg = transformers.SiglipConfig(
      text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1),
      vision_config=dict(VISION_KW, num_hidden_layers=1))
  hf = _save(transformers.SiglipModel(cfg), tmp_path, seed=2)
  images = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf.vision_model(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)))
  tower, unused = load_siglip_vision(tmp_path, return_unused=True)
  diff = _max_diff(_tower(tower, images), want.last_hidden_state.numpy())
  _report("siglip (SiglipModel checkpoint)", diff)
  assert diff <= ATOL
  assert any(k.startswith("text_model.") for k in unused)


# ------------------------------------------------------------------ LLaVA-OneVision

@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  """(model dir, HF model, images NHWC [2, 32, 32, 3])."""
  cfg = transformers.LlavaOnevisionConfig(
      text_config=transformers.Qwen2Config(**TEXT_KW).to_dict(),
      vision_config=transformers.SiglipVisionConfig(**VISION_KW).to_dict(),
      vision_feature_layer=-2, image_token_index=V - 1)
  hf = transformers.LlavaOnevisionForConditionalGeneration(cfg)
  path = tmp_path_factory.mktemp("llava")
  _save(hf, path, seed=3)
  images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  return path, hf, images


def _hf_image_features(hf, images):
  """HF vision tower ``hidden_states[vision_feature_layer]`` through HF's projector:
  ``[N, P, E]`` in raster order."""
  with torch.no_grad():
    hs = hf.model.vision_tower(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)),
                               output_hidden_states=True).hidden_states
    return hf.model.multi_modal_projector(hs[hf.config.vision_feature_layer]).numpy()


def test_llava_onevision_image_features(llava):
  path, hf, images = llava
  model, unused = load_llava_onevision(path, return_unused=True)
  assert model.cfg.vision.feature_layer == -2 and not model.cfg.vision.post_layernorm
  # image_newline loads (the text slots holding the image token id take it).
  assert not any(k.endswith("image_newline") for k in unused)
  assert model.cfg.newline_token_ids == (V - 1,)      # the default video id is past V
  np.testing.assert_array_equal(model.image_newline[...], hf.model.image_newline.detach().numpy())
  feats, _ = model.image_features(images[:, None])                 # [B, F=1, P, E]
  diff = _max_diff(feats[:, 0], _hf_image_features(hf, images))
  _report("llava-onevision vision features + projector", diff)
  assert diff <= ATOL


def test_llava_onevision_context_tokens_keep_their_initialisation(llava):
  """Context tokens are new parameters (no checkpoint has them): loading keeps their random
  initialisation instead of failing on an uncovered parameter."""
  path, _, _ = llava
  gaze = GazeConfig(attention="gaze", num_ctx=2, region_shape=(2, 2), top_k=1)
  model, unused = load_llava_onevision(path, gaze, seed=5, return_unused=True)
  ctx = np.asarray(model.ctx_embed[...])
  assert ctx.shape == (2, 64) and ctx.std() > 0
  assert not any("initial" in k for k in unused)


@pytest.mark.parametrize("gaze", [
    GazeConfig(attention="dense", num_ctx=0, region_shape=(3, 3)),
    # Routing over all regions must equal dense attention.
    GazeConfig(attention="gaze", num_ctx=0, region_shape=(2, 2), top_k=4),
], ids=["dense", "gaze_all_regions"])
def test_llava_onevision_end_to_end(llava, gaze):
  """Our MLLM on ``[Text(a), Image(4, 4), Text(b)]`` vs HF's language model fed the same
  embeddings in raster order; our slot ``s`` is compared with HF's position
  ``layout.position[s]``."""
  path, hf, images = llava
  model = load_llava_onevision(path, gaze)
  segments = [(3, 6), (6, 2)]                      # (text before, text after) per example
  g = 4
  layout = model.build_layout([[Text(a), Image(g, g), Text(b)] for a, b in segments],
                              seq_len=48, max_regions=4)
  kind = np.asarray(layout.kind)
  pos = np.asarray(layout.position)
  rng = np.random.default_rng(4)
  ids = [rng.integers(0, V - 1, size=a + g * g + b) for a, b in segments]   # per raster position
  tokens = np.zeros(kind.shape, np.int32)
  for i, seq in enumerate(ids):
    tokens[i] = np.where(kind[i] == PAD, 0, seq[np.minimum(pos[i], len(seq) - 1)])
  got = np.asarray(_forward(model, tokens, layout, images[:, None]))

  feats = _hf_image_features(hf, images)
  lm = hf.model.language_model
  diffs = []
  for i, (a, b) in enumerate(segments):
    n = a + g * g + b
    valid = kind[i] != PAD
    assert sorted(pos[i][valid]) == list(range(n))   # every HF position is compared once
    with torch.no_grad():
      emb = lm.embed_tokens(torch.as_tensor(ids[i]))
      emb = torch.cat([emb[:a], torch.as_tensor(feats[i]), emb[a + g * g:]])[None]
      hidden = lm(inputs_embeds=emb, position_ids=torch.arange(n)[None]).last_hidden_state
      want = hf.lm_head(hidden)[0].numpy()                                 # [n, V]
    diffs.append(_max_diff(got[i][valid], want[pos[i][valid]]))
  diff = max(diffs)
  _report(f"llava-onevision end to end ({gaze.attention}, region {gaze.region_shape})", diff)
  assert diff <= ATOL


# ------------------------------------------------------------------ safetensors reading

def test_load_safetensors_bf16_and_f16(tmp_path):
  t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(4).to(torch.float16),
       "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
  safetensors_torch.save_file(t, str(tmp_path / "x.safetensors"))
  got = load_safetensors(tmp_path / "x.safetensors")
  assert got["a"].dtype == np.float32 and got["b"].dtype == np.float32
  np.testing.assert_array_equal(got["a"], t["a"].float().numpy())
  np.testing.assert_array_equal(got["b"], t["b"].float().numpy())
  np.testing.assert_array_equal(got["c"], t["c"].numpy())


def test_load_safetensors_sharded_equals_single(saved_lm, tmp_path):
  path, _, _ = saved_lm("llama")
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  single, sharded = load_safetensors(path), load_safetensors(tmp_path)
  assert sorted(single) == sorted(sharded)
  for k in single:
    np.testing.assert_array_equal(single[k], sharded[k])
  # A shard that went missing is named.
  shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
  first = sorted(set(shard.values()))[0]
  os.remove(tmp_path / first)
  with pytest.raises(FileNotFoundError, match=first):
    load_safetensors(tmp_path)


def test_load_safetensors_missing_and_corrupt(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    load_safetensors(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_safetensors(tmp_path)
  f = tmp_path / "model.safetensors"
  safetensors_numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(f))
  # A tensor the file lacks is named with the file.
  with pytest.raises(KeyError, match=r"model.safetensors has no tensor 'v'"):
    load_safetensors(f)["v"]
  data = f.read_bytes()
  not_json = (16).to_bytes(8, "little") + b"not json at all!"
  # Truncated data, a header that is not JSON, a file shorter than the header length.
  for content in (data[:-100], not_json, b"\x01\x02"):
    f.write_bytes(content)
    with pytest.raises(ValueError, match=r"model.safetensors: not a valid safetensors file"):
      load_safetensors(tmp_path)


def test_load_safetensors_is_lazy(tmp_path, monkeypatch):
  """Opening reads headers only; a tensor's data is read when it is asked for, and a deleted
  or replaced tensor is never read."""
  import gaze_jax.convert.hf_io as hf_io
  f = tmp_path / "x.safetensors"
  safetensors_numpy.save_file({k: np.full((2, 3), i, np.float16) for i, k in enumerate("abc")},
                              str(f))
  read = []
  real = hf_io._read_tensor
  monkeypatch.setattr(hf_io, "_read_tensor", lambda p, n: read.append(n) or real(p, n))
  ckpt = load_safetensors(f)
  assert sorted(ckpt) == ["a", "b", "c"] and read == []
  del ckpt["a"]
  ckpt["b"] = np.zeros(4, np.float32)
  assert sorted(ckpt) == ["b", "c"] and "a" not in ckpt and len(ckpt) == 2
  c = ckpt["c"]
  assert c.dtype == np.float32 and ckpt["b"].shape == (4,) and read == ["c"]
  np.testing.assert_array_equal(c, np.full((2, 3), 2, np.float32))


# ------------------------------------------------------------------ clear errors

def _copy_with(src, dst, edit_tensors=None, edit_config=None):
  """Copies a model directory, editing its tensors dict and/or its config dict in place."""
  shutil.copytree(src, dst)
  if edit_tensors:
    tensors = dict(load_safetensors(src))
    edit_tensors(tensors)
    safetensors_numpy.save_file(tensors, str(dst / "model.safetensors"))
  if edit_config:
    cfg = read_hf_config(src)
    edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def test_clear_errors_for_bad_checkpoints(saved_lm, tmp_path):
  path, _, _ = saved_lm("qwen2")
  key = "model.layers.1.mlp.up_proj.weight"

  def wrong_shape(t):
    t[key] = t[key][:-1]

  def missing(t):
    del t["model.layers.1.self_attn.k_proj.bias"]

  def extra(t):
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)

  with pytest.raises(ValueError, match=r"up_proj.weight has shape \(64, 95\)"):
    load_causal_lm(_copy_with(path, tmp_path / "shape", wrong_shape))
  with pytest.raises(ValueError, match="no tensor 'model.layers.1.self_attn.k_proj.bias'"):
    load_causal_lm(_copy_with(path, tmp_path / "missing", missing))
  with pytest.raises(ValueError, match="not used.*o_proj.bias"):
    load_causal_lm(_copy_with(path, tmp_path / "extra", extra))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    load_causal_lm(_copy_with(path, tmp_path / "gpt2",
                              edit_config=lambda c: c.update(model_type="gpt2")))
  with pytest.raises(ValueError, match="'llava_onevision'"):
    load_llava_onevision(path)


def test_nonfinite_weights_are_refused_unless_allowed(saved_lm, tmp_path, caplog):
  """NaN / Inf in a weight: a ValueError naming the tensor and its file (here a shard of a
  sharded checkpoint); ``allow_nonfinite=True`` loads it with a warning."""
  path, _, _ = saved_lm("llama")
  key = "model.layers.1.mlp.up_proj.weight"
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  with torch.no_grad():
    hf.get_parameter(key)[2, 3] = float("nan")
    hf.get_parameter("model.layers.0.mlp.down_proj.weight")[0, 1] = float("inf")
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][key]
  with pytest.raises(ValueError, match=rf"tensor '{key}' in \S*{shard} holds 1 NaN and 0 Inf"
                     r".*allow_nonfinite=True"):
    load_causal_lm(tmp_path)
  with caplog.at_level("WARNING", logger="gaze_jax.convert.mapping"):
    model = load_causal_lm(tmp_path, allow_nonfinite=True)
  assert key in caplog.text and "model.layers.0.mlp.down_proj.weight" in caplog.text
  assert np.isinf(np.asarray(model.decoder.layers[0].mlp.down_proj.kernel[...])).any()


def test_config_translation():
  base = dict(model_type="llama", vocab_size=10, hidden_size=32, intermediate_size=48,
              num_hidden_layers=1, num_attention_heads=4)
  cfg = decoder_config_from_hf(dict(base, rope_theta=123.0))            # transformers 4 style
  assert (cfg.rope_theta, cfg.num_kv_heads, cfg.head_dim) == (123.0, 4, 8)
  cfg = decoder_config_from_hf(dict(base, rope_parameters={"rope_type": "default",
                                                           "rope_theta": 77.0}))
  assert cfg.rope_theta == 77.0
  with pytest.raises(ValueError, match="rope_parameters.rope_type='yarn'"):
    decoder_config_from_hf(dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1.0,
                                                       "factor": 4.0}))
  # Llama 3.1 scaling, transformers 4 style (rope_scaling with "type" or "rope_type").
  cfg = decoder_config_from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(
      type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192)))
  assert (cfg.rope_theta, cfg.rope_scaling.factor) == (5e5, 8.0)
  assert cfg.rope_scaling.original_max_position_embeddings == 8192
  with pytest.raises(ValueError, match="rope_scaling: rope_type='llama3' needs low_freq_factor, "
                     "high_freq_factor, original_max_position_embeddings"):
    decoder_config_from_hf(dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
  with pytest.raises(ValueError, match="high_freq_factor=1.0 must exceed low_freq_factor=1.0"):
    decoder_config_from_hf(dict(base, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=1.0,
        original_max_position_embeddings=8192)))
  with pytest.raises(ValueError, match="rope_scaling.rope_type='linear'"):
    decoder_config_from_hf(dict(base, rope_scaling={"rope_type": "linear", "factor": 8.0}))
  with pytest.raises(ValueError, match="attention_bias"):
    decoder_config_from_hf(dict(base, attention_bias=True))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    decoder_config_from_hf(dict(base, hidden_act="gelu"))
  with pytest.raises(ValueError, match="sliding-window"):
    decoder_config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True))
  with pytest.raises(ValueError, match="model_type='mistral'"):
    decoder_config_from_hf(dict(base, model_type="mistral"))
  vis = vision_config_from_hf({"model_type": "llava_onevision"}, post_layernorm=False)
  assert (vis.patch_size, vis.image_size, vis.num_layers) == (14, 384, 26)   # HF's defaults
  with pytest.raises(ValueError, match="model_type='clip_vision_model'"):
    vision_config_from_hf({"model_type": "clip_vision_model"})


def test_llava_onevision_unsupported_options(llava, tmp_path):
  path, _, _ = llava
  with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
    load_llava_onevision(_copy_with(path, tmp_path / "a", edit_config=lambda c: c.update(
        vision_feature_select_strategy="default")))
  with pytest.raises(ValueError, match=r"vision_feature_layer=\[-2, -1\]"):
    load_llava_onevision(_copy_with(path, tmp_path / "b", edit_config=lambda c: c.update(
        vision_feature_layer=[-2, -1])))
