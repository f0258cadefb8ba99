"""The NNX multimodal model on tiny random weights (float32, CPU): gaze vs dense equivalence,
routing outputs, the video path, bf16 compute, input errors and logical axis names."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gaze_jax.gaze import CTX, PAD, PATCH, TEXT, Image, LayoutSpec, Text, Video, build_layout
from gaze_jax.model import MLLM, GazeConfig, MLLMConfig, pack_images
from gaze_jax.model.presets import tiny

# Logical axis names declared in gaze_jax/model/layers.py (plus the vision attention heads).
AXIS_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "vision_embed",
              "vision_mlp", "vision_heads", "patch", "pos"}


def _cfg(attention="gaze", top_k=4, num_ctx=4, implementation="xla", decoder_variant=False,
         **kw) -> MLLMConfig:
  """The tiny preset with its gaze settings replaced; ``decoder_variant`` switches on the
  Qwen2/Qwen3 options (qkv bias, q/k norm) and tied embeddings."""
  base = tiny()
  dec = base.decoder
  if decoder_variant:
    dec = dataclasses.replace(dec, qkv_bias=True, qk_norm=True, tie_embeddings=True)
  gaze = GazeConfig(attention=attention, top_k=top_k, region_shape=(2, 2), num_ctx=num_ctx,
                    implementation=implementation)
  return dataclasses.replace(base, decoder=dec, gaze=gaze, **kw)


@nnx.jit(static_argnames=("return_selected",))
def _run(model, tokens, layout, images, return_selected=False):
  """The model's forward, jitted (eager dispatch of every small op is much slower)."""
  return model(tokens, layout, images, return_selected=return_selected)


def _pair(cfg_a: MLLMConfig, cfg_b: MLLMConfig):
  """Two models with the same weights: b starts from another seed and receives a's params."""
  a = MLLM(cfg_a, rngs=nnx.Rngs(0))
  b = MLLM(cfg_b, rngs=nnx.Rngs(1))
  nnx.update(b, nnx.state(a, nnx.Param))
  return a, b


def _images(rng, examples, size=64, channels=3):
  """Random pixels for every Image / Video segment of every example."""
  out = []
  for ex in examples:
    items = []
    for seg in ex:
      if isinstance(seg, Image):
        items.append(rng.normal(size=(size, size, channels)).astype(np.float32))
      elif isinstance(seg, Video):
        items.append(rng.normal(size=(seg.frames, size, size, channels)).astype(np.float32))
    out.append(items)
  return out


def _batch(model, examples, seq_len, max_regions, max_images, seed=0):
  rng = np.random.default_rng(seed)
  layout = model.build_layout(examples, seq_len=seq_len, max_regions=max_regions,
                              max_images=max_images)
  images = pack_images(_images(rng, examples), layout)
  tokens = rng.integers(0, model.cfg.decoder.vocab_size, size=layout.kind.shape).astype(np.int32)
  return tokens, layout, images


# Several images, a video (pooled 4x4 frames of the 8x8 grid), different text lengths and a
# text-only example.
MIXED = [
    [Text(3), Image(8, 8), Text(4), Image(8, 8), Text(5, generated=True)],
    [Text(6), Video(2, 4, 4), Text(7)],
    [Text(9)],
]


@pytest.mark.parametrize("decoder_variant", [False, True])
def test_gaze_with_all_regions_and_no_ctx_equals_dense(decoder_variant):
  # K = all regions and no context tokens: every text row sees every earlier patch, which is
  # exactly dense causal attention.
  gaze, dense = _pair(_cfg("gaze", top_k=1.0, num_ctx=0, decoder_variant=decoder_variant),
                      _cfg("dense", num_ctx=0, decoder_variant=decoder_variant))
  tokens, layout, images = _batch(gaze, MIXED, seq_len=144, max_regions=32, max_images=2)
  lg = np.asarray(_run(gaze, tokens, layout, images))
  ld = np.asarray(_run(dense, tokens, layout, images))
  real = np.asarray(layout.kind) != PAD
  assert lg.shape == (3, 144, 512)
  np.testing.assert_allclose(lg[real], ld[real], atol=2e-5, rtol=2e-5)
  # The comparison is not vacuous: the images do change the logits.
  blank = np.asarray(_run(dense, tokens, layout, np.zeros_like(images)))
  assert np.abs(blank[real] - ld[real]).max() > 1e-2


def test_gaze_with_few_regions_differs_only_where_routing_acts():
  gaze, dense = _pair(_cfg("gaze", top_k=2, num_ctx=2), _cfg("dense", num_ctx=2))
  examples = [[Text(3), Image(8, 8), Text(6)],
              [Text(5), Image(8, 8), Text(4), Image(8, 8), Text(3)]]
  tokens, layout, images = _batch(gaze, examples, seq_len=160, max_regions=32, max_images=2)
  lg = np.asarray(_run(gaze, tokens, layout, images))
  ld = np.asarray(_run(dense, tokens, layout, images))
  kind, frame = np.asarray(layout.kind), np.asarray(layout.frame)
  for b in range(2):
    first_visual = np.flatnonzero(kind[b] == PATCH)[0]
    before = np.arange(first_visual)                          # text rows before any image
    first_image = np.flatnonzero((kind[b] == PATCH) & (frame[b] == 0))
    after = np.flatnonzero((kind[b] == TEXT) & (np.arange(kind.shape[1]) > first_visual))
    ctx0 = np.flatnonzero((kind[b] == CTX) & (frame[b] == 0))
    np.testing.assert_allclose(lg[b, before], ld[b, before], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lg[b, first_image], ld[b, first_image], atol=1e-5, rtol=1e-5)
    # Every routed row sees 2 of 16 (or 32) regions instead of all: each row changes.
    assert (np.abs(lg[b, after] - ld[b, after]).max(axis=-1) > 1e-3).all()
    # Context rows see only their own frame (dense: also the text before it).
    assert (np.abs(lg[b, ctx0] - ld[b, ctx0]).max(axis=-1) > 1e-3).all()


def test_return_selected_ids():
  K = 4
  model = MLLM(_cfg("gaze", top_k=K, num_ctx=4), rngs=nnx.Rngs(0))
  tokens, layout, images = _batch(model, MIXED, seq_len=160, max_regions=32, max_images=2)
  logits, selected = _run(model, tokens, layout, images, return_selected=True)
  assert logits.shape == (3, 160, 512)
  assert isinstance(selected, list) and len(selected) == model.cfg.decoder.num_layers
  kind, pos = np.asarray(layout.kind), np.asarray(layout.position)
  last_pos = np.asarray(layout.region_last_pos)
  valid = np.asarray(layout.region_valid)
  for ids in selected:
    ids = np.asarray(ids)
    assert ids.shape == (3, 160, 4, K) and ids.dtype == np.int32
    assert (ids[kind != TEXT] == -1).all()
    for b in range(3):
      for t in np.flatnonzero(kind[b] == TEXT):
        # Candidates: valid regions whose tokens all lie before the query.
        n_cand = int((valid[b] & (last_pos[b] < pos[b, t])).sum())
        for h in range(4):
          chosen = ids[b, t, h][ids[b, t, h] >= 0]
          assert len(chosen) == min(K, n_cand)
          assert len(set(chosen.tolist())) == len(chosen)
          assert valid[b, chosen].all() and (last_pos[b, chosen] < pos[b, t]).all()
    # Text before any image selects nothing; text after a full image selects K regions.
    assert (ids[2] == -1).all()
    assert (ids[0, -20:][kind[0, -20:] == TEXT] >= 0).all()


def test_video_frames_use_pooled_features():
  model = MLLM(_cfg("gaze", num_ctx=4), rngs=nnx.Rngs(0))
  examples = [[Text(2), Image(8, 8), Text(2), Video(2, 4, 4), Text(3)]]
  tokens, layout, images = _batch(model, examples, seq_len=128, max_regions=32, max_images=3)
  feats, pooled = nnx.jit(lambda m, i: m.image_features(i))(model, images)
  feats, pooled = np.asarray(feats), np.asarray(pooled)
  E = feats.shape[-1]
  # Manual 2x2 mean pooling of the raster-order 8x8 grid.
  manual = feats.reshape(1, 3, 4, 2, 4, 2, E).mean(axis=(3, 5)).reshape(1, 3, 16, E)
  np.testing.assert_allclose(pooled, manual, atol=1e-6, rtol=1e-5)
  x = np.asarray(nnx.jit(lambda m, t, l, i: m.embed(t, l, i))(model, tokens, layout, images))
  kind, frame, idx = (np.asarray(a)[0] for a in (layout.kind, layout.frame, layout.patch_index))
  patches = np.flatnonzero(kind == PATCH)
  assert sorted(set(frame[patches].tolist())) == [0, 1, 2]
  for s in patches:
    want = feats[0, 0, idx[s]] if frame[s] == 0 else manual[0, frame[s], idx[s]]
    np.testing.assert_allclose(x[0, s], want, atol=1e-5, rtol=1e-5)
  assert (frame[patches] >= 1).sum() == 2 * 16 and (frame[patches] == 0).sum() == 64
  # Context slots hold the learned embeddings, text slots the token embeddings.
  ctx = np.flatnonzero(kind == CTX)
  np.testing.assert_allclose(x[0, ctx], np.asarray(model.ctx_embed[...])[idx[ctx]], atol=1e-6)
  text = np.flatnonzero(kind == TEXT)
  table = np.asarray(model.decoder.embed.embedding[...])
  np.testing.assert_allclose(x[0, text], table[tokens[0, text]], atol=1e-6)


def test_an_image_smaller_than_the_video_pool_embeds_its_patch():
  # A 1x1 grid (the token-matched baseline of a 16 px patch model at a tiny budget) has no
  # 2x2-pooled grid; its one patch slot holds the full-grid feature.
  cfg = _cfg("gaze", num_ctx=0)
  model = MLLM(dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, region_shape=(1, 1))),
               rngs=nnx.Rngs(0))
  spec = LayoutSpec(seq_len=16, max_regions=4, max_images=1, region_shape=(1, 1), num_ctx=0)
  layout = build_layout([[Text(2), Image(1, 1), Text(3)]], spec)
  rng = np.random.default_rng(0)
  P = model.cfg.vision.patch_size
  images = rng.uniform(-1, 1, (1, 1, P, P, 3)).astype(np.float32)
  tokens = np.zeros(layout.kind.shape, np.int32)
  feats, pooled = nnx.jit(lambda m, i: m.image_features(i))(model, images)
  assert np.asarray(pooled).shape[2] == 0
  x = np.asarray(nnx.jit(lambda m, t, l, i: m.embed(t, l, i))(model, tokens, layout, images))
  (slot,) = np.flatnonzero(np.asarray(layout.kind)[0] == PATCH)
  np.testing.assert_allclose(x[0, slot], np.asarray(feats)[0, 0, 0], atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  f32, bf16 = _pair(_cfg("gaze", top_k=4), _cfg("gaze", top_k=4, dtype="bfloat16"))
  tokens, layout, images = _batch(f32, MIXED, seq_len=160, max_regions=32, max_images=2)
  # return_selected=True only to reuse the compilation of test_return_selected_ids.
  l32 = np.asarray(_run(f32, tokens, layout, images, return_selected=True)[0])
  l16 = _run(bf16, tokens, layout, images, return_selected=True)[0]
  assert l16.dtype == jnp.float32
  l16 = np.asarray(l16)
  real = np.asarray(layout.kind) != PAD
  a, b = l32[real], l16[real]
  assert np.isfinite(b).all()
  # bf16 keeps 8 mantissa bits (rel. error ~4e-3 per op). Seen: mean error 0.9% of the mean
  # |logit|, max error 3.4% of the max |logit|; the bounds leave about 3x margin.
  assert np.abs(a - b).mean() < 0.03 * np.abs(a).mean()
  assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
  assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
  assert np.abs(a - b).max() > 0                  # bf16 really ran


def test_input_errors():
  model = MLLM(_cfg("gaze", num_ctx=4), rngs=nnx.Rngs(0))
  examples = [[Text(2), Image(8, 8), Text(3)]]
  tokens, layout, images = _batch(model, examples, seq_len=96, max_regions=16, max_images=1)
  # 48 px images give a 6x6 grid (3x3 pooled), the layout says 8x8.
  with pytest.raises(ValueError, match="wrong image size"):
    model(tokens, layout, np.zeros((1, 1, 48, 48, 3), np.float32))
  with pytest.raises(ValueError, match="channels"):
    model(tokens, layout, np.zeros((1, 1, 64, 64, 1), np.float32))
  # Unpacked images, and a batch the layout does not have: the argument is named.
  with pytest.raises(ValueError, match=r"shape \(1, 64, 64, 3\) .*images must be \[B=1, F=1"):
    model(tokens, layout, np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"images must be \[B=1, F=1, H, W, C\]"):
    model(tokens, layout, np.zeros((2, 1, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"images must be \[N, H, W, C\]"):
    model.vision(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="no images were given"):
    model(tokens, layout, None)
  # One image for an example with two placeholders.
  two = model.build_layout([[Text(1), Image(8, 8), Image(8, 8)]], seq_len=160, max_regions=32,
                           max_images=2)
  with pytest.raises(ValueError, match="placeholders"):
    pack_images([[np.zeros((64, 64, 3), np.float32)]], two)
  # A layout with another number of context tokens than the model.
  other = build_layout(examples, LayoutSpec(seq_len=96, max_regions=16, max_images=1,
                                            region_shape=(2, 2), num_ctx=2))
  with pytest.raises(ValueError, match="num_ctx"):
    model(tokens, other, images)
  # Images given to a text-only model.
  text_only = MLLM(dataclasses.replace(_cfg("dense", num_ctx=0), vision=None), rngs=nnx.Rngs(0))
  assert not hasattr(text_only, "vision")
  t_layout = text_only.build_layout([[Text(7)]], seq_len=8)
  t_tokens = np.zeros((1, 8), np.int32)
  assert _run(text_only, t_tokens, t_layout, None).shape == (1, 8, 512)
  with pytest.raises(ValueError, match="no vision tower"):
    _run(text_only, t_tokens, t_layout, np.zeros((1, 1, 64, 64, 3), np.float32))


def test_every_param_has_logical_axis_names():
  cfg = _cfg("gaze", num_ctx=4, decoder_variant=True)
  cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, tie_embeddings=False))
  state = nnx.state(MLLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  specs = nnx.get_partition_spec(state)
  flat_specs = dict(nnx.to_flat_state(specs))
  paths = set()
  for path, var in nnx.to_flat_state(state):
    name = ".".join(map(str, path))
    paths.add(name)
    names = var.get_metadata().get("out_sharding")
    assert names is not None, f"{name} has no logical axis names"
    assert len(names) == var.get_value().ndim, f"{name}: {names} for shape {var.shape}"
    assert any(n is not None for n in names), f"{name}: all axes unnamed"
    assert set(names) - {None} <= AXIS_NAMES, f"{name}: unknown names {names}"
    assert tuple(flat_specs[path].get_value()) == tuple(names)
  # The tree holds the parts the names are checked on (bias, q/k norm, LM head, ctx, vision).
  for want in ("decoder.layers.0.attn.q_proj.bias", "decoder.layers.1.attn.k_norm.scale",
               "decoder.lm_head.kernel", "ctx_embed", "vision.patch_embed.kernel",
               "vision.pos_embed", "vision.blocks.1.fc2.bias", "projector.linear_2.kernel"):
    assert want in paths, want


def test_selection_override_reproduces_routing_and_changes_output():
  """Passing each layer's own routing back as ``selections`` gives the same logits; fixing the
  answer rows to the last question row's regions (the eviction baseline) changes them."""
  cfg = _cfg(top_k=2, num_ctx=2)
  model = MLLM(cfg, rngs=nnx.Rngs(0))
  g = cfg.vision.image_size // cfg.vision.patch_size
  layout = model.build_layout([[Text(2), Image(g, g), Text(3), Text(3, generated=True)]],
                              seq_len=120, max_regions=(g // 2) ** 2, max_images=1)
  rng = np.random.default_rng(0)
  images = jnp.asarray(pack_images(_images(rng, [[Image(g, g)]]), layout))
  tokens = jnp.asarray(rng.integers(0, cfg.decoder.vocab_size, (1, 120)))
  logits, sel = model(tokens, layout, images, return_selected=True)
  again = model(tokens, layout, images, selections=sel)
  np.testing.assert_allclose(again, logits, atol=1e-5)
  answer = np.flatnonzero(np.asarray(layout.generated[0]))
  fixed = [s.at[:, answer].set(s[:, answer[0] - 1][:, None]) for s in sel]
  evicted = model(tokens, layout, images, selections=fixed)
  np.testing.assert_allclose(evicted[:, :answer[0]], logits[:, :answer[0]], atol=1e-5)
  assert not np.allclose(evicted[:, answer], logits[:, answer], atol=1e-4)


def test_gaze_config_tells_count_from_ratio():
  """top_k=1 is one region, top_k=1.0 all regions: as static jit metadata they must differ."""
  one, ratio = GazeConfig(top_k=1), GazeConfig(top_k=1.0)
  assert one != ratio and hash(one) != hash(ratio)
  assert GazeConfig(top_k=2) == GazeConfig(top_k=2)
  with pytest.raises(ValueError, match="top_k"):
    GazeConfig(top_k="4")


def test_kernel_options_reach_the_pallas_kernels_from_the_model_config():
  """``GazeConfig.kernel`` (a dict, as a training config gives it) becomes a KernelConfig, and
  the model's Pallas path (both kernel families, interpret mode) gives the xla path's logits."""
  from pallas_kernels.ops import KernelConfig
  gz = GazeConfig(kernel={"kernel": "tpu", "interpret": True, "routed_rows": 8})
  assert gz.kernel == KernelConfig(kernel="tpu", interpret=True, routed_rows=8)
  assert gz == GazeConfig(kernel=KernelConfig(kernel="tpu", interpret=True, routed_rows=8))
  assert hash(gz) == hash(GazeConfig(kernel=gz.kernel))
  with pytest.raises(ValueError, match="GazeConfig.kernel"):
    GazeConfig(kernel={"no_such_field": 1})
  ref = _cfg(top_k=2)
  a = MLLM(ref, rngs=nnx.Rngs(0))
  tokens, layout, images = _batch(a, MIXED, seq_len=160, max_regions=32, max_images=2)
  want = _run(a, tokens, layout, images)
  for kernel in ("gpu", "tpu"):
    cfg = dataclasses.replace(ref, gaze=dataclasses.replace(
        ref.gaze, implementation="pallas", kernel={"kernel": kernel, "interpret": True}))
    _, b = _pair(ref, cfg)
    np.testing.assert_allclose(np.asarray(_run(b, tokens, layout, images)), np.asarray(want),
                               atol=1e-4, err_msg=kernel)
