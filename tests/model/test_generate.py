"""Tests of ``generate``: the compiled prefill + decode loop against full-sequence forwards
(logits and greedy tokens), stop tokens, sampling, no retracing, and argument errors.

References are independent of the decode path: full forwards of ``MLLM.__call__`` over the
whole sequence and numpy re-implementations of the softmax / nucleus set.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gaze_jax.gaze import Image, Text
from gaze_jax.model import MLLM, DecoderConfig, GazeConfig, MLLMConfig, VisionConfig, pack_images
from gaze_jax.model.generate import generate, generated_span, nucleus_mask, sample_logits

M = 6                    # max_new_tokens of the shared runs
# Long enough that generate cuts the text-and-context key list (to 128 slots, for_decoding):
# its prefill then takes the patch rows from the dense kernel, and its steps read the cut list.
SEQ_LEN = 192
GAZE_CONFIGS = {
    "dense": GazeConfig(attention="dense", num_ctx=0, region_shape=(2, 2)),
    # K=2 of 4 regions per image (8 for the two-image example): routing really drops regions.
    "gaze": GazeConfig(attention="gaze", top_k=2, region_shape=(2, 2), num_ctx=2),
}


def make_model(gaze: GazeConfig, seed: int = 0, hidden_size: int = 32) -> MLLM:
  """A 2-layer decoder of 4 query and 2 KV heads (head dim ``hidden_size / 4``), 16 px images of
  4 px patches."""
  cfg = MLLMConfig(
      decoder=DecoderConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2),
      vision=VisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2),
      gaze=gaze)
  return MLLM(cfg, rngs=nnx.Rngs(seed))


def make_batch(model, prompts=((3, 4), (1, 2, 6)), spans=(M, M + 2), seed=0):
  """Batch of 2 with different prompt lengths: example 0 ``[Text, Image, Text, gen]``, example 1
  ``[Text, Image, Text, Image, Text, gen]``. Returns (tokens [B, S], layout, images)."""
  (a0, a1), (b0, b1, b2) = prompts
  examples = [
      [Text(a0), Image(4, 4), Text(a1), Text(spans[0], generated=True)],
      [Text(b0), Image(4, 4), Text(b1), Image(4, 4), Text(b2), Text(spans[1], generated=True)],
  ]
  layout = model.build_layout(examples, SEQ_LEN, max_regions=8, max_images=2)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (2, SEQ_LEN)).astype(np.int32)
  img = lambda: rng.normal(size=(16, 16, 3)).astype(np.float32)
  images = pack_images([[img()], [img(), img()]], layout)
  return tokens, layout, images


_FORWARDS = {}


def forward(model, tokens, layout, images) -> np.ndarray:
  """Full-sequence logits ``[B, S, V]`` (the training forward, no cache); one jitted function
  per model structure."""
  graphdef, state = nnx.split(model)
  if graphdef not in _FORWARDS:
    _FORWARDS[graphdef] = jax.jit(lambda s, t, l, i: nnx.merge(graphdef, s)(t, l, i))
  return np.asarray(_FORWARDS[graphdef](state, tokens, layout, images))


def place(tokens, layout, new, lengths=None):
  """Copy of tokens with ``new [B, m]`` written at each example's generated slots."""
  first, _ = generated_span(layout)
  out = np.array(tokens)
  for b in range(out.shape[0]):
    n = new.shape[1] if lengths is None else int(lengths[b])
    out[b, first[b]:first[b] + n] = np.asarray(new[b, :n])
  return out


@pytest.fixture(scope="module", params=sorted(GAZE_CONFIGS))
def setup(request):
  """(model, tokens, layout, images, greedy GenerateOutput with logits) for one config."""
  model = make_model(GAZE_CONFIGS[request.param])
  tokens, layout, images = make_batch(model)
  out = generate(model, tokens, layout, images, max_new_tokens=M, return_logits=True)
  return model, tokens, layout, images, out


@pytest.fixture(scope="module")
def dense_setup():
  model = make_model(GAZE_CONFIGS["dense"])
  tokens, layout, images = make_batch(model)
  out = generate(model, tokens, layout, images, max_new_tokens=M, return_logits=True)
  return model, tokens, layout, images, out


# ------------------------------------------------------------------ decode == full forward


def test_layout_has_different_first_generated_slots(setup):
  _, _, layout, _, _ = setup
  first, count = generated_span(layout)
  assert first[0] != first[1]          # the batch really exercises per-example slots
  assert count.tolist() == [M, M + 2]
  assert layout.for_decoding().spec.max_nonvisual == 128 < SEQ_LEN


def test_step_logits_equal_full_forward(setup):
  """The logits behind token j equal the full forward's logits at the slot before token j."""
  model, tokens, layout, images, out = setup
  assert out.tokens.shape == (2, M) and out.tokens.dtype == jnp.int32
  assert out.logits.shape == (2, M, 64)
  assert out.lengths.tolist() == [M, M] and int(out.num_steps) == M
  full = forward(model, place(tokens, layout, out.tokens), layout, images)
  first, _ = generated_span(layout)
  for b in range(2):
    ref = full[b, first[b] - 1:first[b] + M - 1]            # slots preceding each new token
    np.testing.assert_allclose(np.asarray(out.logits[b]), ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref.argmax(-1))


def test_greedy_equals_naive_loop_of_full_forwards(setup):
  model, tokens, layout, images, out = setup
  first, _ = generated_span(layout)
  cur = np.array(tokens)
  naive = np.zeros((2, M), np.int32)
  for j in range(M):
    logits = forward(model, cur, layout, images)
    for b in range(2):
      naive[b, j] = logits[b, first[b] + j - 1].argmax()
      cur[b, first[b] + j] = naive[b, j]
  np.testing.assert_array_equal(np.asarray(out.tokens), naive)


def test_placeholder_tokens_in_reserved_span_do_not_matter(setup):
  """Ids stored at the reserved slots are overwritten while decoding, never read; they may
  even lie outside the vocabulary (only the prompt's ids are checked)."""
  model, tokens, layout, images, out = setup
  first, count = generated_span(layout)
  junk = np.array(tokens)
  for b in range(2):
    junk[b, first[b]:first[b] + count[b]] = (junk[b, first[b]:first[b] + count[b]] + 17) % 64
  junk[0, first[0]], junk[1, first[1] + 1] = -1, 1000
  again = generate(model, junk, layout, images, max_new_tokens=M, return_logits=True)
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
  np.testing.assert_allclose(np.asarray(again.logits), np.asarray(out.logits), atol=1e-5)


# ------------------------------------------------------------------ stop tokens


def test_stop_token_stops_one_example(setup):
  model, tokens, layout, images, out = setup
  greedy = np.asarray(out.tokens)
  # A token that example 0 emits first at step j (0 < j < M-1) and example 1 never emits.
  cands = [(j, int(t)) for j, t in enumerate(greedy[0]) if 0 < j < M - 1
           and t not in greedy[0, :j] and t not in greedy[1]]
  if not cands:
    pytest.fail(f"no usable stop token in greedy outputs {greedy.tolist()}; change the seed")
  j, stop = cands[0]
  res = generate(model, tokens, layout, images, max_new_tokens=M, stop_tokens=(stop,),
                 pad_id=-1, return_logits=True)
  toks = np.asarray(res.tokens)
  np.testing.assert_array_equal(toks[0, :j + 1], greedy[0, :j + 1])   # stop token included
  assert (toks[0, j + 1:] == -1).all()
  np.testing.assert_array_equal(toks[1], greedy[1])                   # the other continues
  assert res.lengths.tolist() == [j + 1, M]
  assert int(res.num_steps) == M


def test_loop_exits_early_when_all_examples_stopped(setup):
  model, tokens, layout, images, out = setup
  greedy = np.asarray(out.tokens)
  stops = {int(greedy[0, 2]), int(greedy[1, 1])}
  # Expected length: first step whose greedy token is a stop, plus one.
  want = [next(j for j in range(M) if greedy[b, j] in stops) + 1 for b in range(2)]
  assert max(want) < M
  res = generate(model, tokens, layout, images, max_new_tokens=M, stop_tokens=sorted(stops),
                 pad_id=63, return_logits=True)
  assert res.lengths.tolist() == want
  assert int(res.num_steps) == max(want)            # no step after everyone stopped
  toks = np.asarray(res.tokens)
  for b in range(2):
    np.testing.assert_array_equal(toks[b, :want[b]], greedy[b, :want[b]])
    assert (toks[b, want[b]:] == 63).all()
  # Steps that never ran leave zero logits.
  assert not np.asarray(res.logits[:, max(want):]).any()


# ------------------------------------------------------------------ sampling


def test_tiny_top_p_is_greedy(dense_setup):
  model, tokens, layout, images, out = dense_setup
  for seed in (0, 1):
    res = generate(model, tokens, layout, images, max_new_tokens=M, temperature=1.0,
                   top_p=1e-6, rng=jax.random.key(seed), return_logits=True)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(out.tokens))


def test_same_key_same_tokens_other_keys_differ(dense_setup):
  model, tokens, layout, images, _ = dense_setup
  run = lambda seed: np.asarray(generate(
      model, tokens, layout, images, max_new_tokens=M, temperature=2.0,
      rng=jax.random.key(seed), return_logits=True).tokens)
  a = run(3)
  np.testing.assert_array_equal(a, run(3))
  assert any((run(s) != a).any() for s in (4, 5, 6))


def _np_nucleus(logits, temperature, top_p):
  """numpy reference: the smallest most-probable set with probability >= top_p."""
  z = logits / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
  keep = np.zeros(p.shape, bool)
  keep[order[:n]] = True
  return p, keep


def test_sampled_tokens_lie_in_nucleus_and_logits_match_forward(dense_setup):
  model, tokens, layout, images, _ = dense_setup
  first, _ = generated_span(layout)
  T, P = 0.7, 0.6
  outside_top1 = 0
  for seed in range(3):
    res = generate(model, tokens, layout, images, max_new_tokens=M, temperature=T, top_p=P,
                   rng=jax.random.key(seed), return_logits=True)
    toks, logits = np.asarray(res.tokens), np.asarray(res.logits)
    full = forward(model, place(tokens, layout, toks), layout, images)
    for b in range(2):
      np.testing.assert_allclose(logits[b], full[b, first[b] - 1:first[b] + M - 1], atol=1e-4)
      for j in range(M):
        p, keep = _np_nucleus(logits[b, j], T, P)
        assert keep[toks[b, j]], (seed, b, j, p[toks[b, j]])
        outside_top1 += int(toks[b, j] != p.argmax())
  assert outside_top1 > 0              # it really sampled, not just argmax


def test_sample_logits_distribution():
  """Empirical frequencies of sample_logits match the renormalised numpy nucleus."""
  logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  for T, P in ((0.8, 0.7), (1.3, 1.0)):
    draw = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, T, P)[0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=8) / n
    p, keep = _np_nucleus(np.asarray(logits[0]), T, P)
    want = np.where(keep, p, 0.0)
    want /= want.sum()
    assert (counts[~keep] == 0).all()
    np.testing.assert_allclose(counts, want, atol=0.03)


def test_nucleus_mask_keeps_top_token_and_reaches_mass():
  probs = jnp.asarray([[0.05, 0.6, 0.3, 0.05], [0.1, 0.2, 0.3, 0.4]])
  np.testing.assert_array_equal(np.asarray(nucleus_mask(probs, 0.5)),
                                [[False, True, False, False], [False, False, True, True]])
  np.testing.assert_array_equal(np.asarray(nucleus_mask(probs, 0.85)),
                                [[False, True, True, False], [False, True, True, True]])
  np.testing.assert_array_equal(np.asarray(nucleus_mask(probs, 1e-9)),
                                [[False, True, False, False], [False, False, False, True]])
  # Tokens tied with the last kept one are kept too (no arbitrary tie-break by sort order).
  np.testing.assert_array_equal(np.asarray(nucleus_mask(jnp.full((1, 4), 0.25), 0.5)),
                                [[True, True, True, True]])


# ------------------------------------------------------------------ compilation


def test_no_retrace_for_new_values_of_same_shapes(monkeypatch):
  model = make_model(GAZE_CONFIGS["dense"], seed=1)
  traces = []
  orig = MLLM.prefill

  def counting_prefill(self, *args, **kwargs):   # runs only while tracing
    traces.append(1)
    return orig(self, *args, **kwargs)

  monkeypatch.setattr(MLLM, "prefill", counting_prefill)
  m = 3                 # a max_new_tokens no other test compiles, so the first call traces
  t1, l1, i1 = make_batch(model, spans=(m, m), seed=0)
  generate(model, t1, l1, i1, max_new_tokens=m, stop_tokens=(5,))
  assert len(traces) == 1
  # New values of the same shapes: other prompt lengths, tokens, images, stops, and weights.
  t2, l2, i2 = make_batch(model, prompts=((5, 2), (2, 3, 1)), spans=(m, m + 4), seed=1)
  other = make_model(GAZE_CONFIGS["dense"], seed=2)
  res = generate(other, t2, l2, i2, max_new_tokens=m, stop_tokens=(7, 9))
  assert len(traces) == 1
  assert res.tokens.shape == (2, m)
  # A new static option does retrace (the counter works).
  generate(model, t1, l1, i1, max_new_tokens=m, return_logits=True)
  assert len(traces) == 2


# ------------------------------------------------------------------ errors


def test_errors(dense_setup):
  model, tokens, layout, images, _ = dense_setup
  kw = dict(max_new_tokens=M)
  build = lambda ex: model.build_layout(ex, SEQ_LEN, max_regions=8, max_images=2)
  with pytest.raises(ValueError, match="exceeds the generated span reserved.*example 0"):
    generate(model, tokens, layout, images, max_new_tokens=M + 1)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
    generate(model, tokens, layout, images, max_new_tokens=0)
  with pytest.raises(ValueError, match="example 1: the layout has no generated span"):
    generate(model, tokens, build([[Text(3), Text(M, True)], [Text(9)]]), None, **kw)
  with pytest.raises(ValueError, match="example 0: the generated span starts at slot 0"):
    generate(model, tokens, build([[Text(M, True)], [Text(2), Text(M, True)]]), None, **kw)
  with pytest.raises(ValueError, match="not one contiguous span"):
    generate(model, tokens, build([[Text(2), Text(M, True), Text(1), Text(M, True)]] * 2),
             None, **kw)
  with pytest.raises(ValueError, match="must be the last segment"):
    generate(model, tokens, build([[Text(2), Text(M, True), Text(3)]] * 2), None, **kw)
  with pytest.raises(ValueError, match="images is None"):
    generate(model, tokens, layout, None, **kw)
  with pytest.raises(ValueError, match="no image/frame placeholders"):
    generate(model, tokens, build([[Text(2), Text(M, True)]] * 2), images, **kw)
  with pytest.raises(ValueError, match="tokens must be"):
    generate(model, tokens[:, :10], layout, images, **kw)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    generate(model, tokens, layout, images, temperature=0.5, **kw)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    generate(model, tokens, layout, images, temperature=-1.0, rng=jax.random.key(0), **kw)
  with pytest.raises(ValueError, match="top_p must be in"):
    generate(model, tokens, layout, images, temperature=1.0, top_p=0.0,
             rng=jax.random.key(0), **kw)
  with pytest.raises(ValueError, match=r"stop_tokens \[64\] are outside"):
    generate(model, tokens, layout, images, stop_tokens=(3, 64), **kw)
  with pytest.raises(ValueError, match="layout must be a TokenLayout"):
    generate(model, tokens, {"kind": tokens}, images, **kw)
  # Prompt ids outside the vocabulary (were clamped: 64 gave the logits of 63, -7 those of 0).
  for bad_id in (64, -7):
    bad = np.array(tokens)
    bad[1, 0] = bad_id                                  # example 1 starts with Text(1)
    with pytest.raises(ValueError, match=rf"tokens: 1 ids outside the model's vocabulary "
                       rf"\[0, 64\): {bad_id} at tokens\[1, 0\]"):
      generate(model, bad, layout, images, **kw)


def test_decode_with_the_plan_built_once_equals_decode(setup):
  """``decode_plan`` (the layout-only part, built once for a decode loop) gives the steps the
  logits they compute on their own, for other rows than it was built for; a plan of other
  options is refused."""
  from gaze_jax.gaze.plan import build_plan

  model, tokens, layout, images, _ = setup
  lay = layout.for_decoding()
  _, caches = model.prefill(jnp.asarray(tokens), lay, jnp.asarray(images))
  first, _ = generated_span(layout)
  qi = jnp.asarray(first, jnp.int32)[:, None]
  tok = jnp.asarray([[5], [7]], jnp.int32)
  alone, _ = model.decode(tok, qi, lay, caches)
  base = model.decode_plan(lay, qi + 1)
  reused, _ = model.decode(tok, qi, lay, caches, plan_base=base)
  np.testing.assert_array_equal(np.asarray(reused), np.asarray(alone))
  if base is not None:
    with pytest.raises(ValueError, match="reuse: the plan was built for implementation='xla'"):
      build_plan(lay, qi, implementation="reference", reuse=base)
