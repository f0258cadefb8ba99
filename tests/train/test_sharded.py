"""Sharding on 8 simulated CPU devices (run in a subprocess: the device count is fixed when
jax starts) and a two-process run through ``jax.distributed`` on loopback.

* The sharded step (data-only, fsdp, tensor and mixed meshes) gives the loss and updated
  parameters of the single-device step.
* A checkpoint saved from one mesh restores onto another mesh shape (and onto one device)
  with the target shardings and the same values.
"""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.train.helpers import ROOT, run_python

SHARDED = r"""
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tests.train.helpers import small_config
from gaze_jax import runs
from gaze_jax.train import trainer, data as data_lib, sharding as shard_lib
from gaze_jax.train import checkpoint as ckpt_lib

assert jax.device_count() == 8
c = small_config(sys.argv[1])
single = shard_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
s1 = trainer.build(c, single)
builder = data_lib.prepare(s1.config, sys.argv[2])
it = data_lib.make_iterator(s1.config, builder, runs.make_tokenizer("byte"), s1.model_cfg, s1.spec)
batches = [next(it) for _ in range(2)]
init = jax.device_get(trainer.init_state(s1, 0))

def run(s):
  state = jax.device_put(init, s.state_shardings)
  f = s.train_step.jit(s.state_shardings, s.batch_sharding, NamedSharding(s.mesh, P()))
  losses = []
  for b in batches:
    state, m = f(state, shard_lib.shard_batch(b, s.batch_sharding))
    losses.append(float(m["loss"]))
  return losses, state

ref_loss, ref_state = run(s1)
ref = jax.device_get(ref_state["params"])
out = {"ref_loss": ref_loss, "meshes": {}}
for sizes in ({"data": 8}, {"fsdp": 8}, {"data": 1, "fsdp": 2, "tensor": 4}):
  mesh = shard_lib.make_mesh(sizes)
  s = trainer.build(c, mesh)
  # Fresh initialisation directly on the mesh gives the same weights as on one device.
  init_mesh = jax.device_get(trainer.init_state(s, 0)["params"])
  init_diff = max(float(np.max(np.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(init_mesh), jax.tree.leaves(init["params"])))
  losses, state = run(s)
  got = jax.device_get(state["params"])
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
  scale = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(ref), jax.tree.leaves(init["params"])))
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state["params"])})
  opt_specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state["opt_state"])})
  out["meshes"][json.dumps(sizes)] = dict(loss=losses, param_diff=diff, update_scale=scale,
                                          init_diff=init_diff, specs=specs, opt_specs=opt_specs)
  if sizes == {"fsdp": 8}:
    saved = state

# Save from the fsdp=8 mesh, restore onto data=2 x tensor=4 and onto one device.
ck = ckpt_lib.Checkpointer(sys.argv[2] + "/ckpt", save_every=1, keep=2)
ck.save(2, saved, {"pos": 2}, force=True)
ck.wait()
want = jax.device_get(saved["params"])
out["restore"] = {}
for sizes, devs in (({"data": 2, "tensor": 4}, None), ({"data": 1}, jax.devices()[:1])):
  s = trainer.build(c, shard_lib.make_mesh(sizes, devices=devs))
  got = ck.restore(ckpt_lib.abstract_like(s.abstract_params, s.state_shardings["params"]),
                   ckpt_lib.abstract_like(s.abstract_opt_state, s.state_shardings["opt_state"]))
  same_sharding = all(a.sharding == b for a, b in zip(jax.tree.leaves(got.params),
                                                       jax.tree.leaves(s.state_shardings["params"])))
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(jax.device_get(got.params)), jax.tree.leaves(want)))
  out["restore"][json.dumps(sizes)] = dict(step=got.step, data=got.data, same_sharding=same_sharding,
                                           diff=diff, devices=len(got.params["ctx_embed"].sharding.device_set))
ck.close()
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded_result(train_data_dir, tmp_path_factory):
  work = tmp_path_factory.mktemp("sharded")
  p = run_python(SHARDED.replace("sys.argv[1]", repr(str(train_data_dir)))
                 .replace("sys.argv[2]", repr(str(work))), devices=8, timeout=600)
  line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_sharded_steps_match_the_single_device_step(sharded_result):
  ref = sharded_result["ref_loss"]
  assert len(sharded_result["meshes"]) == 3
  for mesh, r in sharded_result["meshes"].items():
    np.testing.assert_allclose(r["loss"], ref, rtol=1e-5, err_msg=mesh)
    assert r["init_diff"] == 0.0, mesh
    # Two AdamW steps move weights by ~5e-3; the meshes agree to float32 round-off.
    assert r["update_scale"] > 1e-3
    assert r["param_diff"] < 1e-6, (mesh, r["param_diff"])


def test_meshes_really_shard_params_and_optimizer_state(sharded_result):
  m = sharded_result["meshes"]
  assert not any(a in s for s in m['{"data": 8}']["specs"] for a in ("data", "fsdp", "tensor"))
  assert any("fsdp" in s for s in m['{"fsdp": 8}']["specs"])
  assert any("fsdp" in s for s in m['{"fsdp": 8}']["opt_specs"])
  mixed = m['{"data": 1, "fsdp": 2, "tensor": 4}']["specs"]
  assert any("tensor" in s for s in mixed)
  assert any("fsdp" in s and "tensor" in s for s in mixed)


def test_checkpoint_restores_onto_another_mesh_shape(sharded_result):
  for mesh, r in sharded_result["restore"].items():
    assert r["step"] == 2 and r["data"] == {"process_count": 1, "states": [{"pos": 2}]}
    assert r["same_sharding"], mesh
    assert r["diff"] == 0.0, mesh
  assert sharded_result["restore"]['{"data": 2, "tensor": 4}']["devices"] == 8
  assert sharded_result["restore"]['{"data": 1}']["devices"] == 1


TWO_PROCESS = r"""
import json, sys
from tests.train.helpers import small_config
from gaze_jax.train import trainer
from gaze_jax.train.config import run_config
c = small_config({data!r}, train__num_steps=3, checkpoint__save_every=3)
c.distributed.coordinator_address = "127.0.0.1:{port}"
c.distributed.num_processes = 2
c.distributed.process_id = int(sys.argv[1])
trainer.maybe_initialize_distributed(run_config(c))
import jax
assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
c.mesh.data = 2
c.mesh.fsdp = 2
summary = trainer.train(c, {work!r})
# Both processes check a share of the files against the checksums process 0 recorded.
from gaze_jax.train import checkpoint as ckpt_lib
ck = ckpt_lib.Checkpointer({work!r} + "/checkpoints", read_only=True)
verified = ck.verify(3)
ck.close()
print("RESULT" + json.dumps(dict(step=summary["step"], loss=summary["train"].get("loss"),
                                 process=jax.process_index(), verified=verified)))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_through_jax_distributed(train_data_dir, tmp_path):
  import os
  code = TWO_PROCESS.format(data=str(train_data_dir), port=_free_port(), work=str(tmp_path))
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-5000:]
    outs.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT")][-1][6:]))
  assert sorted(o["process"] for o in outs) == [0, 1]
  assert all(o["step"] == 3 for o in outs)
  primary = [o for o in outs if o["process"] == 0][0]
  assert np.isfinite(primary["loss"])
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3]
  assert (tmp_path / "checkpoints" / "3" / "params").is_dir()
  # The checksums, recorded once every process had written, cover both processes' files.
  files = json.loads((tmp_path / "checkpoints" / "3" / "checksums.json").read_text())["files"]
  assert any("ocdbt.process_1/" in f for f in files) and any("ocdbt.process_0/" in f for f in files)
  assert all(o["verified"] for o in outs)
  data = json.loads((tmp_path / "checkpoints" / "3" / "data" / "metadata").read_text()) \
      if (tmp_path / "checkpoints" / "3" / "data" / "metadata").exists() else None
  if data is not None:     # both hosts' iterator positions are in the checkpoint
    assert data["process_count"] == 2 and len(data["states"]) == 2
