"""Pieces of the trainer checked against independent references (numpy, plain optax):
configs -> model dataclasses, mesh and logical sharding rules, the optimizer's groups and
schedule, the loss, routing statistics, remat, the progressive top-K in one compile, FLOPs and
the metrics writers."""

import dataclasses
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gaze_jax.model import MLLM
from gaze_jax.model.memory import count_params
from gaze_jax.model.presets import get_preset
from gaze_jax.train import config as cfg_lib
from gaze_jax.train import metrics as metrics_lib
from gaze_jax.train import optim, sharding
from gaze_jax.train.step import masked_nll, routing_stats

ml_collections = pytest.importorskip("ml_collections")


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name,preset", [("demo", "tiny"), ("smollm2_135m", "smollm2_135m"),
                                         ("cambrian_4b", "cambrian_4b"),
                                         ("qwen2_5_7b", "qwen2_5_7b")])
def test_recipes_build_the_preset_models(name, preset):
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config()
  run = cfg_lib.run_config(c)
  got = run.model
  want = get_preset(preset)
  if name == "demo":   # 16 px patches, one per region; 4 decoder layers; K = 3, group routing
    want = dataclasses.replace(
        want, vision=dataclasses.replace(want.vision, patch_size=16),
        decoder=dataclasses.replace(want.decoder, num_layers=4),
        gaze=dataclasses.replace(want.gaze, region_shape=(1, 1), top_k=3, routing="group"))
  assert dataclasses.replace(got.decoder, remat=False) == want.decoder
  assert got.vision == want.vision
  assert got.gaze.region_shape == want.gaze.region_shape and got.gaze.num_ctx == want.gaze.num_ctx
  assert got.gaze.routing == want.gaze.routing
  spec = run.spec
  grid = want.vision.image_size // want.vision.patch_size
  rh, rw = want.gaze.region_shape
  assert spec.max_regions >= math.ceil(grid / rh) * math.ceil(grid / rw)
  # With the schedule the trainer compiles K_max = all regions and lowers K; without it (the
  # demo trains sparse from step 0) it compiles the target K.
  train_cfg, plan = run.train_model, run.topk
  start = spec.max_regions if c.topk_schedule.enabled else want.gaze.top_k
  assert plan.gaze and plan.start == start and train_cfg.gaze.top_k == plan.start
  assert plan.target == want.gaze.top_k


def test_study_digits_recipe():
  """The study's digit task: tiny at 4 decoder layers, group routing, K = 2 of the 16 one-digit
  regions, digit_grid with "which" questions only."""
  from configs import study_digits
  c = study_digits.get_config()
  run = cfg_lib.run_config(c)
  m, spec, plan = run.train_model, run.spec, run.topk
  assert m.decoder.num_layers == 4 and m.gaze.routing == "group"
  assert spec.max_regions == 16 and (plan.start, plan.target) == (16, 2)
  assert c.data.name == "digit_grid" and tuple(c.data.builder_overrides.question_types) == (
      "which",)


def test_demo_recipes_share_the_data_and_differ_in_stage():
  """demo_base (dense, from scratch, constant lr), demo_dense and demo (from it, the same steps,
  dense and gaze attention) read the same data. That their parameters match is checked with
  every sweep's init_from pairs (tests/benchmarks/test_study.py, demo_seeds)."""
  from configs import demo, demo_base, demo_dense
  base, dense, gaze = (m.get_config() for m in (demo_base, demo_dense, demo))
  assert (base.model.gaze.attention, dense.model.gaze.attention,
          gaze.model.gaze.attention) == ("dense", "dense", "gaze")
  assert base.optim.end_lr_ratio == 1.0 and gaze.optim.end_lr_ratio < 1.0
  assert dense.train.num_steps == gaze.train.num_steps
  assert base.data.to_dict() == dense.data.to_dict() == gaze.data.to_dict()
  assert tuple(gaze.data.builder_overrides.question_types) == ("where",)


def test_per_example_top_k_keeps_the_ratio_and_ends_the_schedule_at_its_floor():
  """demo (16 regions) at ratio 0.3, per example: the model keeps the ratio (its static K is
  all regions), the schedule runs 16 -> floor(0.3 * 16) = 4, where per_example_k gives each
  example exactly ceil(0.3 * its regions)."""
  from configs import demo
  c = demo.get_config()
  c.topk_schedule.enabled = True     # the demo itself trains sparse from step 0
  c.model.gaze.top_k = 0.3
  c.model.gaze.top_k_per_example = True
  run = cfg_lib.run_config(c)
  m, spec, plan = run.train_model, run.spec, run.topk
  assert m.gaze.top_k == 0.3 and m.gaze.top_k_per_example
  assert (plan.start, plan.target) == (16, 4) and spec.max_regions == 16
  c.model.gaze.top_k = 4
  with pytest.raises(ValueError, match="top_k_per_example needs top_k as a ratio"):
    cfg_lib.run_config(c).topk


def test_dense_recipe_and_config_errors():
  from configs import demo, demo_dense
  c = demo_dense.get_config()
  run = cfg_lib.run_config(c)
  assert run.train_model.gaze.attention == "dense" and not run.topk.gaze
  c = demo.get_config()
  c.topk_schedule.enabled = True
  c.topk_schedule.start = 2          # below the target K=3
  with pytest.raises(ValueError, match="topk_schedule.start"):
    cfg_lib.run_config(c).topk
  with pytest.raises(ValueError, match="unknown fields.*nonsense"):
    cfg_lib.mllm_config({"decoder": {"nonsense": 1}})
  with pytest.raises(AttributeError):           # lock_config: unknown fields are rejected
    c.lock()
    c.train.no_such_field = 1


def test_every_recipe_converts_and_a_hand_built_config_is_refused_naming_its_fields():
  """Every recipe is complete (``run_config`` takes it as it is); a config built by hand
  without some fields, or with unknown ones, is refused with their names, while a run's
  config.json of an older version (``old_run``) takes the defaults of the fields it lacks."""
  import importlib
  from configs import common
  for name in ("demo", "demo_base", "demo_dense", "smollm2_135m", "cambrian_4b", "qwen2_5_7b",
               "study_digits", "study_shapes", "study_where", "study_video", "study_video_base"):
    cfg_lib.run_config(importlib.import_module(f"configs.{name}").get_config())
  d = common.base_config("tiny").to_dict()
  del d["checkpoint"]["fallback"], d["topk_schedule"]
  d["data"]["builder_overrides"] = {"question_types": ("where",)}     # free-form: not compared
  with pytest.raises(ValueError, match=r"mine lacks the fields checkpoint\.fallback, "
                                       r"topk_schedule: build it from configs/common\.py"):
    cfg_lib.run_config(ml_collections.ConfigDict(d), "mine")
  d["train"]["no_such_field"] = 1
  with pytest.raises(ValueError, match=r"has unknown fields train\.no_such_field"):
    cfg_lib.run_config(d, "mine")
  old = cfg_lib.run_config(d, "config.json", old_run=True)
  assert old.checkpoint.fallback is True and not hasattr(old.train, "no_such_field")
  assert dataclasses.asdict(old.topk_schedule) == common.base_config("tiny").topk_schedule.to_dict()


def test_model_imports_without_ml_collections():
  code = ("import sys; import gaze_jax.model, gaze_jax.train.config, gaze_jax.train.step; "
          "assert 'ml_collections' not in sys.modules, 'ml_collections imported'")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ----------------------------------------------------------------------------- sharding

def test_mesh_shape_resolution():
  assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape({"data": -1, "tensor": 3}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"model": 2}, 8)


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_logical_rules_map_names_and_drop_indivisible_axes():
  mesh = _FakeMesh(data=2, fsdp=4, tensor=2)
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), rules, mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("vocab", "embed"), (512, 64), rules, mesh) == P("tensor", "fsdp")
  # 6 is not divisible by fsdp=4: that dimension stays replicated.
  assert sharding.logical_to_spec(("embed", "heads"), (6, 64), rules, mesh) == P(None, "tensor")
  # One mesh axis is used at most once per array.
  assert sharding.logical_to_spec(("embed", "vision_embed"), (8, 8), rules, mesh) == P("fsdp", None)
  assert sharding.batch_spec(rules, mesh) == P(("data", "fsdp"))
  assert sharding.batch_shards(rules, mesh) == 8
  with pytest.raises(ValueError, match="not a mesh axis"):
    sharding.rules_from_config([("embed", "model")])


def test_every_parameter_of_the_real_presets_gets_a_valid_spec():
  mesh = _FakeMesh(data=1, fsdp=8, tensor=4)
  from gaze_jax.train.checkpoint import abstract_params
  for name in ("smollm2_135m", "cambrian_4b"):
    _, state, _ = abstract_params(get_preset(name))
    specs = sharding.param_specs(state, sharding.DEFAULT_RULES, mesh)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    flat_params = jax.tree.leaves(nnx.to_pure_dict(state))
    assert len(flat_specs) == len(flat_params)
    sharded = 0
    for spec, p in zip(flat_specs, flat_params):
      for dim, axes in zip(p.shape, tuple(spec) + (None,) * (len(p.shape) - len(spec))):
        if axes is not None:
          n = np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)])
          assert dim % n == 0
          sharded += 1
    assert sharded > len(flat_params)     # most 2-D weights are sharded on both dims


def test_optimizer_state_shardings_follow_the_parameters():
  """Adam's mu and nu of each trained parameter get its spec, whatever group holds it; the
  step counts get the default; frozen parameters have no state."""
  params = {"vision": {"w": jnp.ones((2, 2))}, "projector": {"w": jnp.ones((2, 3))},
            "decoder": {"w": jnp.ones((4, 2)), "b": jnp.ones((4,))}}
  specs = {"vision": {"w": P("a")}, "projector": {"w": P("b")},
           "decoder": {"w": P("c"), "b": P("d")}}
  tx, _ = optim.make_optimizer(
      _optim(param_groups=(("vision/.*", 0.0), ("projector/.*", 0.5))), params, num_steps=10)
  state = jax.eval_shape(tx.init, params)
  got = sharding.opt_state_shardings(tx, state, specs, "default")
  assert jax.tree.structure(got, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(state)
  mirrored = []
  for path, spec in jax.tree_util.tree_flatten_with_path(
      got, is_leaf=lambda x: isinstance(x, P))[0]:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "mu" in keys or "nu" in keys:
      group, name = keys[-2:]
      assert spec == specs[group][name], (keys, spec)
      mirrored.append(("mu" if "mu" in keys else "nu", group, name))
    else:
      assert spec == "default", keys
  assert sorted(mirrored) == sorted((m, *p) for m in ("mu", "nu") for p in (
      ("projector", "w"), ("decoder", "w"), ("decoder", "b")))


# ----------------------------------------------------------------------------- optimizer

def _optim(**fields):
  """``base_config``'s optim section with these test settings and ``fields`` on top."""
  from configs import common
  o = common.base_config("tiny").optim
  o.update(dict(learning_rate=0.1, warmup_steps=3, end_lr_ratio=0.1, weight_decay=0.0,
                clip_norm=0.0, b1=0.9, b2=0.95, eps=1e-8, param_groups=()))
  o.update(fields)
  return o


def test_schedule_is_linear_warmup_then_cosine():
  lr = optim.learning_rate_schedule(_optim(), num_steps=13)
  want = []
  for s in range(14):
    if s < 3:
      want.append(0.1 * s / 3)
    else:
      frac = (s - 3) / 10
      want.append(0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * frac)))
  np.testing.assert_allclose([float(lr(s)) for s in range(14)], want, rtol=1e-5, atol=1e-7)


def test_param_groups_freeze_scale_and_start_late():
  params = {"vision": {"w": jnp.ones((2, 2))}, "projector": {"w": jnp.ones((2, 2))},
            "decoder": {"w": jnp.ones((2, 2)), "late": jnp.ones((2, 2))}}
  o = _optim(warmup_steps=0, end_lr_ratio=1.0, param_groups=(
      ("vision/.*", 0.0), ("projector/.*", 0.5), ("decoder/late", 1.0, 2)))
  tx, _ = optim.make_optimizer(o, params, num_steps=10)
  assert optim.param_labels(params, o.param_groups) == {
      "vision": {"w": "frozen"}, "projector": {"w": "group1"},
      "decoder": {"w": "default", "late": "group2"}}
  state = tx.init(params)
  ref = optax.adam(0.1, b1=0.9, b2=0.95, eps=1e-8)
  rstate = ref.init(jnp.ones((2, 2)))
  p = params
  g = jnp.asarray([[1.0, -2.0], [0.5, 3.0]])
  ref_p = jnp.ones((2, 2))
  for step in range(3):
    grads = jax.tree.map(lambda _: g, p)
    upd, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, upd)
    rupd, rstate = ref.update(g, rstate, ref_p)
    ref_p = optax.apply_updates(ref_p, rupd)
    np.testing.assert_allclose(p["decoder"]["w"], ref_p, rtol=1e-6)
    np.testing.assert_allclose(p["projector"]["w"] - 1, (ref_p - 1) * 0.5, rtol=1e-5)
    np.testing.assert_array_equal(p["vision"]["w"], 1.0)
    if step < 2:
      np.testing.assert_array_equal(p["decoder"]["late"], 1.0)
  assert not np.allclose(p["decoder"]["late"], 1.0)      # trained from step 2 on
  with pytest.raises(ValueError, match="bad regex"):
    optim.parse_groups([("(", 1.0)])


# ----------------------------------------------------------------------------- loss, stats

def test_masked_nll_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  mask = (rng.random((2, 5)) < 0.5).astype(np.float32)
  mask[0, 0] = 1
  loss, acc, n = masked_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  x = logits.astype(np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(acc), ((x.argmax(-1) == targets) * mask).sum() / mask.sum())
  assert float(n) == mask.sum()


def test_routing_stats_match_a_python_count():
  rng = np.random.default_rng(1)
  layers = []
  for _ in range(2):
    ids = rng.integers(-1, 6, size=(2, 4, 4, 3)).astype(np.int32)
    ids[:, 0] = -1                                  # rows that do not route
    layers.append(ids)
  got = routing_stats([jnp.asarray(x) for x in layers], num_kv_heads=2)
  sel, uni, rows = 0.0, 0.0, 0
  for ids in layers:
    for b in range(2):
      for t in range(4):
        if (ids[b, t] < 0).all():
          continue
        rows += 1
        sel += np.mean([(ids[b, t, h] >= 0).sum() for h in range(4)])
        uni += np.mean([len({int(i) for i in ids[b, t, 2 * g:2 * g + 2].ravel() if i >= 0})
                        for g in range(2)])
  np.testing.assert_allclose(float(got["selected_per_head"]), sel / rows, rtol=1e-6)
  np.testing.assert_allclose(float(got["union_per_kv_head"]), uni / rows, rtol=1e-6)


def _tiny_batch(cfg, B=2, grid=8):
  from gaze_jax.gaze import Image, LayoutSpec, Text, build_layout
  spec = LayoutSpec(seq_len=96, max_regions=(grid // 2) ** 2, max_images=1, region_shape=(2, 2),
                    num_ctx=4)
  layout = build_layout([[Text(5), Image(grid, grid), Text(9), Text(4, generated=True)]] * B,
                        spec)
  rng = np.random.default_rng(0)
  feats = layout.to_features()
  batch = {k: np.asarray(v) for k, v in feats.items()}
  batch["tokens"] = rng.integers(0, 200, size=(B, 96)).astype(np.int32)
  batch["targets"] = rng.integers(0, 200, size=(B, 96)).astype(np.int32)
  batch["loss_mask"] = np.asarray(layout.generated, np.float32)
  size = cfg.vision.image_size
  batch["images"] = rng.normal(size=(B, 1, size, size, 3)).astype(np.float32)
  return spec, batch


def _train_step(cfg, spec, plan, lr=1e-2):
  from gaze_jax.train.checkpoint import abstract_params
  from gaze_jax.train.step import TrainStep
  gd, abs_state, rest = abstract_params(cfg)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(MLLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)))()
  o = _optim(learning_rate=lr, warmup_steps=0)
  tx, lr_fn = optim.make_optimizer(o, params, num_steps=10)
  st = TrainStep(gd, rest, tx, lr_fn, spec, plan, jax.tree.map(lambda _: True, params),
                 cfg.decoder.num_kv_heads)
  return st, {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}


def test_remat_gives_the_same_loss_and_gradients():
  cfg = get_preset("tiny")
  cfg = dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, image_size=32, num_layers=1),
      decoder=dataclasses.replace(cfg.decoder, hidden_size=32, intermediate_size=64,
                                  head_dim=8))
  spec, batch = _tiny_batch(cfg, grid=4)
  plan = cfg_lib.TopKPlan(True, 2, 2, 0, "linear")
  out = []
  for remat in (False, True):
    c = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, remat=remat),
                            gaze=dataclasses.replace(cfg.gaze, top_k=2))
    st, state = _train_step(c, spec, plan)
    (loss, _), g = jax.jit(jax.value_and_grad(st.loss_fn, has_aux=True))(
        state["params"], batch, None)
    out.append((loss, g))
  np.testing.assert_allclose(float(out[0][0]), float(out[1][0]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_progressive_top_k_lowers_routing_k_in_one_compile():
  cfg = get_preset("tiny")
  cfg = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, top_k=16))
  spec, batch = _tiny_batch(cfg)
  plan = cfg_lib.TopKPlan(True, 16, 4, 6, "linear")
  st, state = _train_step(cfg, spec, plan)
  step = jax.jit(st.__call__, donate_argnums=(0,))
  ks, sel = [], []
  for _ in range(8):
    state, m = step(state, batch)
    ks.append(int(m["k"]))
    sel.append(float(m["selected_per_head"]))
  # Independent linear schedule: ceil(16 - 12 * s / 6), clipped at 4.
  want = [max(4, math.ceil(16 - 12 * s / 6 - 1e-4)) for s in range(8)]
  assert ks == want and ks[0] == 16 and ks[-1] == 4
  # Every routed row really selected K regions (16 candidates before the question).
  np.testing.assert_allclose(sel, want)
  assert st.traces == 1


def test_settled_step_compiled_for_the_target_k_matches_the_k_max_step():
  """Past the warm-up the trainer switches to a step compiled with the static target K. At
  the same state it gives the K_max step's loss, metrics and update (K_max = 9 with
  active K = 2 vs static K = 2, on a shrunk tiny model)."""
  cfg = get_preset("tiny")
  cfg = dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, image_size=48, num_layers=1),
      decoder=dataclasses.replace(cfg.decoder, hidden_size=32, intermediate_size=64,
                                  head_dim=8),
      gaze=dataclasses.replace(cfg.gaze, top_k=2))
  spec, batch = _tiny_batch(cfg, grid=6)
  plan = cfg_lib.TopKPlan(True, 9, 2, 6, "linear")
  wide, state = _train_step(dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze,
                                                                              top_k=9)),
                            spec, plan)
  settled, _ = _train_step(cfg, spec, dataclasses.replace(plan, start=2, warmup_steps=0))
  state = {**state, "step": jnp.int32(6)}          # the first step at the target K
  (a_state, a), (b_state, b) = jax.jit(wide.__call__)(state, batch), \
      jax.jit(settled.__call__)(state, batch)
  assert int(a["k"]) == int(b["k"]) == 2
  for key in a:
    np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-5, atol=1e-6, err_msg=key)
  for x, y in zip(jax.tree.leaves(a_state["params"]), jax.tree.leaves(b_state["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  # Every gradient, not only the Adam update (whose first step is about lr * sign(g)).
  ga, gb = (jax.jit(jax.grad(lambda p, st=st: st.loss_fn(p, batch, st.active_k(6))[0]))(
      state["params"]) for st in (wide, settled))
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- FLOPs, logs

def test_train_flops_matmul_part_is_six_n_t():
  from gaze_jax.gaze.accounting import train_flops
  cfg = get_preset("smollm2_135m")
  n = count_params(cfg)
  d = cfg.decoder
  # Matmul parameters of the decoder: all but norms; the tied embedding is the LM head.
  norms = d.num_layers * 2 * d.hidden_size + d.hidden_size
  dec_matmul = n["decoder"] - norms
  B, S = 4, 256
  no_vision = train_flops(cfg, batch=B, seq_len=S, frames=0, patches=0)
  attn = 3 * 2 * B * d.num_layers * d.num_heads * d.head_dim * S * S
  np.testing.assert_allclose(no_vision - attn, 6 * dec_matmul * B * S, rtol=1e-9)
  assert metrics_lib.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics_lib.peak_flops("cpu") is None and metrics_lib.peak_flops("cpu", 1e12) == 1e12


def test_progress_line_has_step_loss_speed_k_eta():
  m = {"loss": 1.2345, "token_accuracy": 0.5, "k": 8, "union_per_kv_head": 9.5, "lr": 1e-3,
       "mfu": 0.41}
  line = metrics_lib.progress_line(120, 600, m, 12345.0, 192)
  assert line == ("step 120/600 | loss 1.2345 | token acc 0.500 | 12.3k tok/s | K 8 | "
                  "union 9.5 | lr 1.0e-03 | MFU 41.0% | ETA 03:12")
  assert "\r" not in line
  m = {"loss": 1.0, "token_accuracy": 0.25, "k": 0, "lr": 0.0}     # dense: no K; no MFU
  line = metrics_lib.progress_line(1, 7200, m, 950.0, None)
  assert line == ("step 1/7200 | loss 1.0000 | token acc 0.250 | 950 tok/s | lr 0.0e+00 | "
                  "ETA -- (first step: compiling)")
  assert metrics_lib.progress_line(2, 7200, m, 2.5e6, 3725.0).endswith(
      "2.50M tok/s | lr 0.0e+00 | ETA 1:02:05")


def _event_scalars(logdir) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in ``logdir``, read by TensorBoard's own reader, or by
  TensorFlow's where tensorboard is not installed."""
  try:
    from tensorboard.backend.event_processing import event_accumulator
  except ImportError:
    tf = pytest.importorskip("tensorflow", reason="neither tensorboard nor tensorflow installed")
    return [(ev.step, v.tag, v.simple_value) for f in sorted(logdir.iterdir())
            for ev in tf.compat.v1.train.summary_iterator(str(f)) for v in ev.summary.value]
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return [(e.step, tag, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


def test_metrics_logger_writes_jsonl_and_event_files_tensorboard_reads(tmp_path):
  log = metrics_lib.MetricsLogger(tmp_path)
  log.write(3, {"loss": 1.5, "k": 4.0, "mfu": None})
  log.write(7, {"loss": 0.25})
  log.write(7, {"exact_match": 0.5}, prefix="eval")
  log.close()
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 3, "split": "train", "loss": 1.5, "k": 4.0},
                   {"step": 7, "split": "train", "loss": 0.25},
                   {"step": 7, "split": "eval", "exact_match": 0.5}]
  got = sorted(_event_scalars(tmp_path / "tb"))
  assert got == [(3, "train/k", 4.0), (3, "train/loss", 1.5), (7, "eval/exact_match", 0.5),
                 (7, "train/loss", 0.25)]
  # Other processes write nothing.
  other = tmp_path / "other"
  metrics_lib.MetricsLogger(other, enabled=False).write(1, {"loss": 1.0})
  assert not other.exists()


def test_metrics_logger_drops_the_records_a_resumed_run_redoes(tmp_path):
  """Killed after logging steps 5 and 6 (and half a line) with its checkpoint at step 4: the run
  resumed from step 4 logs 5 and 6 again, and each step appears once, in the JSONL file and in
  what TensorBoard reads."""
  log = metrics_lib.MetricsLogger(tmp_path)
  for step in (2, 4, 5, 6):
    log.write(step, {"loss": float(step)})
  log.write(4, {"exact_match": 0.5}, prefix="eval")
  log.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "spl')
  log = metrics_lib.MetricsLogger(tmp_path, start_step=4)
  assert log.dropped == 3
  for step in (5, 6):
    log.write(step, {"loss": 10.0 + step})
  log.close()
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in lines] == [(2, "train"), (4, "train"), (4, "eval"),
                                                      (5, "train"), (6, "train")]
  assert lines[-1]["loss"] == 16.0
  got = sorted(x for x in _event_scalars(tmp_path / "tb") if x[1] == "train/loss")
  assert got == [(2, "train/loss", 2.0), (4, "train/loss", 4.0), (5, "train/loss", 15.0),
                 (6, "train/loss", 16.0)]
  # Nothing past the step: the file is left as it is.
  assert metrics_lib.drop_records_after(tmp_path / "metrics.jsonl", 6) == 0


def test_training_features_check_ids_against_the_model_vocabulary():
  """The pipeline's FeatureConfig carries the model's vocabulary size, so a tokenizer id past
  it is refused in the data pipeline instead of clamped by the embedding."""
  from configs import demo
  from gaze_jax.train.config import run_config
  from gaze_jax.train.data import feature_config

  run = run_config(demo.get_config())
  assert feature_config(run, run.model, run.spec).vocab_size == run.model.decoder.vocab_size
