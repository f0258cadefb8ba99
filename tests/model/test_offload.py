"""The visual KV in host memory while decoding (``gaze_jax.model.offload``): offloaded
``generate`` gives the tokens and logits of in-device ``generate``, its K/V really sit in host
memory (jax's memory kinds, real on CPU too), and the region cache's bookkeeping is that of a
plain least-recently-used cache written out in Python."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gaze_jax.model import GazeConfig
from gaze_jax.model.config import FieldError
from gaze_jax.model.generate import generate
from gaze_jax.model.offload import _plan_fetches, offload, offload_capacity
from tests.model.test_generate import M, make_batch, make_model

CONFIGS = {
    "head": GazeConfig(attention="gaze", top_k=2, region_shape=(2, 2), num_ctx=2),
    "group": GazeConfig(attention="gaze", top_k=2, region_shape=(2, 2), num_ctx=2,
                        routing="group"),
    "pallas": GazeConfig(attention="gaze", top_k=2, region_shape=(2, 2), num_ctx=2,
                         implementation="pallas", kernel={"interpret": True}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_offloaded_generate_equals_generate_in_device_memory(name):
  """float32, greedy: the same tokens, logits within 1e-5; the region cache serves part of the
  reads (K = 2 of 4 or 8 regions, 2 query heads per KV head: up to 4 regions a step)."""
  model = make_model(CONFIGS[name])
  tokens, layout, images = make_batch(model)
  want = generate(model, tokens, layout, images, max_new_tokens=M, return_logits=True)
  got = generate(model, tokens, layout, images, max_new_tokens=M, return_logits=True,
                 offload=True)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5,
                             rtol=0)
  assert want.regions_read is None and want.hit_rate is None
  read, fetched = np.asarray(got.regions_read), np.asarray(got.regions_fetched)
  # Every read is of a region block; the first step of each layer and KV head fetches.
  layers, kv_heads = model.cfg.decoder.num_layers, model.cfg.decoder.num_kv_heads
  assert (fetched >= layers * kv_heads).all() and (read > fetched).all(), (read, fetched)
  assert 0 < got.hit_rate < 1


def test_the_offloaded_cache_lies_in_host_memory():
  model = make_model(CONFIGS["head"])
  tokens, layout, images = make_batch(model)
  layout = layout.for_decoding()
  cap = offload_capacity(model.cfg, layout.max_regions)
  assert cap == 4                                      # 2 query heads per KV head x K = 2
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, tokens, layout, images):
    _, caches = nnx.merge(graphdef, state).prefill(tokens, layout, images)
    return offload(caches[0].k, caches[0].v, caches[0].descriptors, layout, cap)

  c = prefill(state, tokens, layout, images)
  assert c.k_host.sharding.memory_kind == c.v_host.sharding.memory_kind == "pinned_host"
  assert c.k_nv.sharding.memory_kind == c.buf_k.sharding.memory_kind == "device"
  D = model.cfg.decoder.head_dim
  assert c.buf_k.shape == (2 * 2 * cap, 4 * D)                      # an entry per row
  assert c.k_host.shape == (2 * 2 * layout.max_regions, 4 * D)     # a row per block
  assert c.k_nv.shape[1] == layout.nonvisual_index.shape[1]


def _lru_reference(steps, capacity):
  """Per step: the regions copied in, with a plain LRU over ``capacity`` entries (the regions a
  step reads are never evicted by that step; ties go to the lowest region id)."""
  held, last, out = [], {}, []
  for t, need in enumerate(steps):
    need = sorted(set(need))
    fetched = [r for r in need if r not in held]
    for r in fetched:
      if len(held) == capacity:
        victim = min((h for h in held if h not in need), key=lambda h: (last[h], h))
        held.remove(victim)
      held.append(r)
    for r in need:
      last[r] = t
    out.append(fetched)
  return out


def test_region_cache_bookkeeping_equals_a_plain_lru():
  rng = np.random.default_rng(0)
  C, U = 5, 3
  steps = [rng.choice(9, size=rng.integers(1, U + 1), replace=False).tolist()
           for _ in range(40)]
  buf_ids = jnp.full((C,), -1, jnp.int32)
  buf_used = jnp.full((C,), -1, jnp.int32)
  want = _lru_reference(steps, C)
  plan = jax.jit(_plan_fetches, static_argnums=4)
  for t, need in enumerate(steps):
    ids = jnp.asarray(need + [-1] * (U - len(need)) + need[:1], jnp.int32)   # dups, padding
    slot, need_u, miss, _, buf_ids, buf_used = plan(ids, buf_ids, buf_used, t, U)
    got = sorted(int(r) for r, m in zip(np.asarray(need_u), np.asarray(miss)) if m)
    assert got == sorted(want[t]), (t, need, got, want[t])
    # Every id read this step is held, at the slot given for it.
    held = np.asarray(buf_ids)
    for i, r in zip(np.asarray(slot), np.asarray(ids)):
      if r >= 0:
        assert held[i] == r


@pytest.mark.parametrize("misses", [0, 1, 7, 300])
def test_copy_misses_copies_exactly_the_missing_blocks(misses):
  """The copy loop (host gathers of 256 / 32 / 4 / 1 rows) against numpy: each missing block's
  host row lands in its entry, nothing else changes (300 misses take every copy size)."""
  from types import SimpleNamespace

  from gaze_jax.model.offload import OffloadedCache, _copy_misses
  rng = np.random.default_rng(misses)
  B, Hkv, U, NR, W = 2, 3, 60, 64, 8
  C = U
  host = rng.standard_normal((B * Hkv * NR, W)).astype(np.float32)
  buf = rng.standard_normal((B * Hkv * C, W)).astype(np.float32)
  need = np.stack([rng.permutation(NR)[:U] for _ in range(B * Hkv)]).reshape(B, Hkv, U)
  slot_u = np.stack([rng.permutation(C) for _ in range(B * Hkv)]).reshape(B, Hkv, U)
  miss = np.zeros(B * Hkv * U, bool)
  miss[rng.permutation(B * Hkv * U)[:misses]] = True
  miss = miss.reshape(B, Hkv, U)
  put = lambda x: jax.device_put(x, jax.memory.Space.Host)
  cache = OffloadedCache(put(host), put(host * 2), *[None] * 3, jnp.asarray(buf),
                         jnp.asarray(buf * 2), *[None] * 5)
  layout = SimpleNamespace(max_regions=NR)
  bk, bv = jax.jit(lambda *a: _copy_misses(*a, layout))(
      cache, jnp.asarray(need, jnp.int32), jnp.asarray(miss), jnp.asarray(slot_u, jnp.int32))
  want = buf.copy()
  for b, h, u in zip(*np.nonzero(miss)):
    want[(b * Hkv + h) * C + slot_u[b, h, u]] = host[(b * Hkv + h) * NR + need[b, h, u]]
  np.testing.assert_array_equal(np.asarray(bk), want)
  np.testing.assert_array_equal(np.asarray(bv), want * 2)


def test_offload_errors():
  model = make_model(GazeConfig(attention="dense", num_ctx=0, region_shape=(2, 2)))
  tokens, layout, images = make_batch(model)
  with pytest.raises(ValueError, match="offload keeps the visual K/V in host memory for gaze"):
    generate(model, tokens, layout, images, max_new_tokens=M, offload=True)
  with pytest.raises(FieldError, match="offload_cache"):
    GazeConfig(offload_cache=-1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8", "float8_e4m3fn", "float32"])
def test_host_rows_are_packed_and_unpacked_exactly(dtype):
  """A TPU slices host memory by whole 32-bit sublanes: narrower values travel packed into
  uint32, word j holding the values j, j + D', ... (checked here against numpy's own view of
  the bits)."""
  from gaze_jax.model.offload import _pack, _unpack, host_rows
  x = (jax.random.normal(jax.random.key(0), (6, 4, 16)) * 8).astype(dtype)
  packed = _pack(x)
  n = 4 // x.dtype.itemsize
  assert packed.dtype == (jnp.uint32 if n > 1 else x.dtype)
  assert packed.shape == (6, 4 * 16 // n) == host_rows(6, 4, 16, dtype).shape
  if n > 1:                       # value j + i * D' of a block row: word j, bits i * 32 / n up
    bits = np.asarray(x).view(f"uint{32 // n}")
    words = np.asarray(packed).reshape(6, 4, 16 // n)
    for i in range(n):
      np.testing.assert_array_equal((words >> (i * 32 // n)) & (2 ** (32 // n) - 1),
                                    bits[..., i * 16 // n:(i + 1) * 16 // n])
  back = np.asarray(_unpack(packed, dtype, 4))
  assert back.dtype == np.asarray(x).dtype
  np.testing.assert_array_equal(back.view(np.uint8), np.asarray(x).view(np.uint8))


def test_offloaded_generate_in_bfloat16_equals_generate_in_device_memory():
  import dataclasses
  model = make_model(CONFIGS["head"])
  cfg = dataclasses.replace(model.cfg, dtype="bfloat16")
  from gaze_jax.model import MLLM
  model = MLLM(cfg, rngs=nnx.Rngs(0))
  tokens, layout, images = make_batch(model)
  want = generate(model, tokens, layout, images, max_new_tokens=M, return_logits=True)
  got = generate(model, tokens, layout, images, max_new_tokens=M, return_logits=True,
                 offload=True)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=2e-2)
