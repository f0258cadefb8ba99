"""The kernels under a device mesh: ``ops.gaze_attention`` and the dense model's splash
attention run in ``shard_map`` (examples over ``data`` x ``fsdp``, heads over ``tensor``) and give
the reference's output and gradients, on 8 simulated CPU devices (a subprocess: the device count
is fixed when jax starts). The gaze kernels' dense rows by splash run inside their shard_map."""

import json

import pytest

from tests.train.helpers import run_python

SCRIPT = r"""
import dataclasses, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from gaze_jax.train import sharding as shard_lib
from pallas_kernels import ops
from tests.gaze.random_cases import random_case
from tests.kernels.helpers import SMALL, run

assert jax.device_count() == 8
out = {}
for kernel, dense_rows in (("gpu", None), ("tpu", None), ("tpu", "splash")):
  # 4 examples, 4 KV heads (group 2): data 2 x fsdp 2 split the batch, tensor 2 the heads.
  case = random_case(70, batch=4, group=2, kv_heads=4, force_video=True)
  ref_out, ref_ids, ref_g = run(case)
  mesh = shard_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = dataclasses.replace(SMALL, kernel=kernel, interpret=True, dense_rows=dense_rows)
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  put = lambda x: jax.device_put(x, spec)
  case = dataclasses.replace(case, q=put(case.q), k=put(case.k), v=put(case.v),
                             q_route=put(case.q_route), k_route=put(case.k_route))
  with jax.set_mesh(mesh):
    got_out, got_ids, got_g = run(case, config=cfg)
    text = jax.jit(lambda q, k, v: ops.gaze_attention(
        q, k, v, q, k, case.layout, top_k=case.top_k, config=cfg)).lower(
            case.q, case.k, case.v).as_text()
  err = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
  out[kernel + (dense_rows or "")] = dict(out=err(got_out, ref_out), ids=bool((np.asarray(got_ids) == np.asarray(ref_ids)).all()),
                     grads=[err(a, b) for a, b in zip(got_g, ref_g)],
                     shard_map="shard_map" in text or "sdy.manual_computation" in text)

# The dense model's splash attention (full-sequence form) under the mesh against XLA's.
from gaze_jax.gaze import causal_attention
ks = jax.random.split(jax.random.PRNGKey(3), 4)
q = jax.random.normal(ks[0], (4, 96, 4, 8)); k = jax.random.normal(ks[1], (4, 96, 2, 8))
v = jax.random.normal(ks[2], (4, 96, 2, 8)); w = jax.random.normal(ks[3], q.shape)
pos = jnp.stack([jax.random.permutation(jax.random.PRNGKey(b), 96) for b in range(4)])
valid = jnp.arange(96)[None] < jnp.array([[96], [80], [96], [50]])
from pallas_kernels import splash
def dense_fn(impl):
  fused = splash.causal_kernel() if impl == "splash" else None
  f = lambda q, k, v: causal_attention(q, k, v, None, pos, valid, kernel=fused)
  return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](w) + (f(q, k, v),))
want = dense_fn("xla")(q, k, v)
with jax.set_mesh(mesh):
  sq, sk, sv = put(q), put(k), put(v)
  got = dense_fn("splash")(sq, sk, sv)
  text = dense_fn("splash").lower(sq, sk, sv).as_text()
out["splash"] = dict(errs=[err(a, b) for a, b in zip(got, want)],
                     shard_map="shard_map" in text or "sdy.manual_computation" in text)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
  p = run_python(SCRIPT, devices=8, timeout=900)
  line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


# ids without "gpu" / "tpu": those words are hardware markers (conftest skips them).
@pytest.mark.parametrize("kernel", ["gpu", "tpu", "tpusplash"],
                         ids=["triton", "mosaic", "mosaic-dense-rows-splash"])
def test_kernels_in_shard_map_match_the_reference(result, kernel):
  r = result[kernel]
  assert r["shard_map"], "the call did not run in shard_map"
  assert r["ids"]
  assert r["out"] < 2e-5, r
  assert max(r["grads"]) < 2e-5, r


def test_dense_splash_in_shard_map_matches_xla(result):
  r = result["splash"]
  assert r["shard_map"], "splash did not run in shard_map"
  assert max(r["errs"]) < 2e-5, r


def test_heads_the_tensor_axis_does_not_divide_are_an_error():
  """3 KV heads on a 2-way ``tensor`` axis: a ValueError naming both numbers (not a silent
  replication of the heads); with ``head_axis=None`` the heads replicate."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AbstractMesh, AxisType
  from pallas_kernels import ops
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  q = jax.ShapeDtypeStruct((4, 16, 6, 8), jnp.float32)
  k = jax.ShapeDtypeStruct((4, 16, 3, 8), jnp.float32)
  args = (q, k, k, q, k, None, None, None, None, None)
  with jax.sharding.use_abstract_mesh(mesh):
    with pytest.raises(ValueError, match=r"'tensor' has 2 devices.*3 KV heads"):
      ops._mesh_specs(ops.KernelConfig(), q, k, args)
    in_specs, _ = ops._mesh_specs(ops.KernelConfig(head_axis=None), q, k, args)
  assert in_specs[0] == jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None)
