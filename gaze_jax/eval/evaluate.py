"""``evaluate``: accuracy, visual KV budget, routing accuracy and decode FLOPs of a gaze model
and its baselines on one split.

For each batch (a dict of stacked features from ``gaze_jax.data``, or a ``ModelInputs``):

* ``gaze`` (the model as given): one jitted teacher-forced forward with the routing choices
  (``return_selected``) -> exact match (see ``metrics``), token accuracy and answer NLL,
  measured visual KV entries, routing accuracy against ``gt_regions``;
* ``dense``: the dense twin (same weights, ``bl.dense_twin``) on the same batch;
* ``token_matched``: the dense twin on downsampled images (``bl.token_matched_inputs``);
* ``fixed_from_question``: two passes, regions fixed at the last prompt row;
* ``random_routing``: the model with random regions at the same K (``bl.random_selections``;
  a fresh draw per batch and layer from ``random_seed``);
* each baseline is one ``Baseline`` entry of ``REGISTRY``: the model it runs (e.g. the dense
  twin), the batch it sees (e.g. downsampled images) and its teacher-forced pass;
* optionally (``text=TextGeneration(...)`` with a tokenizer) greedy generation of each example's
  first answer with ``gaze_jax.model.generate`` and normalised text exact match.

The result is a plain dict (JSON-ready after ``report.to_jsonable``) that ``write_report``
renders. Gaze maps for the first examples can be written along the way (``gaze_maps=GazeMaps``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.data.features import ModelInputs, batch_to_model_inputs
from gaze_jax.eval import baselines as bl
from gaze_jax.eval import layouts, metrics
from gaze_jax.eval.budget import configured_budget, measured_flops
from gaze_jax.eval.gaze_maps import write_batch_gaze_maps
from gaze_jax.eval.prior import by_group
from gaze_jax.eval.text import decode, text_exact_match
from gaze_jax.gaze.layout import PATCH, TEXT, LayoutSpec
from gaze_jax.metrics import target_logp
from gaze_jax.model.decoder import check_token_ids
from gaze_jax.model.generate import generate
from gaze_jax.model.mllm import QwenPatches

# ------------------------------------------------------------------ compiled forwards


def _outputs(logits, targets):
  """Argmax ids ``[B, S]`` and the log-probability of each target ``[B, S]`` (the vocabulary
  axis never leaves the device)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), target_logp(logits, targets)


def _model_jit(fn, static_argnames=()):
  """``fn(model, *args)`` compiled as the train step and ``generate`` are: ``jax.jit`` over the
  model's ``nnx.split`` state, its graph definition static (the compile cache key, with
  ``static_argnames``); the model is merged inside the trace and not mutated."""
  def merged(graphdef, state, *args, **kwargs):
    return fn(nnx.merge(graphdef, state), *args, **kwargs)

  jitted = jax.jit(merged, static_argnums=(0,), static_argnames=static_argnames)

  @functools.wraps(fn)
  def call(model, *args, **kwargs):
    graphdef, state = nnx.split(model)
    return jitted(graphdef, state, *args, **kwargs)
  return call


def _run(model, tokens, layout, images, targets, return_selected=False):
  """The model's own pass: outputs and (with ``return_selected``) its selections."""
  out = model(tokens, layout, images, return_selected=return_selected)
  logits, selected = out if return_selected else (out, None)
  pred, tgt = _outputs(logits, targets)
  return pred, tgt, selected


def _run_given(model, tokens, layout, images, targets, selections):
  """A pass with the given per-layer selections: outputs and the ids actually applied."""
  logits, applied = model(tokens, layout, images, selections=selections, return_selected=True)
  pred, tgt = _outputs(logits, targets)
  return pred, tgt, applied


def _run_fixed(model, tokens, route_layout, layout, images, targets, anchor_rows):
  """Fixed-from-question: route once (first pass), copy each answer row's anchor selection,
  then run with those selections. Returns the second pass's outputs and applied ids."""
  _, selected = model(tokens, route_layout, images, return_selected=True)
  return _run_given(model, tokens, layout, images, targets,
                    bl.fixed_selections(selected, anchor_rows))


_forward = _model_jit(_run, static_argnames=("return_selected",))
_forward_given = _model_jit(_run_given)
_forward_fixed = _model_jit(_run_fixed)


def predict_random_routing(model, inputs: ModelInputs, key: jax.Array):
  """The random-routing baseline's pass: like ``predict`` with ``return_selected``, the ids
  being the random regions attended at routed rows."""
  if not _is_gaze(model):
    raise ValueError("the random-routing baseline needs a gaze model")
  sel = bl.random_selections(model.cfg, inputs.layout, key)
  pred, tgt, applied = _forward_given(model, jnp.asarray(inputs.tokens, jnp.int32),
                                      inputs.layout, _images_for(model, inputs),
                                      jnp.asarray(inputs.targets, jnp.int32), sel)
  return np.asarray(pred), np.asarray(tgt), [np.asarray(s) for s in applied]


def predict(model, inputs: ModelInputs, *, return_selected: bool = False):
  """One teacher-forced pass: ``(pred int32[B, S], target_logp float32[B, S], selected)`` as
  numpy (``selected``: per layer ``[B, S, Hq, K]`` ids, or None)."""
  images = _images_for(model, inputs)
  pred, tgt, sel = _forward(model, jnp.asarray(inputs.tokens, jnp.int32), inputs.layout, images,
                            jnp.asarray(inputs.targets, jnp.int32),
                            return_selected=bool(return_selected and _is_gaze(model)))
  return np.asarray(pred), np.asarray(tgt), (None if sel is None else [np.asarray(s) for s in sel])


def predict_fixed_from_question(model, inputs: ModelInputs):
  """The fixed-from-question baseline's pass: like ``predict`` with ``return_selected``, the ids
  being the regions actually attended (the anchors' at answer rows)."""
  if not _is_gaze(model):
    raise ValueError("the fixed-from-question baseline needs a gaze model")
  anchors = layouts.question_anchor_rows(inputs.layout)
  route_layout = bl.routing_layout(inputs.layout, anchors, model.cfg.gaze.route_prompt)
  pred, tgt, sel = _forward_fixed(model, jnp.asarray(inputs.tokens, jnp.int32), route_layout,
                                  inputs.layout, _images_for(model, inputs),
                                  jnp.asarray(inputs.targets, jnp.int32),
                                  jnp.asarray(anchors, jnp.int32))
  return np.asarray(pred), np.asarray(tgt), [np.asarray(s) for s in sel]


def _is_gaze(model) -> bool:
  return model.cfg.gaze.attention == "gaze"


def _images_for(model, inputs: ModelInputs):
  """The images (a Qwen-VL model: its patch rows, ``QwenPatches``), or None for a text-only
  model or a batch without patches. Patch rows carry static grids: the model's fixed
  ``qwen_grids`` when it has them (one compile), else the batch's own (one per distinct set)."""
  if not model.cfg.has_vision or inputs.images is None:
    return None
  if not (np.asarray(inputs.layout.kind) == PATCH).any():
    return None
  if model.cfg.qwen_vision is not None:
    px = inputs.images
    return QwenPatches.for_model(jnp.asarray(px.patches), jnp.asarray(px.grids),
                                 model.cfg.qwen_grids, host_grids=px.grids)
  return jnp.asarray(inputs.images)


# ------------------------------------------------------------------ generation


def generate_answers(model, inputs: ModelInputs, *, max_new_tokens: Optional[int] = None,
                     extra_tokens: int = 8, stop_tokens: Sequence[int] = (), pad_id: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """Greedy answers to each example's first question.

  The prompt is every segment before the example's first generated span; a
  ``Text(max_new_tokens, generated=True)`` span is reserved after it. ``max_new_tokens``
  defaults to the longest first reference answer (its end token included) plus
  ``extra_tokens``.

  Returns ``(tokens int32[B, M], lengths int32[B], references)`` with ``references[b]`` the
  token ids of example b's first reference answer (end token included).
  """
  lay = inputs.layout
  B = np.asarray(lay.kind).shape[0]
  refs = [_first_answer(inputs, b) for b in range(B)]
  M = int(max_new_tokens or max(len(r) for r in refs) + extra_tokens)
  segs = [layouts.prompt_segments(layouts.example_segments(lay, b), M) for b in range(B)]
  spec = layouts.spec_for(segs, lay.spec)
  prompt = layouts.relayout(inputs, segs, spec)
  out = generate(model, prompt.tokens, prompt.layout, _images_for(model, prompt),
                 max_new_tokens=M, stop_tokens=tuple(stop_tokens), pad_id=pad_id)
  return np.asarray(out.tokens), np.asarray(out.lengths), refs


def _first_answer(inputs: ModelInputs, b: int) -> np.ndarray:
  """Targets of example b's first run of answer rows (the first answer and its end token)."""
  rows = np.flatnonzero(np.asarray(inputs.loss_mask)[b] > 0)
  if rows.size == 0:
    return np.zeros(0, np.int32)
  # Answer rows of one answer are consecutive text slots; a later answer starts after a gap.
  pos = np.asarray(inputs.layout.position)[b, rows]
  cut = np.flatnonzero(np.diff(pos) != 1)
  end = cut[0] + 1 if cut.size else rows.size
  return np.asarray(inputs.targets)[b, rows[:end]]


# ------------------------------------------------------------------ accumulation


class _Acc:
  """Sums of one model variant over the batches of a split."""

  def __init__(self, name: str, cfg, fixed: bool = False):
    self.name, self.cfg, self.fixed = name, cfg, fixed
    self.examples = self.correct = 0
    self.tokens_right = self.tokens = 0
    self.nll = 0.0
    self.kv = metrics.KVStats()
    self.dense_kv = metrics.KVStats()
    self.routing: Optional[metrics.RoutingStats] = None
    self.configured: list[tuple[int, dict]] = []
    self.text_examples = self.text_correct = 0
    self.samples: list[dict] = []
    self.seconds = 0.0
    self.hits: list[bool] = []               # per example, in batch order
    self.extra: dict[str, Any] = {}

  def add(self, inputs: ModelInputs, pred, tgt_logp, selected):
    match, has = metrics.teacher_forced_exact_match(pred, inputs.targets, inputs.loss_mask)
    self.examples += int(has.sum())
    self.correct += int(match.sum())
    self.hits += [bool(m and h) for m, h in zip(np.asarray(match), np.asarray(has))]
    right, total = metrics.token_accuracy(pred, inputs.targets, inputs.loss_mask)
    self.tokens_right += right
    self.tokens += total
    mask = np.asarray(inputs.loss_mask) > 0
    self.nll += float(-(np.asarray(tgt_logp)[mask]).sum())
    rows = metrics.answer_rows(inputs.loss_mask)
    self.dense_kv += metrics.dense_kv_entries(inputs.layout, rows)
    if selected is None:
      self.kv += metrics.dense_kv_entries(inputs.layout, rows)
    else:
      gz = self.cfg.gaze
      self.kv += metrics.routed_kv_entries(selected, inputs.layout, rows,
                                           route_prompt=gz.route_prompt,
                                           num_kv_heads=self.cfg.decoder.num_kv_heads,
                                           scores_routing=not self.fixed)
      stats = metrics.routing_accuracy(selected, inputs.gt_regions, inputs.layout, rows,
                                       inputs.object_regions)
      self.routing = stats if self.routing is None else self.routing + stats
    conf = configured_budget(self.cfg, inputs.layout)
    self.configured.append((conf["examples"], conf))

  def add_text(self, predictions: Sequence[str], references: Sequence[str], num_samples: int):
    for p, r in zip(predictions, references):
      ok = text_exact_match(p, r)
      self.text_examples += 1
      self.text_correct += int(ok)
      if len(self.samples) < num_samples:
        self.samples.append({"prediction": p, "reference": r, "match": bool(ok)})

  def _configured(self) -> dict[str, Any]:
    """Example-weighted means of the per-batch configured budgets."""
    items = [(n, c) for n, c in self.configured if n]
    if not items:
      return {}
    w = np.array([n for n, _ in items], np.float64)
    mean = lambda key: float(np.dot(w, [c[key] for _, c in items]) / w.sum())
    flops = {k: float(np.dot(w, [c["flops"][k] for _, c in items]) / w.sum())
             for k in ("regions", "context", "routing")}
    if self.fixed:                      # regions are chosen once, not scored per decode query
      flops["routing"] = 0.0
    flops["total"] = flops["regions"] + flops["context"] + flops["routing"]
    return {"visual_kv": mean("visual_kv"), "dense_visual_kv": mean("dense_visual_kv"),
            "patches": mean("patches"), "frames": mean("frames"), "top_k": items[0][1]["top_k"],
            "region_size": items[0][1]["region_size"], "num_ctx": items[0][1]["num_ctx"],
            "flops": flops}

  def result(self, dense_entries: float, groups: Optional[Sequence[str]] = None
             ) -> dict[str, Any]:
    kv = self.kv.mean_entries
    conf = self._configured()
    fl = measured_flops(self.cfg, kv if math.isfinite(kv) else 0.0, self.kv.mean_candidates)
    ref = dense_entries
    exact = self.correct / self.examples if self.examples else float("nan")
    out = {
        "name": self.name,
        "attention": self.cfg.gaze.attention,
        "examples": self.examples,
        "exact_match": exact,
        "accuracy": exact,             # the same exact match, for readers of older results
        "token_accuracy": self.tokens_right / self.tokens if self.tokens else float("nan"),
        "answer_nll": self.nll / self.tokens if self.tokens else float("nan"),
        "visual_kv": {
            "measured": kv,
            "configured": conf.get("visual_kv", float("nan")),
            "dense_measured": ref,
            "fraction_of_dense": kv / ref if ref else float("nan"),
            "kv_head_union_regions": self.kv.mean_union,
            "routing_candidates": self.kv.mean_candidates,
        },
        "flops": {"measured": fl, "configured": conf.get("flops", {})},
        "attention_gflops_per_query": fl["total"] / 1e9,
        "configured": conf,
        "seconds": self.seconds,
    }
    if self.routing is not None:
      out["routing"] = self.routing.summary()
    if self.text_examples:
      out["text_accuracy"] = self.text_correct / self.text_examples
      out["text_examples"] = self.text_examples
      out["samples"] = self.samples
    if groups is not None:
      out["by_type"] = by_group(self.hits, groups)
    out.update(self.extra)
    return out


# ------------------------------------------------------------------ the rows


@dataclasses.dataclass(frozen=True)
class BatchContext:
  """What a row's transforms may read besides the model and the batch."""
  index: int                          # the batch's number, from 1
  random_seed: int
  token_matched_grid: Optional[int]

  @property
  def key(self) -> jax.Array:
    """This batch's PRNG key: a fresh random draw per batch."""
    return jax.random.fold_in(jax.random.PRNGKey(self.random_seed), self.index)


def _same_model(model):
  return model


def _same_inputs(model, inputs: ModelInputs, ctx: BatchContext):
  return inputs, {}


def _token_matched(model, inputs: ModelInputs, ctx: BatchContext):
  small, match = bl.token_matched_inputs(model, inputs, grid=ctx.token_matched_grid)
  return small, {"token_match": {
      "grid": list(match.grid), "image_hw": list(match.image_hw),
      "visual_tokens": match.visual_tokens, "target_tokens": match.target_tokens}}


def _needs_gaze(model) -> Optional[str]:
  return None if _is_gaze(model) else "needs a gaze model (the model is dense)"


def _needs_gaze_and_square_images(model) -> Optional[str]:
  """The token-matched twin resizes square images: a SigLIP-style tower's (a Qwen-VL model's
  bucketed patch rows are not resized)."""
  return _needs_gaze(model) or (None if model.cfg.vision is not None
                                else "needs a vision tower that takes square images")


def _not_dense(model) -> Optional[str]:
  return None if _is_gaze(model) else "the model is dense already"


@dataclasses.dataclass(frozen=True)
class Baseline:
  """One row of the evaluation, computed from the evaluated model's weights.

  name: the row's key in ``baselines``, the results and ``TextGeneration.variants``.
  skip: ``model -> reason or None``: why the row cannot be computed for this model.
  model: ``model -> model`` the row runs (built once per ``evaluate`` and shared by the rows
    with the same transform: one dense twin).
  inputs: ``(evaluated model, inputs, ctx) -> (inputs, extra)``: the batch the row sees and
    fields for its result (the last batch's).
  predict: ``(model, inputs, ctx) -> (pred [B, S], target_logp [B, S], selected)``: its
    teacher-forced pass, ``selected`` the regions attended per layer (None for dense rows).
  fixed: the regions are chosen beforehand: decoding scores no candidates.
  text: ``TextGeneration`` can generate its answers.
  """
  name: str
  predict: Callable
  skip: Callable = lambda model: None
  model: Callable = _same_model
  inputs: Callable = _same_inputs
  fixed: bool = False
  text: bool = False


# The evaluated model itself: the first row (named by ``evaluate``'s ``name``), "gaze" in
# ``TextGeneration.variants``.
MAIN = Baseline("gaze", lambda m, x, ctx: predict(m, x, return_selected=True), text=True)

# A new baseline is one entry; ``evaluate`` runs the requested ones in the order asked.
REGISTRY = (
    Baseline("dense", lambda m, x, ctx: predict(m, x), skip=_not_dense, model=bl.dense_twin,
             text=True),
    Baseline("token_matched", lambda m, x, ctx: predict(m, x), skip=_needs_gaze_and_square_images,
             model=bl.dense_twin, inputs=_token_matched, text=True),
    Baseline("fixed_from_question", lambda m, x, ctx: predict_fixed_from_question(m, x),
             skip=_needs_gaze, fixed=True),
    Baseline("random_routing", lambda m, x, ctx: predict_random_routing(m, x, ctx.key),
             skip=_needs_gaze, fixed=True),
)
BASELINES = tuple(b.name for b in REGISTRY)


def _plan_rows(model, baselines: Sequence[str], name: str
               ) -> tuple[list[tuple[str, Baseline]], dict[str, str]]:
  """The rows ``(row name, entry)`` in the order of the results (the main model first, then
  each requested baseline once, in the order asked) and the skipped baselines with reasons."""
  by_name = {b.name: b for b in REGISTRY}
  unknown = set(baselines) - set(by_name)
  if unknown:
    raise ValueError(f"unknown baselines {sorted(unknown)}; known: {BASELINES}")
  rows, skipped = [(name, MAIN)], {}
  for b in dict.fromkeys(baselines):
    reason = by_name[b].skip(model)
    if reason:
      skipped[b] = reason
    else:
      rows.append((b, by_name[b]))
  if name in [r for r, _ in rows[1:]]:
    raise ValueError(f"name={name!r} is also the name of a baseline row; pick another")
  return rows, skipped


def _to_inputs(batch, spec: Optional[LayoutSpec]) -> ModelInputs:
  if isinstance(batch, ModelInputs):
    return batch
  if isinstance(batch, Mapping):
    if spec is None:
      raise ValueError("batches are feature dicts: pass the LayoutSpec they were built with "
                       "(spec=...)")
    return batch_to_model_inputs(batch, spec)
  raise ValueError(f"a batch must be a feature dict or a ModelInputs, got {type(batch).__name__}")


# ------------------------------------------------------------------ the entry point


@dataclasses.dataclass(frozen=True)
class TextGeneration:
  """``evaluate(text=...)``: greedy generation of each example's first answer for the rows
  ``variants`` (of "gaze", "dense", "token_matched"), scored by normalised text exact match.
  ``max_new_tokens`` defaults to the longest reference + 8; ``num_samples`` (prediction,
  reference) pairs are kept per row."""
  variants: Sequence[str] = ("gaze", "dense")
  max_new_tokens: Optional[int] = None
  num_samples: int = 8


@dataclasses.dataclass(frozen=True)
class GazeMaps:
  """``evaluate(gaze_maps=...)``: gaze-map PNGs of the first ``count`` examples in ``out_dir``
  (the layers ``layers`` side by side, default all; ``tokens`` answer rows each; the question,
  the predicted and the true answer above). ``image_mean`` / ``image_std``: the images'
  normalisation, undone for drawing."""
  out_dir: Union[str, Path]
  count: int = 4
  layers: Optional[Sequence[int]] = None
  tokens: int = 4
  image_mean: tuple = (0.5, 0.5, 0.5)
  image_std: tuple = (0.5, 0.5, 0.5)


def evaluate(model, batches: Iterable, spec: Optional[LayoutSpec] = None, *,
             baselines: Sequence[str] = BASELINES, split: str = "eval", name: str = "gaze",
             max_batches: Optional[int] = None, token_matched_grid: Optional[int] = None,
             tokenizer=None, text: Optional[TextGeneration] = None,
             gaze_maps: Optional[GazeMaps] = None, groups: Optional[Sequence[str]] = None,
             random_seed: int = 0, log=None) -> dict[str, Any]:
  """Evaluates ``model`` and its baselines on the batches of one split.

  Args:
    model: an ``MLLM`` (gaze or dense attention).
    batches: an iterable of feature dicts (``gaze_jax.data`` pipeline batches) or ModelInputs.
    spec: the LayoutSpec the feature dicts were built with (not needed for ModelInputs).
    baselines: names of ``REGISTRY`` rows: "dense", "token_matched", "fixed_from_question",
      "random_routing" (all but "dense" need a gaze model; rows a model cannot have are
      skipped and noted under ``skipped``).
    split, name: labels in the result (``name`` is the main model's row).
    max_batches: stop after this many batches.
    token_matched_grid: force the token-matched grid height (default: matched to the budget).
    tokenizer: decodes the generated answers (``text``) and labels the gaze maps.
    text: a ``TextGeneration`` to also generate and score text answers (needs ``tokenizer``).
    gaze_maps: a ``GazeMaps`` to draw the main row's selections of the first examples.
    groups: a label per example in batch order (e.g. ``prior.question_types``): each variant
      also reports ``by_type`` accuracy per label.
    random_seed: the seed of the random-routing baseline's draws.
    log: optional ``print``-like callable for progress lines.
  Returns:
    ``{"split", "batches", "examples", "model": {...}, "results": {variant: {...}},
    "skipped": {...}, "gaze_maps": [paths]}``; each variant has ``exact_match`` (the share of
    examples whose answer tokens are all argmax-correct; also under its older name
    ``accuracy``, which means exact match wherever the project writes it), ``token_accuracy``
    (the share of answer tokens argmax-correct), ``answer_nll``, ``visual_kv`` (measured /
    configured / % of dense), ``routing`` (gaze variants), ``flops`` and
    ``attention_gflops_per_query`` (measured),
    ``configured`` (the formula budget), ``seconds`` (wall time of its passes, compilation
    included) and, for token_matched, ``token_match`` (the grid of the last batch).
  """
  textual = [b.name for b in (MAIN,) + REGISTRY if b.text]
  text_variants = text.variants if text is not None else ()
  bad = set(text_variants) - set(textual)
  if bad:
    raise ValueError(f"TextGeneration.variants {sorted(bad)} unknown; use {textual} ('gaze' is "
                     "the main model)")
  if text is not None and tokenizer is None:
    raise ValueError("text generation (text=TextGeneration(...)) needs a tokenizer to decode "
                     "the answers")
  rows, skipped = _plan_rows(model, baselines, name)
  built = {}                                     # model transform -> the model it gives
  for _, entry in rows:
    if entry.model not in built:
      built[entry.model] = entry.model(model)
  accs = {r: _Acc(r, built[e.model].cfg, fixed=e.fixed) for r, e in rows}
  maps: list[str] = []
  n_batches = n_examples = 0
  stop_ids = tuple(getattr(tokenizer, "stop_ids", ())) if tokenizer is not None else ()
  pad_id = int(getattr(tokenizer, "pad_id", 0) or 0) if tokenizer is not None else 0
  for batch in batches:
    if max_batches is not None and n_batches >= max_batches:
      break
    inputs = _to_inputs(batch, spec)
    # Ids past the vocabulary would be clamped inside the jitted forward: refuse them here.
    check_token_ids(inputs.tokens, model.cfg.decoder.vocab_size,
                    valid=np.asarray(inputs.layout.kind) == TEXT, what=f"batch {n_batches} tokens")
    n_batches += 1
    n_examples += int(np.asarray(inputs.tokens).shape[0])
    ctx = BatchContext(n_batches, random_seed, token_matched_grid)
    seen = {}                          # entry name -> (row, its model, the inputs it saw)
    for row, entry in rows:
      t0 = time.perf_counter()
      row_inputs, extra = entry.inputs(model, inputs, ctx)
      pred, tgt, sel = entry.predict(built[entry.model], row_inputs, ctx)
      accs[row].seconds += time.perf_counter() - t0
      accs[row].add(row_inputs, pred, tgt, sel)
      accs[row].extra.update(extra)
      seen[entry.name] = (row, built[entry.model], row_inputs)
      if entry is MAIN and gaze_maps is not None and sel is not None \
          and len(maps) < gaze_maps.count:
        maps += write_batch_gaze_maps(
            gaze_maps.out_dir, inputs, sel, limit=gaze_maps.count - len(maps), start=len(maps),
            layers=gaze_maps.layers, tokens_per_example=gaze_maps.tokens, pred=pred,
            tokenizer=tokenizer, image_mean=gaze_maps.image_mean, image_std=gaze_maps.image_std)
    if text is not None:
      for v in text_variants:
        if v in seen:
          row, m, inp = seen[v]
          preds, refs = _generated_texts(m, inp, tokenizer, text.max_new_tokens, stop_ids,
                                         pad_id)
          accs[row].add_text(preds, refs, text.num_samples)
    if log is not None:
      log(f"[eval {split}] batch {n_batches}: {n_examples} examples, "
          f"{name} exact match so far {accs[name].correct / max(accs[name].examples, 1):.3f}")

  if n_batches == 0:
    raise ValueError(f"split {split!r}: no batches to evaluate")
  # Every variant is compared with dense attention over the original sequence.
  dense_ref = accs[name].dense_kv.mean_entries
  results = {k: a.result(dense_ref, groups) for k, a in accs.items()}
  cfg = model.cfg
  return {
      "split": split, "batches": n_batches, "examples": n_examples,
      "model": {"name": name, "attention": cfg.gaze.attention, "top_k": cfg.gaze.top_k,
                "region_shape": list(cfg.gaze.region_shape), "num_ctx": cfg.gaze.num_ctx,
                "route_prompt": cfg.gaze.route_prompt, "num_layers": cfg.decoder.num_layers,
                "num_heads": cfg.decoder.num_heads, "num_kv_heads": cfg.decoder.num_kv_heads,
                "head_dim": cfg.decoder.head_dim},
      "results": results, "skipped": skipped, "gaze_maps": maps,
  }


def _generated_texts(model, inputs: ModelInputs, tokenizer, max_new_tokens, stop_ids, pad_id
                     ) -> tuple[list[str], list[str]]:
  """Greedy answers to each example's first question and their references, decoded."""
  toks, lengths, refs = generate_answers(model, inputs, max_new_tokens=max_new_tokens,
                                         stop_tokens=stop_ids, pad_id=pad_id)
  preds = [decode(tokenizer, _strip(toks[i, :lengths[i]], stop_ids)) for i in range(len(refs))]
  return preds, [decode(tokenizer, _strip(r, stop_ids)) for r in refs]


def _strip(ids, stop_ids) -> list[int]:
  """Ids up to (not including) the first stop id."""
  out = []
  for i in np.asarray(ids).tolist():
    if i in stop_ids:
      break
    out.append(int(i))
  return out
