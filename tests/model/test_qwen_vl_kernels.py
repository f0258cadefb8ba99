"""Qwen2.5-VL and Qwen3-VL with the Pallas gaze kernels (both kernel families, interpret mode on
CPU) against the xla path: the logits and the gradient of every parameter of a masked
next-token loss, on a tiny random model (float32) fed patch rows (``QwenPatches``) of images and
video frames of several regions each, where routing keeps K = 2 of them.

Qwen3-VL covers interleaved M-RoPE, q/k norm and DeepStack (the features of both vision blocks
added after the first two of three decoder layers); Qwen2.5-VL contiguous M-RoPE, qkv bias,
window attention in the tower and a video of two temporal groups (one segment, M-RoPE time step
1.5). The parity with transformers is tests/convert/test_qwen_vl_parity.py's; here only
kernels == xla."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gaze_jax.gaze import PAD, PATCH, TEXT, Image, Text, Video
from gaze_jax.model import MLLM, GazeConfig, MLLMConfig
from gaze_jax.model.config import DecoderConfig
from gaze_jax.model.mllm import QwenPatches
from gaze_jax.model.qwen_vision import QwenVisionConfig

P, MERGE = 4, 2                    # patch size, spatial merge
REGIONS = (2, 2)                   # merged tokens per gaze region
TOP_K = 2
SEQ_LEN, MAX_REGIONS, MAX_IMAGES = 128, 16, 4
VOCAB, HIDDEN = 128, 64
# Kernel families (interpret mode). Test ids "gpu_interpret" / "tpu_interpret": a bare "gpu"
# or "tpu" id would be taken by tests/conftest.py as a hardware marker and skipped on a CPU.
KERNELS = ("gpu", "tpu")
# The steps are compiled without LLVM's optimisations (both paths alike): XLA's CPU compile is
# most of this file's time, and these options cut it by about half.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _cfg(family: str, **gaze) -> MLLMConfig:
  qwen3 = family == "qwen3_vl"
  # Qwen3-VL: 3 layers, so that both DeepStack levels (added after layers 0 and 1) reach the
  # text rows' loss through a later layer's attention.
  dec = DecoderConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                      num_layers=3 if qwen3 else 2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                      qkv_bias=not qwen3, qk_norm=qwen3, mrope_section=(2, 3, 3),
                      mrope_interleaved=qwen3)
  tower = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=HIDDEN,
               patch_size=P, spatial_merge_size=MERGE, temporal_patch_size=2)
  if qwen3:
    vision = QwenVisionConfig(family=family, hidden_act="gelu_pytorch_tanh",
                              num_position_embeddings=16, deepstack_visual_indexes=(0, 1),
                              **tower)
  else:   # windows of 2 x 2 merged tokens at block 0, full attention at block 1
    vision = QwenVisionConfig(family=family, hidden_act="silu", window_size=2 * MERGE * P,
                              fullatt_block_indexes=(1,), **tower)
  gz = dict(attention="gaze", top_k=TOP_K, region_shape=REGIONS, num_ctx=2)
  gz.update(gaze)
  return MLLMConfig(decoder=dec, qwen_vision=vision, gaze=GazeConfig(**gz))


# Per family: examples of segments (grids in merged tokens). Images of 4, 2 and 6 regions, so
# K = 2 selects; a Qwen2.5-VL video is one segment of t temporal groups, a Qwen3-VL video one
# Image-like segment per group with text between.
EXAMPLES = {
    "qwen3_vl": [
        [Text(3), Image(4, 4), Text(4), Image(2, 4), Text(6)],
        [Text(2), Image(4, 6), Text(3), Video(1, 2, 2), Text(2), Video(1, 2, 2), Text(5)],
    ],
    "qwen2_5_vl": [
        [Text(3), Image(4, 4), Text(4), Image(2, 4), Text(6)],
        [Text(2), Image(4, 6), Text(3), Video(2, 2, 4, time_interval=1.5), Text(5)],
    ],
}


def _batch(model, family, seed=0):
  """tokens, layout, QwenPatches (static grids) for EXAMPLES[family]."""
  rng = np.random.default_rng(seed)
  examples = EXAMPLES[family]
  layout = model.build_layout(examples, seq_len=SEQ_LEN, max_regions=MAX_REGIONS,
                              max_images=MAX_IMAGES)
  dim = model.cfg.qwen_vision.patch_dim
  patches = np.zeros((len(examples), 384, dim), np.float32)
  patch_grids = np.zeros((len(examples), MAX_IMAGES, 3), np.int32)
  for b, ex in enumerate(examples):
    grids = [(s.frames if isinstance(s, Video) else 1, s.gh * MERGE, s.gw * MERGE)
             for s in ex if not isinstance(s, Text)]
    n = sum(t * h * w for t, h, w in grids)
    patches[b, :n] = rng.normal(size=(n, dim))
    patch_grids[b, :len(grids)] = grids
  tokens = rng.integers(0, VOCAB, size=layout.kind.shape).astype(np.int32)
  return tokens, layout, QwenPatches.of(patches, patch_grids)


def _loss_logits_grads(model, batch):
  """Masked mean next-token NLL over the text slots (the trainer's loss), the logits, and the
  gradient of every parameter; one jitted step (the batch closed over, as a concrete layout),
  and its program (the jaxpr's text)."""
  tokens, layout, patches = batch
  text = jnp.asarray(layout.kind)[:, 1:] == TEXT
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest)(tokens, layout, patches)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                         jnp.asarray(tokens)[:, 1:])
    return jnp.sum(ce * text) / jnp.sum(text), logits

  traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(params)
  (value, logits), grads = traced.lower().compile(FAST_COMPILE)(params)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(grads)}
  return float(value), np.asarray(logits), flat, str(traced.jaxpr)


def _model(cfg: MLLMConfig, like=None) -> MLLM:
  """The model of ``cfg`` with ``like``'s parameters, or else random ones of O(1) effect (unit
  norms with noise, non-zero biases, kernels scaled by their fan-in), drawn on the host: an
  eager random init compiles one program per parameter shape (~8 s here)."""
  model = nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
  if like is not None:
    nnx.update(model, nnx.state(like))
    return model
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    r = rng.normal(size=leaf.shape).astype(np.float32)
    if "scale" in name:
      return jnp.asarray(1 + 0.3 * r)
    if "bias" in name:
      return jnp.asarray(0.3 * r)
    if "embed" in name and "patch_embed" not in name:
      return jnp.asarray(0.5 * r)
    return jnp.asarray(r / np.sqrt(np.prod(leaf.shape[:-1])))

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model)))
  return model


_XLA = {}


def _xla(family):
  """The xla reference (model, batch, loss, logits, grads), once per family."""
  if family not in _XLA:
    model = _model(_cfg(family))
    batch = _batch(model, family)
    loss, logits, grads, program = _loss_logits_grads(model, batch)
    assert "pallas_call" not in program
    _XLA[family] = (model, batch, loss, logits, grads)
  return _XLA[family]


def _pallas_equals_xla(family, kernel):
  model, batch, loss_x, logits_x, grads_x = _xla(family)
  cfg = _cfg(family, implementation="pallas", kernel={"kernel": kernel, "interpret": True})
  loss_p, logits_p, grads_p, program = _loss_logits_grads(_model(cfg, like=model), batch)
  # The step holds the kernels of the family asked for (no silent fallback to the xla path):
  # Triton launch parameters for "gpu", Mosaic's dimension semantics for "tpu".
  calls = program.count("pallas_call[")
  assert calls > 0
  mark = {"gpu": "num_warps=", "tpu": "dimension_semantics="}
  assert program.count(mark[kernel]) >= calls, (kernel, calls)
  assert mark["tpu" if kernel == "gpu" else "gpu"] not in program

  real = np.asarray(batch[1].kind) != PAD
  logit_diff = float(np.abs(logits_p - logits_x)[real].max())
  np.testing.assert_allclose(logits_p[real], logits_x[real], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)

  assert grads_p.keys() == grads_x.keys()
  overall = max(float(np.abs(g).max()) for g in grads_x.values())
  grad_diff, grad_rel = 0.0, 0.0
  for name, gx in grads_x.items():
    gp = grads_p[name]
    # Relative to the parameter's own gradient; gradients that are zero up to round-off are
    # compared against the largest one.
    scale = max(float(np.abs(gx).max()), 1e-2 * overall)
    d = float(np.abs(gp - gx).max())
    grad_diff, grad_rel = max(grad_diff, d), max(grad_rel, d / scale)
    np.testing.assert_allclose(gp, gx, atol=1e-4 * scale, rtol=1e-4, err_msg=name)
  print(f"\n[qwen-vl kernels] {family} {kernel} ({calls} pallas_calls): logits max abs diff "
        f"{logit_diff:.2e} (logits up to {np.abs(logits_x[real]).max():.2f}); loss "
        f"{loss_x:.6f} vs {loss_p:.6f}; grads max abs diff {grad_diff:.2e} (relative to the "
        f"parameter's largest: {grad_rel:.2e}; largest grad {overall:.2e}, {len(grads_x)} "
        f"parameters)")


@pytest.mark.parametrize("kernel", KERNELS, ids=[f"{k}_interpret" for k in KERNELS])
def test_pallas_kernels_equal_xla_in_logits_and_every_gradient_qwen3_vl(kernel):
  _pallas_equals_xla("qwen3_vl", kernel)


@pytest.mark.parametrize("kernel", KERNELS, ids=[f"{k}_interpret" for k in KERNELS])
def test_pallas_kernels_equal_xla_in_logits_and_every_gradient_qwen2_5_vl(kernel):
  _pallas_equals_xla("qwen2_5_vl", kernel)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_comparison_is_not_vacuous_qwen2_5_vl_qwen3_vl(family):
  """Routing selects: each example has more regions than K, and the xla path at K = 1
  (``active_k``) gives other logits at every text row after an image. The patches reach the
  loss: every parameter, the tower's and (Qwen3-VL) both DeepStack mergers' included, has a
  non-zero gradient."""
  model, (tokens, layout, patches), _, logits, grads = _xla(family)
  regions = [sum(-(-s.gh // REGIONS[0]) * -(-s.gw // REGIONS[1]) * getattr(s, "frames", 1)
                 for s in ex if not isinstance(s, Text)) for ex in EXAMPLES[family]]
  assert min(regions) > TOP_K, regions
  kind = np.asarray(layout.kind)
  after = np.zeros_like(kind, bool)
  for b in range(kind.shape[0]):
    first = np.flatnonzero(kind[b] == PATCH)[0]
    after[b] = (kind[b] == TEXT) & (np.arange(kind.shape[1]) > first)
  run = nnx.jit(lambda m, t, l, p, k: m(t, l, p, active_k=k))
  same = np.asarray(run(model, tokens, layout, patches, jnp.int32(TOP_K)))
  one = np.asarray(run(model, tokens, layout, patches, jnp.int32(1)))
  real = kind != PAD
  np.testing.assert_allclose(same[real], logits[real], atol=1e-5, rtol=1e-5)
  assert np.abs(one - logits)[after].max(axis=-1).min() > 1e-3
  for name, g in grads.items():
    assert np.abs(g).max() > 0, f"{name} has a zero gradient"
  assert sum("vision" in n for n in grads) > 10, sorted(grads)
  if family == "qwen3_vl":
    assert {n for n in grads if "deepstack_mergers" in n} >= {
        f"['vision']['deepstack_mergers'][{i}]['fc1']['bias'].value" for i in (0, 1)}
