"""The jitted train step: loss on answer tokens, AdamW update, progressive top-K, metrics.

Train state (a plain pytree, what the checkpoints hold)::

  {"params": pure dict of float32 master weights (nnx.to_pure_dict layout),
   "opt_state": optax state, "step": int32 scalar (optimizer steps done)}

The model's graph definition is static; the step merges it with the params
(``nnx.merge``), so ``jax.jit`` sees only arrays. K of the progressive schedule is computed
from ``state["step"]`` inside the step (a traced int fed as ``active_k`` under the static
K_max): lowering K never recompiles. ``TrainStep.traces`` counts Python traces.

Metrics (float32 scalars; the rules are ``gaze_jax.metrics``, shared with the evaluation):
``loss`` (mean NLL of answer tokens), ``token_accuracy`` (argmax hit rate on answer tokens),
``answer_tokens``, ``grad_norm`` (global, trainable params, before clipping), ``lr`` (base
schedule), ``k`` (active K; 0 for dense), ``finite`` (1 when the loss and the gradient norm are
finite; with ``skip_nonfinite`` a step where they are not keeps the old parameters and optimizer
state), and for gaze ``selected_per_head`` (valid ids per routed row and query head, = K when enough regions are
candidates) and ``union_per_kv_head`` (distinct regions a KV head serves for one routed row,
``selected_union_size``), averaged over layers, KV heads and routed rows of this step's own
forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gaze_jax.gaze.layout import LayoutSpec, TokenLayout
from gaze_jax.gaze.schedules import progressive_top_k
from gaze_jax.metrics import exact_match, masked_nll, routing_stats
from gaze_jax.model.mllm import QwenPatches
from gaze_jax.model.partitioning import activation_rules
from gaze_jax.train import sharding as shard_lib
from gaze_jax.train.config import TopKPlan


def batch_layout(batch: Mapping[str, jax.Array], spec: LayoutSpec) -> TokenLayout:
  return TokenLayout.from_features(batch, spec)


def visual_input(batch: Mapping[str, Any], cfg) -> Any:
  """The model's visual input from a batch: ``images [B, F, H, W, C]``, or for a Qwen-VL model
  (``cfg.qwen_vision``) its patch rows as a ``QwenPatches`` (the batch's own when
  ``step_batch`` put one there with static grids, else one whose grids come from
  ``cfg.qwen_grids``); None for a text-only model."""
  if cfg.qwen_vision is not None:
    if isinstance(batch.get("images"), QwenPatches):
      return batch["images"]
    return QwenPatches(batch["patches"], batch["patch_grids"])
  return batch.get("images") if cfg.vision is not None else None


def step_batch(batch: Mapping[str, np.ndarray], sharding, cfg) -> dict:
  """This host's batch -> the global batch a step takes (``sharding.shard_batch``). A Qwen-VL
  model without fixed grids (``cfg.qwen_grids`` empty: several buckets) gets the batch's
  patches as a ``QwenPatches`` whose static grids are read here from the host's
  ``patch_grids``: jit compiles one step per distinct set of grids (single process only:
  ``check_static_grids``)."""
  out = shard_lib.shard_batch(batch, sharding)
  if cfg.qwen_vision is not None and not cfg.qwen_grids and "patch_grids" in batch:
    out["images"] = QwenPatches.for_model(out["patches"], out["patch_grids"], cfg.qwen_grids,
                                          host_grids=batch["patch_grids"])
  return out


def check_static_grids(cfg, process_count: int) -> None:
  """Refuses a multi-process run of a Qwen-VL model without fixed grids: each host would
  compile the step for its own examples' grids (one bucket per run: ``data.buckets``)."""
  if cfg.qwen_vision is not None and not cfg.qwen_grids and process_count > 1:
    raise ValueError(f"config.data.buckets: a Qwen-VL run on {process_count} processes needs "
                     "one bucket (every host's step must compile for the same grids); several "
                     "buckets train on one process only")


class MeshJit:
  """A jitted function that traces, lowers and runs under ``mesh`` (``jax.set_mesh`` can only
  be entered outside ``jax.jit``) and the activation ``rules``."""

  def __init__(self, fn, mesh, rules=None):
    self.fn, self.mesh, self.rules = fn, mesh, rules

  def _context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(activation_rules(self.rules))
    return stack

  def __call__(self, *args):
    with self._context():
      return self.fn(*args)

  def lower(self, *args):
    with self._context():
      return self.fn.lower(*args)


class TrainStep:
  """Builds the (un-jitted) step and its jitted form with shardings.

  Args:
    graphdef: the model's ``nnx.GraphDef`` (from ``nnx.split(model, nnx.Param, ...)``).
    rest: the model's non-Param state (usually empty).
    tx: optax transformation; lr_fn: base learning-rate schedule (logging).
    spec: LayoutSpec of the batches; plan: the top-K plan.
    trainable: bool tree like params (False = frozen for the whole run: gradient dropped).
    num_kv_heads: Hkv of the decoder (routing statistics).
    rules: logical axis rules; the jitted step constrains the model's activations by them.
  """

  def __init__(self, graphdef, rest, tx: optax.GradientTransformation, lr_fn: Callable,
               spec: LayoutSpec, plan: TopKPlan, trainable: Any, num_kv_heads: int,
               rules=None, skip_nonfinite: bool = False):
    self.graphdef, self.rest, self.tx, self.lr_fn = graphdef, rest, tx, lr_fn
    self.spec, self.plan, self.trainable = spec, plan, trainable
    self.num_kv_heads, self.rules = num_kv_heads, rules
    self.skip_nonfinite = skip_nonfinite
    self.traces = 0

  def active_k(self, step) -> Optional[jax.Array]:
    p = self.plan
    if not p.gaze:
      return None
    return progressive_top_k(step, start=p.start, target=p.target, warmup_steps=p.warmup_steps,
                             shape=p.shape)

  def loss_fn(self, params, batch, active_k):
    model = nnx.merge(self.graphdef, params, self.rest)
    layout = batch_layout(batch, self.spec)
    images = visual_input(batch, model.cfg)
    out = model(batch["tokens"], layout, images, active_k=active_k,
                return_selected=self.plan.gaze)
    logits, selected = out if self.plan.gaze else (out, None)
    loss, acc, n = masked_nll(logits, batch["targets"], batch["loss_mask"])
    aux = {"token_accuracy": acc, "answer_tokens": n}
    if selected is not None:
      aux.update(routing_stats(selected, self.num_kv_heads))
    return loss, aux

  def __call__(self, state: dict, batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
    """One optimizer step: ``(state, batch) -> (new state, metrics)``."""
    self.traces += 1
    step = state["step"]
    k = self.active_k(step)
    (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state["params"], batch, k)
    # Frozen parameters: drop their gradients (XLA then skips computing them).
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, self.trainable)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if self.skip_nonfinite:
      # The update of a non-finite step is dropped, as optax.apply_if_finite drops it; done here
      # so that the optimizer state keeps its structure (a run may switch modes on resume).
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state["params"], state["opt_state"]))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": jnp.asarray(self.lr_fn(step), jnp.float32),
               "k": jnp.asarray(0 if k is None else k, jnp.float32), "finite": finite, **aux}
    new_state = {"params": params, "opt_state": opt_state, "step": step + 1}
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  def jit(self, state_shardings, batch_shardings, metric_sharding) -> Callable:
    """``jax.jit`` of the step with explicit shardings; the old state is donated. It traces and
    runs under the shardings' mesh (``jax.set_mesh``), from which the Pallas kernels take the
    axes of their ``shard_map``: without it XLA would gather their inputs."""
    fn = jax.jit(self.__call__, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))
    return MeshJit(fn, metric_sharding.mesh, self.rules)

  def eval_fn(self, params, batch, active_k=None):
    """Teacher-forced answer metrics on one batch (no update): ``loss``, ``token_accuracy``
    and ``exact_match`` (fraction of examples whose answer tokens are all argmax-correct)."""
    model = nnx.merge(self.graphdef, params, self.rest)
    layout = batch_layout(batch, self.spec)
    images = visual_input(batch, model.cfg)
    logits = model(batch["tokens"], layout, images, active_k=active_k)
    loss, acc, n = masked_nll(logits, batch["targets"], batch["loss_mask"])
    match, has = exact_match(jnp.argmax(logits, -1), batch["targets"], batch["loss_mask"] > 0)
    exact = jnp.sum(match.astype(jnp.float32)) / jnp.maximum(jnp.sum(has), 1)
    return {"loss": loss, "token_accuracy": acc, "exact_match": exact, "answer_tokens": n,
            "examples": jnp.sum(has).astype(jnp.float32)}
