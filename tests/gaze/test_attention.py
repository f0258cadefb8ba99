"""gaze_attention: reference mask rules, xla == reference (forward and gradient), decode form,
K = all equals dense, no retracing, clear errors."""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaze_jax.gaze
from gaze_jax.gaze import (PAD, PATCH, TEXT, Image, LayoutSpec, Selection, Text, Video,
                           build_layout, gaze_attention, gaze_mask, region_descriptors,
                           routed_rows, token_info)
from tests.gaze.random_cases import random_case

ATOL = 2e-5


def _run(case, impl, **kw):
  """``impl`` "pallas": the kernels' entry (``pallas_kernels.ops``, interpret mode on CPU)."""
  opts = dict(top_k=case.top_k, score=case.score, routing=case.routing,
              route_prompt=case.route_prompt, return_selected=True)
  opts.update(kw)
  if impl == "pallas":
    from pallas_kernels import ops
    attend = functools.partial(ops.gaze_attention, **opts)
  else:
    attend = functools.partial(gaze_attention, implementation=impl, **opts)
  fn = jax.jit(lambda q, k, v, qr, kr: attend(q, k, v, qr, kr, case.layout))
  return fn(case.q, case.k, case.v, case.q_route, case.k_route)


def _grads(case, impl, **kw):
  w = jax.random.normal(jax.random.PRNGKey(7), case.q.shape)
  opts = dict(top_k=case.top_k, score=case.score, routing=case.routing,
              route_prompt=case.route_prompt, implementation=impl)
  opts.update(kw)

  def loss(q, k, v, qr, kr):
    return jnp.sum(gaze_attention(q, k, v, qr, kr, case.layout, **opts) * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(
      case.q, case.k, case.v, case.q_route, case.k_route)


def _naive_attention(q, k, v, visible):
  """Per-row numpy softmax attention. visible: bool [B, T, Hq, S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, Hq, D = q.shape
  G = Hq // k.shape[2]
  out = np.zeros((B, T, Hq, D))
  for b in range(B):
    for t in range(T):
      for h in range(Hq):
        m = visible[b, t, h]
        if not m.any():
          continue
        logit = k[b, m, h // G] @ q[b, t, h] / np.sqrt(D)
        p = np.exp(logit - logit.max())
        out[b, t, h] = (p / p.sum()) @ v[b, m, h // G]
  return out


# ---------------------------------------------------------------- hand-made mask rules


def _hand_layout(**kw):
  # slots: 0,1 text | 2..5 patches of a 2x2 grid (1x1 regions 0..3) | 6 ctx | 7,8 text
  spec = LayoutSpec(seq_len=9, max_regions=4, max_images=1, region_shape=(1, 1), num_ctx=1)
  return build_layout([[Text(2), Image(2, 2), Text(1), Text(1, generated=True)]], spec)


def _visible_sets(layout, ids, route_prompt=True):
  ids = jnp.asarray(ids, jnp.int32)[None, :, None, :]                 # [1, S, 1, K]
  query = token_info(layout, jnp.arange(9)[None])
  mask = gaze_mask(layout, query, routed_rows(query, route_prompt), Selection(ids=ids))
  return [set(np.flatnonzero(mask[0, t, 0]).tolist()) for t in range(9)]


def test_reference_mask_follows_method_steps_6_to_8():
  lay = _hand_layout()
  ids = [[-1]] * 7 + [[2], [0]]  # text row 7 selected region 2 (slot 4), row 8 region 0 (slot 2)
  vis = _visible_sets(lay, ids)
  assert vis[0] == {0} and vis[1] == {0, 1}                  # text before the image
  assert vis[3] == {0, 1, 2, 3}                              # patch rows: dense causal
  assert vis[5] == {0, 1, 2, 3, 4, 5}
  assert vis[6] == {2, 3, 4, 5, 6}                           # ctx row: own frame + itself
  assert vis[7] == {0, 1, 4, 6, 7}                           # routed: text + ctx + region 2
  assert vis[8] == {0, 1, 2, 6, 7, 8}                        # routed: text + ctx + region 0


def test_route_prompt_false_keeps_prompt_rows_dense():
  lay = _hand_layout()
  ids = [[-1]] * 7 + [[2], [0]]
  vis = _visible_sets(lay, ids, route_prompt=False)
  assert vis[7] == set(range(8))                             # prompt row: dense causal
  assert vis[8] == {0, 1, 2, 6, 7, 8}                        # generated row: routed


def test_context_rows_see_only_their_own_frame():
  spec = LayoutSpec(seq_len=20, max_regions=4, max_images=2, region_shape=(1, 1), num_ctx=2)
  lay = build_layout([[Text(1), Image(1, 2), Image(1, 2), Text(1)]], spec)
  # slots: 0 text | 1,2 patches f0 | 3,4 ctx f0 | 5,6 patches f1 | 7,8 ctx f1 | 9 text
  query = token_info(lay, jnp.arange(20)[None])
  mask = gaze_mask(lay, query, routed_rows(query, True), Selection(jnp.full((1, 20, 1, 1), -1)))
  rows = lambda t: set(np.flatnonzero(mask[0, t, 0]).tolist())
  assert rows(3) == {1, 2, 3} and rows(4) == {1, 2, 3, 4}
  assert rows(7) == {5, 6, 7} and rows(8) == {5, 6, 7, 8}
  assert rows(9) == {0, 3, 4, 7, 8, 9}                       # no region selected: text + ctx
  assert rows(12) == set()                                   # PAD row sees nothing


def test_routing_picks_the_region_the_query_points_at():
  lay = _hand_layout()
  D = 4
  # Pre-RoPE keys: region r's patch key is e_r; text/ctx keys zero.
  k_route = np.zeros((1, 9, 1, D), np.float32)
  for r, slot in enumerate(range(2, 6)):
    k_route[0, slot, 0, r] = 1.0
  q_route = np.zeros((1, 9, 1, D), np.float32)
  q_route[0, 7, 0, 2] = 1.0   # row 7 looks at region 2
  q_route[0, 8, 0, 0] = 1.0   # row 8 looks at region 0
  x = jnp.ones((1, 9, 1, D))
  _, ids = gaze_attention(x, x, x, jnp.asarray(q_route), jnp.asarray(k_route), lay, top_k=1,
                          return_selected=True, implementation="reference")
  np.testing.assert_array_equal(ids[0, :, 0, 0], [-1] * 7 + [2, 0])


# ---------------------------------------------------------------- xla == reference


@pytest.mark.parametrize("seed", range(24))
def test_xla_matches_reference_forward_and_gradient(seed):
  # Seeds 0..15 cover every (GQA ratio, score, routing) triple; K = 1 and K = all regions
  # recur; half the cases hold a video; the rest of the structure is drawn from the seed.
  case = random_case(seed, group=[1, 2, 4, 8][seed % 4],
                     score=["dot", "cosine"][seed // 4 % 2],
                     routing=["head", "group"][seed // 8 % 2],
                     top_k={0: 1, 1: "all"}.get(seed % 5), force_video=seed % 2 == 1,
                     separate_route=seed % 3 == 0)
  out_r, ids_r = _run(case, "reference")
  out_x, ids_x = _run(case, "xla")
  np.testing.assert_array_equal(ids_x, ids_r)
  np.testing.assert_allclose(out_x, out_r, atol=ATOL, rtol=1e-5)
  # Something was actually routed and attended.
  assert (np.asarray(ids_r) >= 0).any() and np.abs(np.asarray(out_r)).sum() > 0
  g_r = _grads(case, "reference")
  g_x = _grads(case, "xla")
  for name, a, b in zip(["q", "k", "v", "q_route", "k_route"], g_x, g_r):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5, err_msg=f"grad {name}")
  # Hard top-K: no gradient reaches the route inputs when they are separate tensors.
  if seed % 3 == 0:
    assert not np.asarray(g_r[3]).any() and not np.asarray(g_r[4]).any()


@pytest.mark.parametrize("seed, routing", [(30, "head"), (31, "group")])
def test_newline_rows_xla_matches_reference_and_k_all_is_dense(seed, routing):
  """Images with a text slot after each row of patches (LLaVA's image_newline): xla equals the
  reference, forward and gradient; newline rows do not route (they attend densely, as patch
  rows do), and with K = all regions every text row, newline rows included, is dense causal
  attention, whatever the region shape."""
  case = random_case(seed, group=2, routing=routing, top_k=2, newline_rows=True)
  kind, frame = np.asarray(case.layout.kind), np.asarray(case.layout.frame)
  out_r, ids_r = _run(case, "reference")
  out_x, ids_x = _run(case, "xla")
  np.testing.assert_array_equal(ids_x, ids_r)
  np.testing.assert_allclose(out_x, out_r, atol=ATOL, rtol=1e-5)
  for name, a, b in zip(["q", "k", "v", "q_route", "k_route"], _grads(case, "xla"),
                        _grads(case, "reference")):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5, err_msg=f"grad {name}")
  newline = (kind == TEXT) & (frame >= 0)
  assert newline.any() and (np.asarray(ids_r)[newline] < 0).all()
  assert (np.asarray(ids_r)[(kind == TEXT) & ~newline] >= 0).any()
  B, S = kind.shape
  pos = np.asarray(case.layout.position)
  Hq = case.q.shape[2]
  out, _ = _run(case, "xla", top_k=case.layout.max_regions)
  dense = (pos[:, None, :] <= pos[:, :, None]) & (kind != PAD)[:, None, :]
  ref = _naive_attention(case.q, case.k, case.v, np.broadcast_to(dense[:, :, None, :],
                                                                  (B, S, Hq, S)))
  text = kind == TEXT
  np.testing.assert_allclose(np.asarray(out)[text], ref[text], atol=ATOL)


@pytest.mark.parametrize("seed, routing, newline", [(40, "head", False), (41, "group", True),
                                                    (42, "group", False)])
def test_xla_full_form_with_bounded_text_rows_matches_reference(seed, routing, newline):
  """A layout that bounds its text and context slots (``for_decoding``): the xla full form
  takes the patch rows from the dense kernel and runs gaze for the others only; it equals the
  reference, forward and gradient, with the same selections (none on the patch rows)."""
  import dataclasses
  case = random_case(seed, group=2, routing=routing, top_k=2, newline_rows=newline)
  bounded = dataclasses.replace(case, layout=case.layout.for_decoding(multiple=4))
  assert bounded.layout.spec.max_nonvisual < bounded.layout.seq_len
  out_r, ids_r = _run(case, "reference")
  out_x, ids_x = _run(bounded, "xla")
  np.testing.assert_array_equal(ids_x, ids_r)
  np.testing.assert_allclose(out_x, out_r, atol=ATOL, rtol=1e-5)
  for name, a, b in zip(["q", "k", "v", "q_route", "k_route"], _grads(bounded, "xla"),
                        _grads(case, "reference")):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5, err_msg=f"grad {name}")
  # In chunks of query rows as well.
  out_c, _ = _run(bounded, "xla", query_chunk=3)
  np.testing.assert_allclose(out_c, out_r, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_k_all_regions_equals_dense_causal_on_text_rows(impl):
  for seed in (1, 2, 3):
    case = random_case(100 + seed)
    lay = case.layout
    out, _ = _run(case, impl, top_k=lay.max_regions)
    kind, pos = np.asarray(lay.kind), np.asarray(lay.position)
    B, S = kind.shape
    Hq = case.q.shape[2]
    dense = (pos[:, None, :] <= pos[:, :, None]) & (kind != PAD)[:, None, :]
    dense = np.broadcast_to(dense[:, :, None, :], (B, S, Hq, S))
    ref = _naive_attention(case.q, case.k, case.v, dense)
    text = kind == TEXT
    np.testing.assert_allclose(np.asarray(out)[text], ref[text], atol=ATOL)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_reference_agrees_with_naive_per_row_attention(impl):
  """The whole output (all row kinds) against a numpy loop over the reference mask."""
  case = random_case(200)
  out, ids = _run(case, impl)
  query = token_info(case.layout, jnp.broadcast_to(jnp.arange(case.layout.seq_len),
                                                   case.layout.kind.shape))
  mask = gaze_mask(case.layout, query, routed_rows(query, case.route_prompt), Selection(ids))
  ref = _naive_attention(case.q, case.k, case.v, np.asarray(mask))
  np.testing.assert_allclose(out, ref, atol=ATOL)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_active_k_masks_ranks_like_a_smaller_static_k(impl):
  case = random_case(300, group=2)
  K = case.layout.max_regions
  small = max(1, K // 3)
  f = jax.jit(lambda ak: gaze_attention(case.q, case.k, case.v, case.q, case.k, case.layout,
                                        top_k=K, active_k=ak, implementation=impl,
                                        return_selected=True))
  out_a, ids_a = f(jnp.int32(small))
  out_s, ids_s = _run(case, impl, top_k=small, score="dot", routing="head", route_prompt=True)
  np.testing.assert_allclose(out_a, out_s, atol=ATOL)
  np.testing.assert_array_equal(ids_a[..., :small], ids_s)
  assert (np.asarray(ids_a[..., small:]) == -1).all()


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_query_chunks_match_unchunked(impl):
  case = random_case(400)
  out, ids = _run(case, impl)
  out_c, ids_c = _run(case, impl, query_chunk=7)
  np.testing.assert_allclose(out_c, out, atol=ATOL)
  np.testing.assert_array_equal(ids_c, ids)
  g = _grads(case, impl)
  g_c = _grads(case, impl, query_chunk=7)
  for a, b in zip(g_c, g):
    np.testing.assert_allclose(a, b, atol=ATOL)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_precomputed_selection_reproduces_routing(impl):
  case = random_case(500, group=4)
  out, ids = _run(case, impl)
  out_s, ids_s = _run(case, impl, selection=Selection(ids), top_k=1)
  np.testing.assert_allclose(out_s, out, atol=ATOL)
  np.testing.assert_array_equal(ids_s, ids)


# ---------------------------------------------------------------- decode form


def _decode_case(seed, impl, routing):
  case = random_case(seed, group=2)
  lay = case.layout
  kind = np.asarray(lay.kind)
  # The last 3 generated text slots of each example are the "new" decode queries.
  slots = np.stack([np.flatnonzero(kind[b] == TEXT)[-3:] for b in range(kind.shape[0])])
  return case, slots


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("routing", ["head", "group"])
def test_decode_over_cache_equals_prefill_rows(impl, routing):
  for seed in (600, 601, 602):
    case, slots = _decode_case(seed, impl, routing)
    lay = case.layout
    full, full_ids = _run(case, impl, routing=routing, route_prompt=True, score="dot")
    # Descriptors are computed once at "prefill" and cached.
    desc = region_descriptors(case.k_route, lay)
    # The cache holds garbage after each example's last query: causality must hide it.
    noise = jax.random.normal(jax.random.PRNGKey(seed), case.k.shape) * 100
    after = jnp.arange(lay.seq_len)[None, :, None, None] > jnp.asarray(slots.max(1))[:, None, None, None]
    k_cache = jnp.where(after, noise, case.k)
    v_cache = jnp.where(after, noise, case.v)
    idx = jnp.asarray(slots, jnp.int32)
    q_new = jnp.take_along_axis(case.q, idx[:, :, None, None], axis=1)
    qr_new = jnp.take_along_axis(case.q_route, idx[:, :, None, None], axis=1)
    step = jax.jit(lambda q, kc, vc, qr, d, i: gaze_attention(
        q, kc, vc, qr, None, lay, top_k=case.top_k, routing=routing, descriptors=d, q_index=i,
        implementation=impl, return_selected=True))
    out, ids = step(q_new, k_cache, v_cache, qr_new, desc, idx)
    want = np.take_along_axis(np.asarray(full), slots[:, :, None, None], axis=1)
    want_ids = np.take_along_axis(np.asarray(full_ids), slots[:, :, None, None], axis=1)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(out, want, atol=ATOL)


def test_decode_form_reads_only_text_context_and_selected_regions():
  """Changing the K/V of unselected visual slots must not change a decode output."""
  case, slots = _decode_case(610, "xla", "head")
  lay = case.layout
  idx = jnp.asarray(slots[:, -1:], jnp.int32)
  q_new = jnp.take_along_axis(case.q, idx[:, :, None, None], axis=1)
  run = lambda k, v: gaze_attention(q_new, k, v, q_new, case.k_route, lay, top_k=1,
                                    q_index=idx, return_selected=True)
  out, ids = run(case.k, case.v)
  sel = np.asarray(ids)
  region = np.asarray(lay.region)
  unselected = np.zeros(lay.kind.shape, bool)
  for b in range(sel.shape[0]):
    unselected[b] = (np.asarray(lay.kind[b]) == PATCH) & ~np.isin(region[b], sel[b].ravel())
  m = jnp.asarray(unselected)[:, :, None, None]
  out2, _ = run(jnp.where(m, 1e3, case.k), jnp.where(m, -1e3, case.v))
  np.testing.assert_allclose(out2, out, atol=ATOL)


# ---------------------------------------------------------------- static shapes


def test_new_layouts_of_the_same_shapes_compile_once():
  spec = LayoutSpec(seq_len=80, max_regions=12, max_images=3, region_shape=(2, 2), num_ctx=2)
  lay1 = build_layout([[Text(3), Image(4, 4), Text(5)], [Text(1), Video(2, 2, 4), Text(2)]], spec)
  lay2 = build_layout([[Text(9), Image(2, 2), Text(1), Image(3, 3), Text(2, generated=True)],
                       [Image(4, 4), Text(7)]], spec)
  traces = []

  @jax.jit
  def f(q, k, v, layout):
    traces.append(1)
    return gaze_attention(q, k, v, q, k, layout, top_k=3)

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 80, 4, 8))
  kv = jax.random.normal(jax.random.PRNGKey(1), (2, 80, 2, 8))
  a = f(x, kv, kv, lay1)
  b = f(x * 2, kv + 1, kv, lay2)
  assert len(traces) == 1
  assert not np.allclose(a, b)


# ---------------------------------------------------------------- bf16


def test_bfloat16_inputs_stay_close_to_float32():
  case = random_case(700, group=2)
  out32, ids = _run(case, "xla")
  bf = lambda x: x.astype(jnp.bfloat16)
  out16 = gaze_attention(bf(case.q), bf(case.k), bf(case.v), case.q_route, case.k_route,
                         case.layout, top_k=case.top_k, selection=Selection(ids),
                         route_prompt=case.route_prompt)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=5e-2)


# ---------------------------------------------------------------- errors


def _small():
  spec = LayoutSpec(seq_len=24, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=1)
  lay = build_layout([[Text(2), Image(4, 4), Text(3)]], spec)
  q = jnp.zeros((1, 24, 4, 8))
  k = jnp.zeros((1, 24, 2, 8))
  return q, k, lay


@pytest.mark.parametrize("mutate, match", [
    (lambda q, k, lay: dict(top_k=5), r"top_k=5 must be in \[1, max_regions=4\]"),
    (lambda q, k, lay: dict(top_k=0), r"top_k=0"),
    (lambda q, k, lay: dict(top_k=1.5), r"ratio must be in \(0, 1\]"),
    (lambda q, k, lay: dict(active_k=3, top_k=2), r"active_k=3 must be in \[0, top_k=2\]"),
    (lambda q, k, lay: dict(q=jnp.zeros((1, 24, 3, 8))), r"Hq=3 must be a multiple of .*Hkv=2"),
    (lambda q, k, lay: dict(q=jnp.zeros((1, 5, 4, 8))), r"pass q_index"),
    (lambda q, k, lay: dict(k=jnp.zeros((1, 20, 2, 8))), r"layout must be \[B, S\] = \(1, 20\)"),
    (lambda q, k, lay: dict(k=jnp.zeros((1, 24, 2, 4))), r"k must be \[B=1, S, Hkv, D=8\]"),
    (lambda q, k, lay: dict(q=jnp.zeros((24, 4, 8))), r"rank 3 .*q must be \[B, T, Hq, D\]"),
    (lambda q, k, lay: dict(v=jnp.zeros((1, 24, 1, 8))), r"k and v must both be"),
    (lambda q, k, lay: dict(q_route=jnp.zeros((1, 24, 2, 8))), r"q_route must be \[B=1"),
    (lambda q, k, lay: dict(q_index=jnp.zeros((1, 23), jnp.int32)), r"q_index must be \[B, T\]"),
    (lambda q, k, lay: dict(selection=jnp.zeros((1, 24, 4), jnp.int32)),
     r"selection ids must be \[B=1, T=24, Hq=4, K\]"),
    (lambda q, k, lay: dict(score="l2"), r"score must be one of"),
    (lambda q, k, lay: dict(routing="token"), r"routing must be one of"),
    (lambda q, k, lay: dict(implementation="cuda"), r"implementation must be one of"),
    (lambda q, k, lay: dict(k_route=None), r"k_route \(or descriptors\)"),
    (lambda q, k, lay: dict(descriptors=jnp.zeros((1, 3, 2, 8))), r"descriptors must be"),
    (lambda q, k, lay: dict(layout="not a layout"), r"layout must be a TokenLayout"),
])
def test_bad_inputs_get_clear_errors(mutate, match):
  q, k, lay = _small()
  args = dict(q=q, k=k, v=k, q_route=q, k_route=k, layout=lay, top_k=2)
  args.update(mutate(q, k, lay))
  if args["k"] is not k and "v" not in mutate(q, k, lay):
    args["v"] = args["k"]
  with pytest.raises(ValueError, match=match):
    gaze_attention(**args)


def test_the_method_never_imports_the_kernels():
  """One direction: the kernels build on ``gaze_jax.gaze``; the method package imports no
  kernel module (the model's attention picks the kernels), and asking it for them says where
  they are."""
  root = Path(gaze_jax.gaze.__file__).parent
  offenders = [f.name for f in sorted(root.glob("*.py"))
               if re.search(r"^\s*(from|import) pallas_kernels", f.read_text(), re.M)]
  assert offenders == []
  case = random_case(801)
  with pytest.raises(ValueError, match="pallas_kernels.ops.gaze_attention"):
    gaze_attention(case.q, case.k, case.v, case.q_route, case.k_route, case.layout, top_k=1,
                   implementation="pallas")


def test_pallas_matches_reference_on_a_small_case():
  # The kernels run in interpret mode on CPU; the full sweep is in tests/kernels.
  case = random_case(800, group=2, routing="head", score="dot")
  out_r, ids_r = _run(case, "reference")
  out_p, ids_p = _run(case, "pallas")
  np.testing.assert_array_equal(ids_p, ids_r)
  np.testing.assert_allclose(out_p, out_r, atol=ATOL, rtol=1e-5)


def test_repeated_ids_in_a_given_selection_count_once():
  """A region listed twice in a caller's selection is read once by the gather path too."""
  case = random_case(800, group=2)
  _, ids = _run(case, "reference")
  doubled = jnp.concatenate([ids, ids], axis=-1)
  out_r, _ = _run(case, "reference", selection=doubled)
  out_x, ids_x = _run(case, "xla", selection=doubled)
  np.testing.assert_allclose(out_x, out_r, atol=ATOL)
  assert (np.asarray(ids_x[..., ids.shape[-1]:]) == -1).all()
