"""The attention plan of one forward pass: everything that depends on the layout alone, built
once per training step, prefill or decode step and handed to every layer (as splash
attention's ``MaskInfo``). Routing ids are then the only per-layer input besides q, k and v.

What it holds, by implementation:
  * all: the query rows' token fields, the routed rows, the slots of the query rows;
  * "xla": the fields of the keys addressed by slot (all slots, or in the decode form the
    text and context slots only). The base mask over them is one elementwise op per layer
    (``masks.base_rule``): held in the plan, the ``[B, T, Na]`` mask and its broadcasts stayed
    alive across the remat'd layers (the tiny preset's training step on a v5p slice: 76.0
    against 66.5 MiB per chip);
  * "pallas": ``pallas_kernels.plan.KernelPlan`` (the KV block table, the packed rows, the
    routing-independent block lists and the static dense length), which the kernels add
    (``pallas_kernels.ops.build_plan``): this package never imports them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import TokenLayout
from gaze_jax.gaze.masks import TokenInfo, routed_rows, token_info

IMPLEMENTATIONS = ("reference", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """Layout-derived work of a forward pass (``build_plan``); every array is ``[B, ...]``.

  q_index: int32 ``[B, T]`` slots of the query rows.
  query: TokenInfo ``[B, T]`` of the query rows; routed: bool ``[B, T]`` (``routed_rows``).
  key: TokenInfo ``[B, Na]`` of the keys addressed by slot ("xla"; else None).
  kernel: ``pallas_kernels.plan.KernelPlan`` ("pallas"; else None).
  Static: implementation, route_prompt, decode (the xla path reads only text/context slots
  besides the regions), full_sequence (q_index was None: T == S, row t is slot t).
  """
  q_index: Any
  query: TokenInfo
  routed: Any
  key: Optional[TokenInfo]
  kernel: Any
  implementation: str
  route_prompt: bool
  decode: bool
  full_sequence: bool

  def check(self, *, rows: tuple, implementation: str, route_prompt: bool, decode: bool):
    """Raises ValueError when the plan was built for other rows or options than a call's."""
    want = dict(rows=rows, implementation=implementation, route_prompt=route_prompt,
                decode=decode)
    have = dict(rows=tuple(self.routed.shape), implementation=self.implementation,
                route_prompt=self.route_prompt, decode=self.decode)
    bad = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if bad:
      what = ", ".join(f"{k}={h!r} (the call has {w!r})" for k, (h, w) in bad.items())
      raise ValueError(f"the attention plan does not match this call: it was built for {what}; "
                       "build it with the same layout, q_index and options")


jax.tree_util.register_dataclass(
    AttentionPlan, data_fields=["q_index", "query", "routed", "key", "kernel"],
    meta_fields=["implementation", "route_prompt", "decode", "full_sequence"])


def build_plan(layout: TokenLayout, q_index: Optional[jax.Array] = None, *,
               route_prompt: bool = True, implementation: str = "xla",
               decode: Optional[bool] = None,
               reuse: Optional[AttentionPlan] = None) -> AttentionPlan:
  """The attention plan of ``layout`` for query rows ``q_index`` (for "pallas" without its
  ``kernel`` part, which ``pallas_kernels.ops.build_plan`` adds).

  Args:
    layout: TokenLayout ``[B, S]``.
    q_index: int32 ``[B, T]`` slots of the query rows (decode form); None: T == S.
    route_prompt, decode: as in ``gaze_attention`` (decode defaults to ``q_index is not None``).
    implementation: "xla", "reference" or "pallas".
    reuse: a plan of the same layout and options for other query rows (an earlier decode
      step): its layout-only parts (the keys' fields) are taken as they are, so that a decode
      loop builds them once (``generate``).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  B, S = layout.kind.shape
  full = q_index is None
  if decode is None:
    decode = not full
  qi = (jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)) if full
        else jnp.asarray(q_index, jnp.int32))
  if reuse is not None and (reuse.implementation, reuse.decode, reuse.route_prompt) != (
      implementation, bool(decode), bool(route_prompt)):
    raise ValueError(f"reuse: the plan was built for implementation={reuse.implementation!r}, "
                     f"decode={reuse.decode}, route_prompt={reuse.route_prompt}, this call has "
                     f"{implementation!r}, {bool(decode)}, {bool(route_prompt)}")
  query = token_info(layout, qi)
  routed = routed_rows(query, route_prompt)
  key = None
  if implementation == "xla":
    if reuse is not None:
      key = reuse.key
    else:
      index = layout.nonvisual_index if decode else jnp.broadcast_to(jnp.arange(S), (B, S))
      key = token_info(layout, index)
  return AttentionPlan(q_index=qi, query=query, routed=routed, key=key, kernel=None,
                       implementation=implementation,
                       route_prompt=bool(route_prompt), decode=bool(decode),
                       full_sequence=full)
