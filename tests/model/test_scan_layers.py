"""``DecoderConfig.scan_layers`` (the decoder layers as one ``nnx.scan``) against the layer loop
on the tiny preset, float32: training loss and the gradient of every parameter, remat on and
off, gaze (xla) and dense; given selections; bf16 compute; the scanned program holds the layer
body once; the large presets scan."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gaze_jax.gaze import TEXT, Image, Text
from gaze_jax.model import MLLM, pack_images
from gaze_jax.model.presets import PRESETS, get_preset, tiny
from gaze_jax.train.step import masked_nll

EXAMPLES = [[Text(3), Image(8, 8), Text(5, generated=True)],
            [Text(4), Image(8, 8), Text(3), Image(8, 8), Text(4, generated=True)]]


def _cfg(attention="gaze", remat=False, scan=False, num_layers=2, dtype="float32"):
  base = tiny()
  dec = dataclasses.replace(base.decoder, remat=remat, scan_layers=scan, num_layers=num_layers)
  gaze = dataclasses.replace(base.gaze, attention=attention, implementation="xla")
  return dataclasses.replace(base, decoder=dec, gaze=gaze, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _weights():
  """The tiny model's state, initialised once (eagerly, which is slow on a CPU) for all tests."""
  return nnx.state(MLLM(_cfg(), rngs=nnx.Rngs(0)))


def _abstract(**kw):
  return nnx.eval_shape(lambda: MLLM(_cfg(**kw), rngs=nnx.Rngs(0)))


def _model(**kw):
  """The model of ``_cfg(**kw)`` with the weights of ``_weights`` (none of the options here
  changes the parameters)."""
  return nnx.merge(nnx.graphdef(_abstract(**kw)), _weights())


@functools.lru_cache(maxsize=None)
def _batch():
  """(tokens, targets, loss mask, layout, images) of EXAMPLES."""
  model, rng = _abstract(), np.random.default_rng(0)
  layout = model.build_layout(EXAMPLES, seq_len=160, max_regions=32, max_images=2)
  images = pack_images([[rng.normal(size=(64, 64, 3)).astype(np.float32)
                         for s in ex if isinstance(s, Image)] for ex in EXAMPLES], layout)
  shape = layout.kind.shape
  tokens = rng.integers(0, model.cfg.decoder.vocab_size, size=shape).astype(np.int32)
  targets = rng.integers(0, model.cfg.decoder.vocab_size, size=shape).astype(np.int32)
  mask = (np.asarray(layout.kind) == TEXT).astype(np.float32)
  return tokens, targets, mask, layout, images


def _loss_and_grads_fn(model, batch, active_k, selections):
  """Masked NLL of the forward, its selected ids and the gradients of all parameters."""
  tokens, targets, mask, layout, images = batch

  def loss_fn(model):
    logits, selected = model(tokens, layout, images, active_k=active_k, return_selected=True,
                             selections=selections)
    return masked_nll(logits, targets, mask)[0], selected

  (loss, selected), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, selected, grads


_loss_and_grads = nnx.jit(_loss_and_grads_fn)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same(got, want, rtol=1e-5):
  """Equal losses, selected ids and gradients, these within ``rtol`` of each array's largest
  entry; the floor is 1e-3 of that of the largest gradient anywhere, since a key bias (the
  ViT's) has a zero gradient in exact arithmetic (softmax ignores a shift shared by all keys):
  its entries are rounding noise."""
  (loss_g, sel_g, grads_g), (loss_w, sel_w, grads_w) = got, want
  np.testing.assert_allclose(loss_g, loss_w, rtol=rtol)
  g, w = _flat(grads_g), _flat(grads_w)
  assert g.keys() == w.keys()
  top = max(np.abs(x).max() for x in w.values())
  for k in w:
    atol = rtol * max(np.abs(w[k]).max(), 1e-3 * top)
    np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol, err_msg=k)
  assert len(sel_g) == len(sel_w)
  for a, b in zip(sel_g, sel_w):
    assert (a is None) == (b is None)
    if a is not None:
      np.testing.assert_array_equal(a, b)


@functools.lru_cache(maxsize=None)
def _reference(attention):
  """The loop's (remat off) loss, selected ids and gradients. remat only recomputes, so this
  one reference also stands for the loop with remat."""
  return _loss_and_grads(_model(attention=attention), _batch(), _k(attention), None)


def _k(attention):
  # A traced K (the progressive schedule) reaches the scan body as a closed-over value.
  return jnp.int32(3) if attention == "gaze" else None


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("attention", ["gaze", "dense"])
def test_scan_gives_the_loss_and_gradients_of_the_loop(attention, remat):
  scan = _model(attention=attention, remat=remat, scan=True)
  want = _reference(attention)
  _assert_same(_loss_and_grads(scan, _batch(), _k(attention), None), want)
  # Every parameter gets a gradient, the decoder layers too: the comparison is not vacuous.
  grads = _flat(want[2])
  assert len(grads) == len(_flat(nnx.state(scan, nnx.Param)))
  assert all(np.abs(g).max() > 0 for k, g in grads.items() if "layers" in k)


def _logits_fn(model, batch, selections=None):
  tokens, _, _, layout, images = batch
  return model(tokens, layout, images, selections=selections)


_logits = nnx.jit(_logits_fn)


def test_scan_over_given_selections():
  loop, scan, batch = _model(), _model(remat=True, scan=True), _batch()
  # Fixed regions per layer (as the KV-eviction baseline gives them), two of the four; the
  # ids are integers, so the forward is what they change.
  sel = [jnp.where(jnp.arange(s.shape[-1]) < 2, s, -1) for s in _reference("gaze")[1]]
  want = np.asarray(_logits(loop, batch, sel))
  np.testing.assert_allclose(_logits(scan, batch, sel), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  # Layer i takes selections[i]: the other order changes the result.
  assert np.abs(want - _logits(scan, batch, sel[::-1])).max() > 1e-3


def test_scan_in_bfloat16_matches_the_loop():
  # The carry keeps the compute dtype through the scan (a dtype change would not trace).
  loop, scan = (_model(remat=True, scan=s, dtype="bfloat16") for s in (False, True))
  batch = _batch()
  real = np.asarray(batch[3].kind) == TEXT
  a, b = np.asarray(_logits(loop, batch))[real], np.asarray(_logits(scan, batch))[real]
  # The two programs round differently (bf16, other fusions); test_model's bf16-vs-f32 bound.
  assert np.abs(a - b).mean() < 0.03 * np.abs(a).mean()


def _ops(batch, op="dot_general", **kw):
  """Occurrences of ``op`` in the jaxpr of the forward of the model of ``_cfg(**kw)`` (a scan
  body prints once)."""
  graphdef, params = nnx.split(_abstract(**kw))
  return str(jax.make_jaxpr(lambda p: _logits_fn(nnx.merge(graphdef, p), batch))(params)).count(op)


def test_scanned_program_holds_the_layer_once():
  batch = _batch()
  # (The loop is counted without remat: the printer shows a repeated remat body once.)
  for scan, remat in [(False, False), (True, False), (True, True)]:
    n2, n8 = (_ops(batch, scan=scan, remat=remat, num_layers=n) for n in (2, 8))
    if scan:
      assert n8 == n2
    else:
      assert n8 > 3 * n2 // 2        # the measure sees layers: the loop repeats them


def test_large_presets_scan():
  scanned = {name for name in PRESETS if get_preset(name).decoder.scan_layers}
  assert scanned == {"cambrian_4b", "qwen2_5_7b", "llava_onevision_0_5b", "qwen2_5_vl_3b",
                     "qwen2_5_vl_7b", "qwen3_vl_4b", "qwen3_vl_8b"}
