"""M-RoPE (Qwen2.5-VL contiguous sections, Qwen3-VL interleaved sections) in our decoder.

- The layout's position triples (``TokenLayout.rope_position``) equal transformers'
  ``get_rope_index`` for the same token sequence (one image, two images of different grids, a
  video of several temporal patches), for both families.
- The decoder's logits equal transformers' text model + LM head (tiny random models, float32)
  given the same input embeddings and position ids.
- Gaze at K = all regions equals dense with M-RoPE; decoding with the KV cache equals the full
  forward.

Storage order differs from the token sequence (region-major patches), so our slots are compared
in the order of their 1-D ``position`` (the dense raster sequence) with no context tokens.
"""

import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert.hf import decoder_rules
from gaze_jax.convert.mapping import Rule, load_weights
from gaze_jax.gaze import PAD, Image, LayoutSpec, Text, build_layout
from gaze_jax.gaze.layout import Video
from gaze_jax.model import DecoderConfig, GazeConfig, MLLM, MLLMConfig, VisionConfig, pack_images
from gaze_jax.model.config import FieldError
from gaze_jax.model.generate import generate
from gaze_jax.model.layers import mrope_components
from tests.hf_folders import randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MERGE = 2                # spatial_merge_size: transformers' grid_thw is before the 2x2 merge
TPS = 2                  # tokens_per_second (Qwen2.5-VL video time)
SECTION = (2, 3, 3)      # head_dim 16 -> 8 frequencies
IMAGE, VIDEO, VSTART, VEND = 100, 101, 102, 103
TEXT_KW = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": list(SECTION)})
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
           vision_end_token_id=VEND)


def _hf_model(family: str):
  torch.manual_seed(0)
  if family == "qwen2_5_vl":
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=TEXT_KW, vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            patch_size=4, spatial_merge_size=MERGE, temporal_patch_size=2,
            tokens_per_second=TPS, window_size=16, fullatt_block_indexes=[0]),
        tie_word_embeddings=False, **IDS)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
  else:
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(TEXT_KW, head_dim=16), vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            patch_size=4, spatial_merge_size=MERGE, temporal_patch_size=2,
            num_position_embeddings=16, deepstack_visual_indexes=[0]),
        tie_word_embeddings=False, **IDS)
    model = transformers.Qwen3VLForConditionalGeneration(cfg)
  randomize(model, 1)
  return model.eval()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def hf(request):
  return request.param, _hf_model(request.param)


# ------------------------------------------------------------------ the same sequence twice

# Each case: a list of pieces ("text", n) / ("image", h, w) / ("video", T, h, w, seconds per
# temporal patch), h and w in merged (LLM) tokens. Text runs include the vision start / end
# tokens around each visual piece.
CASES = {
    "one_image": [("text", 3), ("image", 3, 4), ("text", 5)],
    "two_images": [("text", 2), ("image", 4, 2), ("text", 3), ("image", 2, 5), ("text", 4)],
    "video": [("text", 2), ("video", 4, 2, 3, 0.7), ("text", 4)],     # t = 0, 1, 2, 4
    # Time runs past the text after the video (3 * 2 * 2 > max(2, 2) + 1): the generated span
    # starts after the largest position, as transformers' rope_deltas continue.
    "long_video": [("text", 2), ("video", 4, 2, 2, 2.0), ("text", 1)],
}


def hf_inputs(pieces, family):
  """(input_ids [1, L], mm_token_type_ids [1, L], image_grid_thw, video_grid_thw,
  second_per_grid_ts) as the processors write them: Qwen2.5-VL a video as one run of
  ``T x h x w`` tokens, Qwen3-VL one run per frame after a timestamp text."""
  ids, types, images, videos, seconds = [], [], [], [], []
  rng = np.random.default_rng(0)

  def text(n):
    ids.extend(rng.integers(0, 90, n).tolist())
    types.extend([0] * n)

  for p in pieces:
    if p[0] == "text":
      text(p[1])
    elif p[0] == "image":
      _, h, w = p
      ids.extend([IMAGE] * h * w)
      types.extend([1] * h * w)
      images.append([1, h * MERGE, w * MERGE])
    else:
      _, T, h, w, sec = p
      videos.append([T, h * MERGE, w * MERGE])
      seconds.append(sec)
      for k in range(T if family == "qwen3_vl" else 1):
        if family == "qwen3_vl" and k:
          text(3)                                   # "<t seconds>" + vision end / start
        n = h * w * (1 if family == "qwen3_vl" else T)
        ids.extend([VIDEO] * n)
        types.extend([2] * n)
  t = lambda x: None if not x else torch.tensor(x)
  return (torch.tensor([ids]), torch.tensor([types]), t(images), t(videos),
          None if not seconds else torch.tensor(seconds, dtype=torch.float32))


def our_segments(pieces, family, generated: int = 0):
  segs = []
  for p in pieces:
    if p[0] == "text":
      segs.append(Text(p[1]))
    elif p[0] == "image":
      segs.append(Image(p[1], p[2]))
    else:
      _, T, h, w, sec = p
      if family == "qwen3_vl":
        for k in range(T):
          if k:
            segs.append(Text(3))
          segs.append(Video(1, h, w))
      else:
        segs.append(Video(T, h, w, time_interval=TPS * sec))
  if generated:
    segs.append(Text(generated, generated=True))
  return segs


def our_layout(pieces, family, generated=0, seq_len=128, num_ctx=0):
  spec = LayoutSpec(seq_len=seq_len, max_regions=64, max_images=8, region_shape=(2, 2),
                    num_ctx=num_ctx, mrope=True)
  return build_layout([our_segments(pieces, family, generated)], spec)


def sequence_order(layout, b=0):
  """Our non-PAD slots in token-sequence order (by 1-D position)."""
  kind, pos = np.asarray(layout.kind[b]), np.asarray(layout.position[b])
  slots = np.flatnonzero(kind != PAD)
  return slots[np.argsort(pos[slots], kind="stable")]


def hf_positions(model, pieces, family):
  ids, types, img, vid, sec = hf_inputs(pieces, family)
  kw = dict(image_grid_thw=img, video_grid_thw=vid)
  if family == "qwen2_5_vl":
    kw["second_per_grid_ts"] = sec
  pos, deltas = model.model.get_rope_index(ids, types, **kw)
  return pos[:, 0].numpy().T, int(deltas[0, 0]), ids.shape[1]          # [L, 3]


@pytest.mark.parametrize("case", sorted(CASES))
def test_triples_equal_get_rope_index_qwen2_5_vl_qwen3_vl(hf, case):
  family, model = hf
  want, delta, L = hf_positions(model, CASES[case], family)
  layout = our_layout(CASES[case], family, generated=3)
  order = sequence_order(layout)
  got = np.asarray(layout.rope_position[0])[order]
  assert got.shape == (L + 3, 3)
  np.testing.assert_array_equal(got[:L], want)
  # Generated tokens: equal triples from the prompt's max + 1, as generate's rope_deltas give.
  gen = np.arange(L, L + 3) + delta
  np.testing.assert_array_equal(got[L:], np.stack([gen] * 3, axis=1))


# ------------------------------------------------------------------ decoder logits


def our_decoder_model(hf_model, family, gaze=None):
  """An MLLM without vision holding the torch text model's weights (dense by default)."""
  t = hf_model.config.text_config
  dcfg = DecoderConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                       intermediate_size=t.intermediate_size, num_layers=t.num_hidden_layers,
                       num_heads=t.num_attention_heads, num_kv_heads=t.num_key_value_heads,
                       head_dim=16, rope_theta=t.rope_parameters["rope_theta"],
                       rms_norm_eps=t.rms_norm_eps, qkv_bias=family == "qwen2_5_vl",
                       qk_norm=family == "qwen3_vl", mrope_section=SECTION,
                       mrope_interleaved=family == "qwen3_vl")
  gaze = gaze or GazeConfig(attention="dense", num_ctx=0, region_shape=(2, 2))
  model = MLLM(MLLMConfig(decoder=dcfg, gaze=gaze), rngs=nnx.Rngs(0))
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  rules = decoder_rules(dcfg, "model.language_model.", "lm_head.weight")
  if gaze.num_ctx:                # the same context tokens for every model of a comparison
    tensors["ctx"] = np.random.default_rng(3).normal(size=(gaze.num_ctx, t.hidden_size))
    rules.append(Rule("ctx_embed", "ctx"))
  load_weights(model, tensors, rules, {"decoder": dcfg.num_layers},
               allow_unused=("model.visual.",))
  return model


@nnx.jit
def _decoder(model, x, layout):
  return model.decoder(x, layout)[0]


def test_decoder_logits_equal_transformers_qwen2_5_vl_qwen3_vl(hf):
  family, hf_model = hf
  pieces = CASES["two_images"] + [("video", 2, 2, 3, 1.0), ("text", 3)]
  want_pos, _, L = hf_positions(hf_model, pieces, family)
  layout = our_layout(pieces, family)
  order = sequence_order(layout)
  np.testing.assert_array_equal(np.asarray(layout.rope_position[0])[order], want_pos)
  rng = np.random.default_rng(1)
  x_seq = rng.normal(size=(1, L, 64)).astype(np.float32)
  with torch.no_grad():
    h = hf_model.model.language_model(
        inputs_embeds=torch.from_numpy(x_seq),
        position_ids=torch.from_numpy(want_pos.T[:, None, :].copy())).last_hidden_state
    want = hf_model.lm_head(h).numpy()[0]
  x = np.zeros((1, layout.seq_len, 64), np.float32)
  x[0, order] = x_seq[0]
  got = np.asarray(_decoder(our_decoder_model(hf_model, family), x, layout))[0, order]
  diff = float(np.abs(got - want).max())
  print(f"\n[mrope parity] {family}: max abs diff {diff:.2e} (logits up to "
        f"{np.abs(want).max():.1f})")
  assert diff <= 1e-4


# ------------------------------------------------------------------ gaze, decode


def test_gaze_all_regions_equals_dense_with_mrope(hf):
  family, hf_model = hf
  if family != "qwen3_vl":
    pytest.skip("one case")
  pieces = CASES["two_images"] + [("video", 3, 2, 3, 1.0), ("text", 3)]
  # No context tokens: their rows see only their own frame, by design not as dense does.
  layout = our_layout(pieces, family)
  dense = our_decoder_model(hf_model, family)
  gaze = our_decoder_model(hf_model, family, GazeConfig(attention="gaze", top_k=1.0, num_ctx=0,
                                                        region_shape=(2, 2)))
  x = np.random.default_rng(2).normal(size=(1, layout.seq_len, 64)).astype(np.float32)
  valid = np.asarray(layout.kind[0]) != PAD
  a = np.asarray(_decoder(dense, x, layout))[0, valid]
  b = np.asarray(_decoder(gaze, x, layout))[0, valid]
  np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


def test_decode_with_cache_equals_full_forward_mrope():
  """generate (prefill + cached decode steps, gaze routing K=2) against full forwards over the
  sequence with its tokens placed; a long video puts the generated span after a gap."""
  dcfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, mrope_section=(1, 1, 2),
                       mrope_interleaved=False)
  cfg = MLLMConfig(decoder=dcfg, vision=VisionConfig(image_size=16, patch_size=4, hidden_size=16,
                                                     intermediate_size=32, num_layers=1,
                                                     num_heads=2, video_pool=2),
                   gaze=GazeConfig(attention="gaze", top_k=2, region_shape=(2, 2), num_ctx=2))
  model = MLLM(cfg, rngs=nnx.Rngs(0))
  M = 4
  examples = [[Text(3), Image(4, 4), Text(2), Text(M, generated=True)],
              [Text(2), Video(3, 2, 2, time_interval=4.0), Text(1), Text(M + 1, generated=True)]]
  layout = model.build_layout(examples, 96, max_regions=4, max_images=3)
  assert layout.rope_position is not None
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (2, 96)).astype(np.int32)
  img = lambda: rng.normal(size=(16, 16, 3)).astype(np.float32)
  images = pack_images([[img()], [img(), img(), img()]], layout)
  out = generate(model, tokens, layout, images, max_new_tokens=M, return_logits=True)
  first = np.argmax(np.asarray(layout.generated), axis=1)
  full_tokens = tokens.copy()
  for b in range(2):
    full_tokens[b, first[b]:first[b] + M] = np.asarray(out.tokens[b])
  full = np.asarray(nnx.jit(lambda m, t, l, i: m(t, l, i))(model, full_tokens, layout, images))
  for b in range(2):
    want = full[b, first[b] - 1:first[b] + M - 1]
    np.testing.assert_allclose(np.asarray(out.logits[b]), want, atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------ units


def test_mrope_components_match_transformers():
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
  from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
  # A frequency table whose entry [c, d] is c: the recomposed row says which c each d took.
  freq = torch.arange(3.0)[:, None, None, None].expand(3, 1, 1, 32).clone()
  for cls, section, inter in ((Qwen2_5_VLRotaryEmbedding, [8, 12, 12], False),
                              (Qwen3VLTextRotaryEmbedding, [12, 10, 10], True),
                              (Qwen3VLTextRotaryEmbedding, [24, 4, 4], True)):
    emb = cls.__new__(cls)
    emb.mrope_section = section
    want = emb.recomposition_frequencies(freq.clone())[0, 0, :32].long().numpy()
    np.testing.assert_array_equal(mrope_components(32, section, inter), want)


def test_config_checks():
  kw = dict(vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=2,
            num_kv_heads=1)
  assert DecoderConfig(**kw, mrope_section=[2, 3, 3]).mrope_section == (2, 3, 3)   # head_dim 16
  for bad in ((2, 3, 2), (4, 4), (2, 3, 3.0), "abc", (-1, 5, 4)):
    with pytest.raises(FieldError, match="mrope_section"):
      DecoderConfig(**kw, mrope_section=bad)
  with pytest.raises(FieldError, match="mrope_interleaved"):
    DecoderConfig(**kw, mrope_interleaved=True)
  # An M-RoPE model refuses a layout without triples.
  model = MLLM(MLLMConfig(decoder=DecoderConfig(**kw, mrope_section=(2, 3, 3)),
                          gaze=GazeConfig(attention="dense", num_ctx=0)), rngs=nnx.Rngs(0))
  plain = build_layout([[Text(4)]], LayoutSpec(seq_len=8, max_regions=1, max_images=1,
                                               num_ctx=0))
  with pytest.raises(ValueError, match="triples"):
    model(np.zeros((1, 8), np.int32), plain)
  assert model.build_layout([[Text(4)]], 8).rope_position.shape == (1, 8, 3)


def test_layout_features_round_trip_and_text_only_equals_plain_rope():
  spec = LayoutSpec(seq_len=40, max_regions=8, max_images=3, region_shape=(2, 2), num_ctx=1,
                    mrope=True)
  layout = build_layout([[Text(2), Video(2, 2, 4, time_interval=0.7), Text(3)]], spec)
  feats = layout.to_features()
  assert "rope_position" in feats
  back = type(layout).from_features(feats, spec)
  np.testing.assert_array_equal(back.rope_position, layout.rope_position)
  with pytest.raises(ValueError, match="time_interval"):
    build_layout([[Video(2, 2, 2, time_interval=-1.0)]], spec)
  # Text only: triples equal the 1-D positions.
  text = build_layout([[Text(5), Text(3, generated=True)]], spec)
  np.testing.assert_array_equal(text.rope_position[0, :8],
                                np.repeat(np.asarray(text.position[0, :8])[:, None], 3, 1))
