"""The training step with the Pallas kernels (interpret mode) on 8 simulated CPU devices
(``data=2, fsdp=2, tensor=2``) gives the loss and updated parameters of the single-device step.
Its compiled HLO gathers no K/V: the kernels run in ``shard_map`` on each shard's examples and
heads (the same check on a step whose ``shard_map`` is taken away finds the partitioner's K/V
all-gathers, so it can fail). The activations carry sharding constraints by the logical
rules."""

import json

import numpy as np
import pytest

from tests.train.helpers import run_python

SCRIPT = r"""
import json, re, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tests.train.helpers import small_config
from gaze_jax import runs
from gaze_jax.train import trainer, data as data_lib, sharding as shard_lib
from pallas_kernels import ops

assert jax.device_count() == 8
c = small_config(DATA)
c.model.gaze.implementation = "pallas"
c.model.gaze.kernel.interpret = True
single = shard_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
s1 = trainer.build(c, single)
builder = data_lib.prepare(s1.config, WORK)
it = data_lib.make_iterator(s1.config, builder, runs.make_tokenizer("byte"), s1.model_cfg, s1.spec)
batches = [next(it) for _ in range(2)]
init = jax.device_get(trainer.init_state(s1, 0))

def step_fn(s):
  return s.train_step.jit(s.state_shardings, s.batch_sharding, NamedSharding(s.mesh, P()))

def run(s):
  state = jax.device_put(init, s.state_shardings)
  f = step_fn(s)
  losses = []
  for b in batches:
    state, m = f(state, shard_lib.shard_batch(b, s.batch_sharding))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state["params"])

def kv_gathers(s):
  state = jax.device_put(init, s.state_shardings)
  lowered = step_fn(s).lower(state, shard_lib.shard_batch(batches[0], s.batch_sharding))
  pre = lowered.as_text()
  text = lowered.compile().as_text()
  shapes = re.findall(r"= \w+\[([0-9,]+)\]\{[^}]*\} all-gather", text)
  constraints = pre.count("sdy.sharding_constraint") + pre.count("@Sharding")
  # K/V-sized: rank 4 over the 80 slots ([B', S, H', D']); the plan's [B, S] fields may move.
  return [x for x in shapes if len(x.split(",")) == 4 and x.split(",")[1] == "80"], constraints

ref_loss, ref = run(s1)
mesh = shard_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
s = trainer.build(c, mesh)
losses, got = run(s)
out = dict(ref_loss=ref_loss, loss=losses,
           param_diff=max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))),
           update_scale=max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(init["params"]))))
out["gathers"], out["constraints"] = kv_gathers(s)
ops._mesh_specs = lambda *a: None      # the same step without shard_map
out["gathers_without_shard_map"], _ = kv_gathers(trainer.build(c, mesh))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result(train_data_dir, tmp_path_factory):
  work = tmp_path_factory.mktemp("sharded_pallas")
  code = SCRIPT.replace("DATA", repr(str(train_data_dir))).replace("WORK", repr(str(work)))
  p = run_python(code, devices=8, timeout=1200)
  line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_sharded_pallas_step_matches_the_single_device_step(result):
  np.testing.assert_allclose(result["loss"], result["ref_loss"], rtol=1e-5)
  assert result["update_scale"] > 1e-3
  assert result["param_diff"] < 1e-6, result["param_diff"]


def test_activations_carry_sharding_constraints(result):
  # q, k, v, the attention output, the MLP hidden layer and the residual stream, per layer.
  assert result["constraints"] >= 2 * 6, result["constraints"]


def test_sharded_pallas_step_gathers_no_kv(result):
  assert result["gathers_without_shard_map"], "the check finds no K/V all-gather to catch"
  assert result["gathers"] == [], result["gathers"]
