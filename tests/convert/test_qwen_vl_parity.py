"""Qwen2.5-VL and Qwen3-VL end to end: a tiny random transformers model saved to a folder, loaded
through ``plan_hf`` (``model.init=hf:<folder>``), gives the logits of
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` (float32, max abs
diff <= 1e-4) for the same pixel_values, grid_thw and input_ids: one image, two images of
different grids, a video, an image and a video together. Also: gaze at K = all regions equals
dense; the scanned (and rematerialised) decoder with DeepStack equals the loop; prefill equals
the full forward; a jitted call with the static grids equals the eager one; an export of
changed weights loads in transformers with our logits and restores our model exactly.

Our slots are region-major, so logits are compared in the order of the 1-D ``position`` (the
dense sequence), without context tokens (they are not in transformers' sequence).
"""

import dataclasses

import jax
import jax.numpy as jnp

import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert.families import plan_hf
from gaze_jax.convert.hf import build_planned
from gaze_jax.gaze import PAD, PATCH, TEXT, Image, LayoutSpec, Text, build_layout
from gaze_jax.gaze.layout import Video
from gaze_jax.model import GazeConfig
from gaze_jax.model.mllm import QwenPatches
from tests.hf_folders import fine_tuned, randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

P, MERGE, TPS = 4, 2, 2           # patch size, spatial merge, tokens_per_second
PATCH_DIM = 3 * 2 * P * P         # C * temporal_patch_size * P * P
IMAGE, VIDEO, VSTART, VEND = 100, 101, 102, 103
TEXT_KW = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
           vision_end_token_id=VEND)
REGIONS = (2, 2)


def _save(family: str, path):
  torch.manual_seed(0)
  if family == "qwen2_5_vl":
    text = dict(TEXT_KW, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]})
    # Windows of 2 x 2 merged tokens (16 px) at block 0, full attention at block 1.
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            patch_size=P, spatial_merge_size=MERGE, temporal_patch_size=2,
            tokens_per_second=TPS, window_size=16, fullatt_block_indexes=[1]),
        tie_word_embeddings=False, **IDS)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
  else:
    text = dict(TEXT_KW, head_dim=16, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 10000.0,
                                                       "mrope_section": [2, 3, 3]})
    # DeepStack after vision blocks 0 and 1, added after decoder layers 0 and 1 (of 3).
    cfg = transformers.Qwen3VLConfig(
        text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            patch_size=P, spatial_merge_size=MERGE, temporal_patch_size=2,
            num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        tie_word_embeddings=False, **IDS)
    model = transformers.Qwen3VLForConditionalGeneration(cfg)
  randomize(model, 1)
  model.eval()
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def saved(request, tmp_path_factory):
  family = request.param
  path = tmp_path_factory.mktemp(family)
  return family, _save(family, path), path


def _ours(path, gaze=None, **decoder):
  gaze = gaze or GazeConfig(attention="dense", num_ctx=0, region_shape=REGIONS)
  plan = plan_hf(path, gaze)
  if decoder:
    cfg = plan.model
    plan = dataclasses.replace(plan, model=dataclasses.replace(
        cfg, decoder=dataclasses.replace(cfg.decoder, **decoder)))
  return build_planned(plan)


# ------------------------------------------------------------------ one input, both sides

# Pieces: ("text", n) / ("image", h, w) / ("video", T, h, w, seconds per temporal group); h and
# w in merged tokens.
CASES = {
    "one_image": [("text", 3), ("image", 3, 4), ("text", 5)],
    "two_images": [("text", 2), ("image", 4, 2), ("text", 3), ("image", 2, 5), ("text", 4)],
    "video": [("text", 2), ("video", 3, 2, 3, 0.7), ("text", 4)],
    "image_and_video": [("text", 2), ("image", 2, 2), ("text", 2), ("video", 2, 3, 2, 1.0),
                        ("text", 3)],
}


def inputs(pieces, family, seed=0):
  """Both sides' inputs for one sequence: transformers' kwargs and ours (segments, text ids in
  order, per-segment patch rows and grids)."""
  rng = np.random.default_rng(seed)
  ids, types, segs, text_ids = [], [], [], []
  img_rows, img_grid, vid_rows, vid_grid, seconds = [], [], [], [], []
  rows, grids = [], []

  def text(n):
    t = rng.integers(0, 90, n).tolist()
    ids.extend(t)
    types.extend([0] * n)
    text_ids.extend(t)
    segs.append(Text(n))

  for p in pieces:
    if p[0] == "text":
      text(p[1])
    elif p[0] == "image":
      _, h, w = p
      n = h * w * MERGE * MERGE
      x = rng.normal(size=(n, PATCH_DIM)).astype(np.float32)
      img_rows.append(x)
      img_grid.append([1, h * MERGE, w * MERGE])
      rows.append(x)
      grids.append((1, h * MERGE, w * MERGE))
      ids.extend([IMAGE] * h * w)
      types.extend([1] * h * w)
      segs.append(Image(h, w))
    else:
      _, T, h, w, sec = p
      per = h * w * MERGE * MERGE
      x = rng.normal(size=(T * per, PATCH_DIM)).astype(np.float32)
      vid_rows.append(x)
      vid_grid.append([T, h * MERGE, w * MERGE])
      seconds.append(sec)
      if family == "qwen2_5_vl":
        rows.append(x)
        grids.append((T, h * MERGE, w * MERGE))
        ids.extend([VIDEO] * T * h * w)
        types.extend([2] * T * h * w)
        segs.append(Video(T, h, w, time_interval=TPS * sec))
      else:                 # one segment per temporal group, a timestamp text between them
        for k in range(T):
          if k:
            text(3)
          rows.append(x[k * per:(k + 1) * per])
          grids.append((1, h * MERGE, w * MERGE))
          ids.extend([VIDEO] * h * w)
          types.extend([2] * h * w)
          segs.append(Video(1, h, w))
  t = lambda a: torch.from_numpy(np.concatenate(a)) if a else None
  g = lambda a: torch.tensor(a) if a else None
  hf = dict(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]),
            pixel_values=t(img_rows), image_grid_thw=g(img_grid),
            pixel_values_videos=t(vid_rows), video_grid_thw=g(vid_grid))
  if family == "qwen2_5_vl" and seconds:
    hf["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
  return hf, segs, np.asarray(text_ids), rows, grids


def our_batch(segs, text_ids, rows, grids, *, num_ctx=0, seq_len=160, max_images=8):
  spec = LayoutSpec(seq_len=seq_len, max_regions=64, max_images=max_images, region_shape=REGIONS,
                    num_ctx=num_ctx, mrope=True)
  layout = build_layout([segs], spec)
  kind = np.asarray(layout.kind[0])
  order = sequence_order(layout)
  tokens = np.zeros((1, seq_len), np.int32)
  text_slots = order[kind[order] == TEXT]
  tokens[0, text_slots] = text_ids
  patches = np.zeros((1, 512, PATCH_DIM), np.float32)
  flat = np.concatenate(rows)
  patches[0, :len(flat)] = flat
  patch_grids = np.zeros((1, max_images, 3), np.int32)
  patch_grids[0, :len(grids)] = grids
  return tokens, layout, patches, patch_grids, order


def sequence_order(layout, b=0):
  """Our non-PAD, non-context slots in token-sequence order (by 1-D position)."""
  kind, pos = np.asarray(layout.kind[b]), np.asarray(layout.position[b])
  slots = np.flatnonzero((kind == TEXT) | (kind == PATCH))
  return slots[np.argsort(pos[slots], kind="stable")]


def hf_logits(model, hf):
  with torch.no_grad():
    return model(**{k: v for k, v in hf.items() if v is not None}).logits[0].numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_qwen2_5_vl_qwen3_vl(saved, case):
  family, hf_model, path = saved
  hf, segs, text_ids, rows, grids = inputs(CASES[case], family)
  want = hf_logits(hf_model, hf)
  tokens, layout, patches, patch_grids, order = our_batch(segs, text_ids, rows, grids)
  model = _ours(path)
  got = np.asarray(model(tokens, layout, QwenPatches(patches, patch_grids)))[0, order]
  assert got.shape == want.shape
  diff = float(np.abs(got - want).max())
  print(f"\n[qwen-vl parity] {family} {case}: max abs diff {diff:.2e} (logits up to "
        f"{np.abs(want).max():.1f})")
  assert diff <= 1e-4


def test_gaze_all_regions_equals_dense_qwen2_5_vl_qwen3_vl(saved):
  family, _, path = saved
  _, segs, text_ids, rows, grids = inputs(CASES["image_and_video"], family, seed=1)
  tokens, layout, patches, patch_grids, _ = our_batch(segs, text_ids, rows, grids)
  x = QwenPatches(patches, patch_grids)
  dense = np.asarray(_ours(path)(tokens, layout, x))
  gaze = np.asarray(_ours(path, GazeConfig(attention="gaze", top_k=1.0, num_ctx=0,
                                           region_shape=REGIONS))(tokens, layout, x))
  valid = np.asarray(layout.kind[0]) != PAD
  np.testing.assert_allclose(gaze[0, valid], dense[0, valid], atol=1e-4, rtol=1e-4)


def test_scan_remat_prefill_and_jit_equal_the_loop_qwen2_5_vl_qwen3_vl(saved):
  family, _, path = saved
  _, segs, text_ids, rows, grids = inputs(CASES["two_images"], family, seed=2)
  tokens, layout, patches, patch_grids, _ = our_batch(segs, text_ids, rows, grids, num_ctx=2)
  gaze = GazeConfig(attention="gaze", top_k=2, num_ctx=2, region_shape=REGIONS)
  x = QwenPatches(patches, patch_grids)
  valid = np.asarray(layout.kind[0]) != PAD
  base = np.asarray(_ours(path, gaze)(tokens, layout, x))[0, valid]
  for kw in (dict(scan_layers=True), dict(scan_layers=True, remat=True), dict(remat=True)):
    got = np.asarray(_ours(path, gaze, **kw)(tokens, layout, x))[0, valid]
    np.testing.assert_allclose(got, base, atol=1e-5, rtol=1e-5, err_msg=str(kw))
  model = _ours(path, gaze)
  logits, _ = model.prefill(tokens, layout, x)
  np.testing.assert_allclose(np.asarray(logits)[0, valid], base, atol=1e-5, rtol=1e-5)
  jitted = nnx.jit(lambda m, t, l, p: m(t, l, p))(model, tokens, layout,
                                                   QwenPatches.of(patches, patch_grids))
  np.testing.assert_allclose(np.asarray(jitted)[0, valid], base, atol=1e-5, rtol=1e-5)


def test_static_config_grids_inside_jit_qwen3_vl(saved):
  """``MLLMConfig.qwen_grids`` (fixed buckets) serve a traced ``patch_grids``; an example with
  fewer segments than the buckets (zero rows there) gives the same logits."""
  family, _, path = saved
  if family != "qwen3_vl":
    pytest.skip("one family")
  _, segs, text_ids, rows, grids = inputs(CASES["one_image"], family, seed=3)
  tokens, layout, patches, patch_grids, _ = our_batch(segs, text_ids, rows, grids)
  model = _ours(path)
  valid = np.asarray(layout.kind[0]) != PAD
  want = np.asarray(model(tokens, layout, QwenPatches(patches, patch_grids)))[0, valid]
  model.cfg = dataclasses.replace(model.cfg, qwen_grids=tuple(grids) + ((1, 4, 4),))
  got = nnx.jit(lambda m, t, l, p: m(t, l, p))(model, tokens, layout,
                                                QwenPatches(patches, patch_grids))
  np.testing.assert_allclose(np.asarray(got)[0, valid], want, atol=1e-5, rtol=1e-5)


def test_plan_reads_mrope_and_the_tower_qwen2_5_vl_qwen3_vl(saved):
  family, hf_model, path = saved
  cfg = plan_hf(path).model
  assert cfg.vision is None and cfg.qwen_vision.family == family
  assert cfg.decoder.mrope_section == (2, 3, 3)
  assert cfg.decoder.mrope_interleaved == (family == "qwen3_vl")
  assert cfg.decoder.qkv_bias == (family == "qwen2_5_vl")
  assert cfg.decoder.qk_norm == (family == "qwen3_vl")
  assert cfg.qwen_vision.deepstack_visual_indexes == ((0, 1) if family == "qwen3_vl" else ())
  assert cfg.token_pixels == P * MERGE


def test_layout_that_does_not_match_the_grids_is_refused_qwen2_5_vl(saved):
  family, _, path = saved
  if family != "qwen2_5_vl":
    pytest.skip("one family")
  _, segs, text_ids, rows, grids = inputs(CASES["one_image"], family)
  tokens, layout, patches, patch_grids, _ = our_batch(segs, text_ids, rows, grids)
  patch_grids[0, 0] = (1, 4, 6)                # 2 x 3 merged, the layout says 3 x 4
  with pytest.raises(ValueError, match="frame grids"):
    _ours(path)(tokens, layout, QwenPatches(patches, patch_grids))


def test_example_segments_keep_the_video_time_step_qwen2_5_vl():
  """``eval.layouts.example_segments`` rebuilds a Qwen2.5-VL video with a time step that gives
  the same M-RoPE triples (the baselines and generate rebuild layouts from it)."""
  from gaze_jax.eval.layouts import example_segments, spec_for

  spec = LayoutSpec(seq_len=200, max_regions=64, max_images=8, region_shape=REGIONS, num_ctx=2,
                    mrope=True)
  for interval in (TPS * 0.7, 1.0, 4.0, 0.25):
    layout = build_layout([[Text(3), Image(2, 4), Text(2), Video(4, 2, 2, interval), Text(3)]],
                          spec)
    segs = example_segments(layout, 0)
    again = build_layout([segs], spec_for([segs], spec))
    assert again.spec.mrope
    np.testing.assert_array_equal(np.asarray(again.rope_position),
                                  np.asarray(layout.rope_position))


def test_export_of_changed_weights_loads_in_transformers_qwen2_5_vl_qwen3_vl(saved, tmp_path):
  """Every weight changed (as fine-tuning would), exported: transformers loads the folder
  (only the gaze parts unused) and gives our model's logits on an image and a video; ``plan_hf``
  of the export restores our gaze model exactly."""
  from gaze_jax.convert.export import export_hf
  from gaze_jax.convert.mapping import param_paths

  family, _, path = saved
  gaze = GazeConfig(attention="gaze", top_k=2, num_ctx=2, region_shape=REGIONS)
  plan = plan_hf(path, gaze)
  model = fine_tuned(plan, seed=3)
  params = {k: np.asarray(v.get_value()) for k, v in param_paths(model).items()}
  out = tmp_path / "export"
  export_hf(params, plan, out, gaze=gaze)
  cls = (transformers.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
         else transformers.Qwen3VLForConditionalGeneration)
  hf_model, info = cls.from_pretrained(out, output_loading_info=True)
  hf_model.eval()
  assert not info["missing_keys"] and sorted(info["unexpected_keys"]) == ["gaze.ctx_embed"]
  hf, segs, text_ids, rows, grids = inputs(CASES["image_and_video"], family, seed=4)
  want = hf_logits(hf_model, hf)
  tokens, layout, patches, patch_grids, order = our_batch(segs, text_ids, rows, grids)
  # Our changed weights, read back from the export (equal to ``params``: checked below), as
  # the dense model transformers' is.
  back_dense = build_planned(plan_hf(out, GazeConfig(attention="dense", num_ctx=0,
                                                     region_shape=REGIONS)))
  got = np.asarray(back_dense(tokens, layout, QwenPatches(patches, patch_grids)))[0, order]
  diff = float(np.abs(got - want).max())
  print(f"\n[qwen-vl export] {family}: logits vs transformers max abs diff {diff:.2e}")
  assert diff <= 1e-4
  back = {k: np.asarray(v.get_value()) for k, v in
          param_paths(build_planned(plan_hf(out, gaze), seed=99)).items()}
  assert sorted(back) == sorted(params)
  for k in params:
    np.testing.assert_array_equal(back[k], params[k], err_msg=k)


def test_tower_batched_over_examples_equals_packed_and_remat_qwen2_5_vl_qwen3_vl(saved):
  """Examples that share one grid set run the tower vmapped over the batch (the batch axis and
  its sharding stay); it equals the packed run over all examples' rows, and the tower's remat
  gives the same gradient."""
  family, _, path = saved
  model = _ours(path)
  _, _, _, rows, grids = inputs(CASES["image_and_video"], family, seed=5)
  grid = tuple(tuple(int(x) for x in g) for g in grids)
  one = np.concatenate(rows)
  two = np.stack([one, one[::-1] * 0.5])                                  # [2, N, D]
  batched, deep_b = model._qwen_tower_batched(jnp.asarray(two), grid)
  out = model.vision(jnp.asarray(two.reshape(-1, two.shape[-1])), grid * 2)
  packed, deep_p = out if family == "qwen3_vl" else (out, [])
  n = batched.shape[1]
  np.testing.assert_allclose(np.asarray(batched).reshape(2 * n, -1), np.asarray(packed),
                             atol=1e-5, rtol=1e-5)
  for b, p in zip(deep_b, deep_p):
    np.testing.assert_allclose(np.asarray(b).reshape(2 * n, -1), np.asarray(p), atol=1e-5,
                               rtol=1e-5)

  def grads(remat):
    model.vision.remat = remat
    gd, state = nnx.split(model.vision)
    w = jnp.asarray(np.random.default_rng(0).normal(size=packed.shape), jnp.float32)

    def loss(state):
      o = nnx.merge(gd, state)(jnp.asarray(one), grid)
      feats = o[0] if family == "qwen3_vl" else o
      return jnp.sum(feats * w[:feats.shape[0]])
    return jax.grad(loss)(state)

  plain, rematted = grads(False), grads(True)
  model.vision.remat = False
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
  assert any(float(np.abs(np.asarray(a)).max()) > 0 for a in jax.tree.leaves(plain))
