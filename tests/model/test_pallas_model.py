"""The model with the Pallas kernels (interpret mode on CPU) against the xla path: the loss and
the gradient of every parameter of a training step (the gaze kernels, and the dense model's
splash attention against XLA's); and the attention plan, built once per forward pass for all
layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gaze_jax.gaze import TEXT
from gaze_jax.model import MLLM
from tests.model.test_model import MIXED, _batch, _cfg, _pair


def _loss_fn(tokens, layout, images):
  """Next-token cross-entropy over the text slots, as the trainer's loss."""
  text = jnp.asarray(layout.kind)[:, 1:] == TEXT

  def loss(model):
    logits = model(tokens, layout, images)[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tokens)[:, 1:])
    return jnp.sum(ce * text) / jnp.sum(text)

  return loss


def _loss_and_grads(model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params):
    return jax.value_and_grad(lambda p: _loss_fn(*batch)(nnx.merge(graphdef, p, rest)))(params)

  return step(params)


def _with(cfg, **gaze):
  return dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, **gaze))


# Images, a video (pooled frames), GQA 2 (4 query / 2 KV heads); head routing on the generic
# kernels, group routing on the Mosaic kernels (both in interpret mode).
@pytest.mark.parametrize("routing,kernel", [("head", "gpu"), ("group", "tpu")])
def test_pallas_model_matches_xla_in_loss_and_every_gradient(routing, kernel):
  ref = _with(_cfg(top_k=2), routing=routing)
  pallas = _with(ref, implementation="pallas", kernel={"kernel": kernel, "interpret": True})
  _assert_same_loss_and_grads(*_pair(ref, pallas))


def test_dense_model_with_splash_matches_xla_in_loss_and_every_gradient(monkeypatch):
  from pallas_kernels import splash as splash_lib
  calls = _count_calls(monkeypatch, splash_lib, "causal")
  ref = _with(_cfg(top_k=2), attention="dense")
  splash = _with(ref, kernel={"dense_rows": "splash"})
  _assert_same_loss_and_grads(*_pair(ref, splash))
  assert len(calls) == splash.decoder.num_layers           # every layer, traced once


def _assert_same_loss_and_grads(a, b):
  """Models a and b (the same parameters) give the same loss and gradients on a batch of
  images and a video."""
  batch = _batch(a, MIXED, seq_len=160, max_regions=32, max_images=2)
  loss_a, g_a = _loss_and_grads(a, batch)
  loss_b, g_b = _loss_and_grads(b, batch)
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
  flat_a = dict(jax.tree_util.tree_leaves_with_path(g_a))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(g_b))
  assert flat_a.keys() == flat_b.keys()
  assert len(flat_a) > 20
  overall = max(float(np.max(np.abs(g))) for g in flat_a.values())
  for path, ga in flat_a.items():
    ga, gb = np.asarray(ga), np.asarray(flat_b[path])
    # Relative to the parameter's own gradient; gradients that are zero up to round-off
    # (~1e-10) are compared against the largest one.
    atol = max(1e-4 * float(np.max(np.abs(ga))), 1e-6 * overall)
    np.testing.assert_allclose(gb, ga, atol=atol, rtol=1e-3, err_msg=jax.tree_util.keystr(path))


def _count_calls(monkeypatch, module, name):
  calls = []
  fn = getattr(module, name)

  def counted(*a, **kw):
    calls.append(1)
    return fn(*a, **kw)

  monkeypatch.setattr(module, name, counted)
  return calls


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_the_plan_is_built_once_per_step(monkeypatch, implementation):
  """Tracing a training step (forward and backward) of a 3-layer model builds the layout's
  block table (pallas) or looks up the query and key fields (xla: two ``token_info``) once,
  not once per layer. (A layer loop without
  remat or scan: those trace the layer body once and would hide a per-layer rebuild.)"""
  from gaze_jax.gaze import plan as plan_lib
  from pallas_kernels import blocks
  cfg = _with(_cfg(top_k=2), implementation=implementation, kernel={"interpret": True})
  cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, num_layers=3,
                                                             remat=False))
  builds = (_count_calls(monkeypatch, blocks, "build_kv_blocks") if implementation == "pallas"
            else _count_calls(monkeypatch, plan_lib, "token_info"))
  model = nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = _batch(model, MIXED, seq_len=160, max_regions=32, max_images=2)
  jax.eval_shape(jax.value_and_grad(lambda p: _loss_fn(*batch)(nnx.merge(graphdef, p, rest))),
                 params)
  want = 1 if implementation == "pallas" else 2
  assert len(builds) == want, f"{len(builds)} builds for 3 layers"


def test_a_plan_for_other_options_is_refused():
  from gaze_jax.gaze import build_plan, gaze_attention
  from tests.gaze.random_cases import random_case
  case = random_case(3)
  plan = build_plan(case.layout, route_prompt=False)
  with pytest.raises(ValueError, match="route_prompt=False"):
    gaze_attention(case.q, case.k, case.v, case.q_route, case.k_route, case.layout, top_k=1,
                   route_prompt=True, plan=plan)
