"""Per-batch evaluation metrics as numpy functions over host arrays.

Answer rows. Under teacher forcing the logits at slot ``t`` predict the token at position
``position[t] + 1``; ``loss_mask`` (from ``gaze_jax.data.features``) marks the rows whose target
is an answer token (the answer and its end token). These rows are exactly the queries that
produce the answer when decoding: the first is the last prompt row (the prefill step), the
others are the answer's own tokens fed back one by one (the decode steps). All answer metrics
below are taken over them.

Exact match by teacher forcing. Greedy decoding reproduces the reference answer (up to and
including its end token, where decoding stops) **iff** the argmax at every answer row equals
its target. Proof by induction over the answer: decode step ``i`` sees the prompt and the first
``i`` generated tokens; if those equal the reference's, its context equals the teacher-forced
context of answer row ``i`` (same tokens at the same positions, same causal masks and the same
routing, which depends only on earlier tokens), so it emits the teacher-forced argmax; the first
row where argmax != target is the first wrong token. One forward pass per batch therefore gives
the exact-match accuracy of greedy decoding, without the decode loop (floating-point
differences between the full forward and the cached decode path could only matter on exact
logit ties).

Routing accuracy. For an answer row, layer and query head, each valid selected region is a
*hit* when it is one of the example's ground-truth regions (``gt_regions``: regions overlapped
by the answer's boxes). The random-choice rate is the expected hit share had the same number of
regions been drawn uniformly without replacement from that row's causal candidates ``C`` (valid
regions whose tokens all precede the row): ``|G & C| / |C|`` per drawn region. Examples without
ground-truth regions are left out of both. Three more measures (``RoutingStats``):
  * the share's ceiling: with k regions selected and g ground-truth candidates at most
    ``min(k, g)`` can hit;
  * top-1: at the row that predicts an answer's first token (the last prompt row of its turn),
    whether the best-scoring region of each head is a ground-truth region, against the uniform
    rate ``|G & C| / |C|``;
  * coverage: the share of a row's candidates in the union of its selections over all heads
    (near 1, the heads read the whole image between them and accuracy does not need routing).

Visual KV entries per query (measured). For a routed row: the valid patch tokens of its selected
regions (region padding excluded) plus the context tokens before it; for a dense row (dense
models, and text rows a gaze model does not route): every patch and context token before it.
Means are over answer rows, query heads and layers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from gaze_jax.gaze.layout import CTX, PATCH
from gaze_jax.gaze.masks import routed_rows, token_info
from gaze_jax.gaze.routing import candidate_regions
from gaze_jax.metrics import answer_hits, exact_match, routing_counts


def _np(x) -> np.ndarray:
  return np.asarray(x)


def answer_rows(loss_mask) -> tuple[np.ndarray, np.ndarray]:
  """``(b, t)`` int arrays ``[n]`` of the answer rows (``loss_mask > 0``), example-major and in
  slot order within an example (slot order is position order for text)."""
  b, t = np.nonzero(_np(loss_mask) > 0)
  return b.astype(np.int64), t.astype(np.int64)


# ------------------------------------------------------------------ exact match


def teacher_forced_exact_match(predictions, targets, loss_mask) -> tuple[np.ndarray, np.ndarray]:
  """Greedy exact match of each example from one teacher-forced pass (module docstring;
  the rule is ``gaze_jax.metrics.exact_match``).

  Args:
    predictions: int ``[B, S]`` argmax token ids, or float logits ``[B, S, V]``.
    targets: int ``[B, S]`` next-token targets by position.
    loss_mask: ``[B, S]``, > 0 at answer rows.
  Returns:
    ``(match bool[B], has_answer bool[B])``; ``match`` is False where ``has_answer`` is False.
  """
  pred, targets, mask = _argmax_ids(predictions), _np(targets), _np(loss_mask) > 0
  if pred.shape != targets.shape or mask.shape != targets.shape:
    raise ValueError(f"predictions {pred.shape}, targets {targets.shape} and loss_mask "
                     f"{mask.shape} must all be [B, S]")
  return exact_match(pred, targets, mask)


def token_accuracy(predictions, targets, loss_mask) -> tuple[int, int]:
  """``(correct, total)`` answer tokens whose argmax equals the target."""
  mask = _np(loss_mask) > 0
  return int(answer_hits(_argmax_ids(predictions), _np(targets), mask).sum()), int(mask.sum())


def _argmax_ids(predictions) -> np.ndarray:
  """int ``[B, S]`` ids as given, or the argmax of float logits ``[B, S, V]``."""
  pred = _np(predictions)
  return pred.argmax(-1) if pred.ndim == 3 else pred


# ------------------------------------------------------------------ layout helpers


def region_token_counts(layout) -> np.ndarray:
  """Valid patch tokens per region, int ``[B, NR]`` (a padded region at a grid edge has fewer
  than ``rh * rw``)."""
  region, kind = _np(layout.region), _np(layout.kind)
  B, NR = _np(layout.region_valid).shape
  out = np.zeros((B, NR), np.int64)
  for b in range(B):
    ids = region[b][(kind[b] == PATCH) & (region[b] >= 0)]
    out[b] = np.bincount(ids, minlength=NR)[:NR]
  return out


def visible_visual_tokens(layout, b: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Patch and context tokens at earlier positions than each row ``(b[i], t[i])``:
  int ``[n]`` each (what a dense row reads, and the context tokens every routed row reads)."""
  kind, pos = _np(layout.kind), _np(layout.position)
  q = pos[b, t][:, None]
  patches = ((kind[b] == PATCH) & (pos[b] < q)).sum(-1)
  ctx = ((kind[b] == CTX) & (pos[b] < q)).sum(-1)
  return patches, ctx


def candidate_mask(layout, b: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Causal routing candidates of each row (``gaze.routing.candidate_regions``, the model's
  rule): bool ``[n, NR]``."""
  q = jnp.asarray(_np(layout.position)[b, t])[:, None]                  # [n, 1]: a query per row
  cand = candidate_regions(jnp.asarray(_np(layout.region_valid)[b]),
                           jnp.asarray(_np(layout.region_last_pos)[b]), q)   # [n, 1, NR]
  return np.asarray(cand[:, 0])


def routed_mask(layout, b: np.ndarray, t: np.ndarray, route_prompt: bool = True) -> np.ndarray:
  """Rows a gaze model routes (``gaze.masks.routed_rows``, docs/method.md step 8): text rows,
  only generated ones when ``route_prompt`` is False. bool ``[n]``."""
  B, S = _np(layout.kind).shape
  slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  routed = routed_rows(token_info(layout, slots), route_prompt)            # [B, S]
  return np.asarray(routed, bool)[b, t]


def gt_membership(gt_regions, num_regions: int) -> np.ndarray:
  """bool ``[B, NR]``: region r is a ground-truth region of example b (``gt_regions`` int
  ``[B, G]``, -1 padded; ids outside ``[0, NR)`` raise)."""
  gt = _np(gt_regions)
  if gt.ndim != 2:
    raise ValueError(f"gt_regions must be [B, G], got shape {gt.shape}")
  bad = gt[(gt >= num_regions) | (gt < -1)]
  if bad.size:
    raise ValueError(f"gt_regions holds ids {sorted(set(bad.tolist()))} outside the layout's "
                     f"{num_regions} regions")
  out = np.zeros((gt.shape[0], num_regions), bool)
  bb, gg = np.nonzero(gt >= 0)
  out[bb, gt[bb, gg]] = True
  return out


# ------------------------------------------------------------------ routing accuracy


@dataclasses.dataclass
class RoutingStats:
  """Sums per layer (float ``[L]`` each) of the routing measures (module docstring).

  share: ``hits`` of ``selections``; ``random_hits`` expected of uniform draws; ``ceiling``
    the most hits the same selections could make (per row and head ``min(selections, |G & C|)``).
  top-1: at the rows that predict an answer's first token, per query head, whether the
    best-scoring region (rank 0) is a ground-truth region (``top1_hits`` of ``top1_samples``),
    and the uniform rate ``|G & C| / |C|`` summed (``top1_random``); where the data has object
    boxes O, the salience rate ``|G & C & O| / |C & O|`` of a random region that holds an
    object, which needs no question (``top1_salience`` of ``top1_salience_samples``).
  coverage: at answer rows with candidates, the share of candidates in the union of the
    selections over all heads (``coverage`` summed over ``coverage_rows``).
  """
  hits: np.ndarray
  selections: np.ndarray
  random_hits: np.ndarray
  ceiling: np.ndarray
  top1_hits: np.ndarray
  top1_samples: np.ndarray
  top1_random: np.ndarray
  top1_salience: np.ndarray
  top1_salience_samples: np.ndarray
  coverage: np.ndarray
  coverage_rows: np.ndarray

  @classmethod
  def zeros(cls, num_layers: int) -> "RoutingStats":
    return cls(*(np.zeros(num_layers) for _ in dataclasses.fields(cls)))

  def __add__(self, other: "RoutingStats") -> "RoutingStats":
    return RoutingStats(*(getattr(self, f.name) + getattr(other, f.name)
                          for f in dataclasses.fields(self)))

  @staticmethod
  def _ratio(x, n) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(n > 0, x / np.maximum(n, 1), np.nan)

  @staticmethod
  def _mean(per_layer) -> float:
    """Mean over the layers that have samples."""
    return float(np.nanmean(per_layer)) if np.isfinite(per_layer).any() else float("nan")

  @property
  def accuracy_per_layer(self) -> np.ndarray:
    return self._ratio(self.hits, self.selections)

  @property
  def random_per_layer(self) -> np.ndarray:
    return self._ratio(self.random_hits, self.selections)

  @property
  def ceiling_per_layer(self) -> np.ndarray:
    return self._ratio(self.ceiling, self.selections)

  @property
  def top1_per_layer(self) -> np.ndarray:
    return self._ratio(self.top1_hits, self.top1_samples)

  @property
  def top1_random_per_layer(self) -> np.ndarray:
    return self._ratio(self.top1_random, self.top1_samples)

  @property
  def top1_salience_per_layer(self) -> np.ndarray:
    return self._ratio(self.top1_salience, self.top1_salience_samples)

  @property
  def coverage_per_layer(self) -> np.ndarray:
    return self._ratio(self.coverage, self.coverage_rows)

  @property
  def accuracy(self) -> float:
    """Mean over layers (that made any selection) of the per-layer hit share."""
    return self._mean(self.accuracy_per_layer)

  @property
  def random(self) -> float:
    return self._mean(self.random_per_layer)

  def summary(self) -> dict:
    """The JSON form: every measure overall (mean over layers) and per layer."""
    out = {"accuracy": self.accuracy, "random": self.random,
           "per_layer": self.accuracy_per_layer.tolist(),
           "random_per_layer": self.random_per_layer.tolist(),
           "selections": float(self.selections.sum())}
    for name in ("ceiling", "top1", "top1_random", "top1_salience", "coverage"):
      per = getattr(self, f"{name}_per_layer")
      key = "share_ceiling" if name == "ceiling" else name
      out[key] = self._mean(per)
      out[f"{key}_per_layer"] = per.tolist()
    return out


def first_answer_rows(layout, rows) -> tuple[np.ndarray, np.ndarray]:
  """The rows among ``rows`` that predict an answer's first token: those whose position is
  not one after another answer row of the same example (the last prompt row of each turn)."""
  b, t = _rows(rows)
  pos = _np(layout.position)[b, t]
  taken = set(zip(b.tolist(), pos.tolist()))
  first = np.array([(bi, p - 1) not in taken for bi, p in zip(b.tolist(), pos.tolist())], bool)
  return b[first], t[first]


def routing_accuracy(selected: Sequence, gt_regions, layout, rows,
                     object_regions=None) -> RoutingStats:
  """The routing measures (``RoutingStats``) of the choices at answer rows against the
  ground-truth regions.

  Args:
    selected: per layer, int ``[B, S, Hq, K]`` region ids (-1 = none), ranked by score.
    gt_regions: int ``[B, G]`` ground-truth region ids, -1 padded.
    layout: the batch's TokenLayout.
    rows: ``(b, t)`` from ``answer_rows`` (or a ``[B, S]`` mask).
    object_regions: optional int ``[B, R]`` ids of the regions that hold an object, -1
      padded: the salience baseline (none where an example has no object among its candidates).
  Returns:
    RoutingStats with per-layer sums (see the module docstring for the random rate).
  """
  b, t = _rows(rows)
  NR = _np(layout.region_valid).shape[1]
  gt = gt_membership(gt_regions, NR)
  keep = gt[b].any(-1)                          # examples with ground truth
  b, t = b[keep], t[keep]
  out = RoutingStats.zeros(len(selected))
  if b.size == 0:
    return out
  cand = candidate_mask(layout, b, t)                                   # [n, NR]
  n_cand = cand.sum(-1)
  n_gt = (cand & gt[b]).sum(-1)
  rate = np.where(n_cand > 0, n_gt / np.maximum(n_cand, 1), 0.0)       # [n]
  if object_regions is None:
    obj = np.zeros_like(cand)
  else:
    obj = cand & gt_membership(object_regions, NR)[b]                   # [n, NR]
  n_obj = obj.sum(-1)
  salient = n_obj > 0
  sal_rate = np.where(salient, (obj & gt[b]).sum(-1) / np.maximum(n_obj, 1), 0.0)
  first = np.zeros(b.size, bool)
  fb, ft = first_answer_rows(layout, (b, t))
  first[np.isin(b * (1 << 32) + t, fb * (1 << 32) + ft)] = True
  for layer, ids in enumerate(selected):
    ids = _np(ids)[b, t]                                                # [n, Hq, K]
    valid = ids >= 0
    hit = valid & _gather_regions(gt[b], ids)
    n_sel = valid.sum(-1)                                               # [n, Hq]
    out.hits[layer] = hit.sum()
    out.selections[layer] = n_sel.sum()
    out.random_hits[layer] = (n_sel.sum(-1) * rate).sum()
    out.ceiling[layer] = np.minimum(n_sel, n_gt[:, None]).sum()
    top = valid[first, :, 0]                                            # [n1, Hq]
    out.top1_hits[layer] = (top & hit[first, :, 0]).sum()
    out.top1_samples[layer] = top.sum()
    out.top1_random[layer] = (top * rate[first, None]).sum()
    out.top1_salience[layer] = (top * sal_rate[first, None]).sum()
    out.top1_salience_samples[layer] = (top & salient[first, None]).sum()
    union = np.zeros(cand.shape, bool)                                  # [n, NR]
    rr, _, _ = np.nonzero(valid)
    union[rr, ids[valid]] = True
    has = n_cand > 0
    out.coverage[layer] = (union[has].sum(-1) / n_cand[has]).sum()
    out.coverage_rows[layer] = has.sum()
  return out


def _gather_regions(per_region: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """``per_region [n, NR]`` read at ``ids [n, Hq, K]`` (clipped to 0 where -1) -> ``[n, Hq, K]``."""
  n = ids.shape[0]
  flat = np.take_along_axis(per_region, np.maximum(ids, 0).reshape(n, -1), axis=-1)
  return flat.reshape(ids.shape)


def _rows(rows) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(rows, tuple):
    return np.asarray(rows[0], np.int64), np.asarray(rows[1], np.int64)
  return answer_rows(rows)


# ------------------------------------------------------------------ visual KV entries


@dataclasses.dataclass
class KVStats:
  """Sums over (answer row, head, layer) samples: visual KV entries read, the routing
  candidates scored, and the union of regions per KV head (selected rows only)."""
  entries: float = 0.0
  samples: float = 0.0
  candidates: float = 0.0
  candidate_rows: float = 0.0
  union: float = 0.0
  union_samples: float = 0.0

  def __add__(self, other: "KVStats") -> "KVStats":
    return KVStats(*(getattr(self, f.name) + getattr(other, f.name)
                     for f in dataclasses.fields(self)))

  @property
  def mean_entries(self) -> float:
    return self.entries / self.samples if self.samples else float("nan")

  @property
  def mean_candidates(self) -> float:
    """Regions scored per routed row (0 for dense models)."""
    return self.candidates / self.candidate_rows if self.candidate_rows else 0.0

  @property
  def mean_union(self) -> float:
    """Distinct regions one KV head reads for a routed row (docs/method.md, Efficiency)."""
    return self.union / self.union_samples if self.union_samples else float("nan")


def dense_kv_entries(layout, rows) -> KVStats:
  """Dense attention: every earlier patch and context token, per answer row."""
  b, t = _rows(rows)
  patches, ctx = visible_visual_tokens(layout, b, t)
  return KVStats(entries=float((patches + ctx).sum()), samples=float(b.size))


def routed_kv_entries(selected: Sequence, layout, rows, *, route_prompt: bool = True,
                      num_kv_heads: Optional[int] = None, scores_routing: bool = True) -> KVStats:
  """Gaze attention with the given selections, per answer row, head and layer.

  Args:
    selected: per layer, int ``[B, S, Hq, K]`` region ids (-1 = none).
    layout: the batch's TokenLayout.
    rows: ``(b, t)`` or a ``[B, S]`` mask of answer rows.
    route_prompt: the model's ``GazeConfig.route_prompt`` (which text rows route).
    num_kv_heads: Hkv, to measure the union of the query heads' regions per KV head.
    scores_routing: count the candidates scored at each routed row (False when the regions
      were fixed beforehand, e.g. the eviction baseline: nothing is scored while decoding).
  """
  b, t = _rows(rows)
  out = KVStats()
  if b.size == 0:
    return out
  counts = region_token_counts(layout)                                  # [B, NR]
  patches, ctx = visible_visual_tokens(layout, b, t)
  routed = routed_mask(layout, b, t, route_prompt)
  n_cand = candidate_mask(layout, b, t).sum(-1)
  for ids in selected:
    ids = _np(ids)[b, t]                                                # [n, Hq, K]
    tokens = np.where(ids >= 0, _gather_regions(counts[b], ids), 0).sum(-1)   # [n, Hq]
    per_row = np.where(routed[:, None], tokens + ctx[:, None], (patches + ctx)[:, None])
    out.entries += float(per_row.sum())
    out.samples += float(per_row.size)
    if scores_routing:
      out.candidates += float(n_cand[routed].sum())
      out.candidate_rows += float(routed.sum())
    if num_kv_heads and routed.any():
      _, union, n = routing_counts(ids[None], routed[None], num_kv_heads)
      out.union += float(union)
      out.union_samples += float(n) * num_kv_heads
  return out
