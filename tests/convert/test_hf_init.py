"""``gaze_jax.convert.sharded``: a Hugging Face folder read straight into sharded parameters.

On 8 simulated devices (fsdp 4 x tensor 2, a subprocess: the device count is fixed when jax
starts), the sharded load equals the eager loader's parameters exactly, with the requested
shardings, and no read is larger than the piece that one device holds. Bad folders are errors
naming the file and the key, raised before any weight is read."""

import json

import numpy as np
import pytest

from tests.hf_folders import save_llava_onevision
from tests.train.helpers import run_python

pytest.importorskip("transformers")

SHARDED = r"""
import json, sys
import jax, numpy as np
from flax import nnx
from gaze_jax.convert import hf_io
from gaze_jax.convert.families import plan_hf
from gaze_jax.convert.hf import build_planned
from gaze_jax.convert.mapping import param_paths
from gaze_jax.convert.sharded import flat_paths, load_sharded
from gaze_jax.model import GazeConfig
from gaze_jax.train import sharding as shard_lib
from gaze_jax.train.checkpoint import abstract_like, abstract_params

reads = []
real = hf_io.Checkpoint.read_slice
def counting(self, name, index):
  out = real(self, name, index)
  reads.append((name, out.size, int(np.prod(self.shape(name)))))
  return out
hf_io.Checkpoint.read_slice = counting

gaze = GazeConfig(attention="gaze", num_ctx=2, region_shape=(2, 2), top_k=1)
plan = plan_hf(sys.argv[1], gaze)
mesh = shard_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
_, abs_state, _ = abstract_params(plan.model)
shardings = shard_lib.named(mesh, shard_lib.param_specs(abs_state, shard_lib.DEFAULT_RULES, mesh))
abstract = abstract_like(nnx.to_pure_dict(abs_state), shardings)
params = load_sharded(plan, abstract, seed=5)
got, _ = flat_paths(params)
want = {k: np.asarray(v.get_value()) for k, v in param_paths(build_planned(plan, seed=5)).items()}
shard_of, _ = flat_paths(shardings)
print(json.dumps({
    "same_keys": sorted(got) == sorted(want),
    "max_diff": max(float(np.max(np.abs(np.asarray(got[k]) - want[k]))) for k in want
                    if k not in plan.weights.fresh),
    "fresh_diff": max(float(np.max(np.abs(np.asarray(got[k]) - want[k])))
                      for k in plan.weights.fresh),
    "fresh_std": float(np.std(np.asarray(got["ctx_embed"]))),
    "shardings_ok": all(got[k].sharding == shard_of[k] for k in got),
    "sharded_params": sum(not s.is_fully_replicated for s in shard_of.values()),
    "largest_read_of_sharded": max((n / total for name, n, total in reads if n < total),
                                   default=0.0),
    "whole_reads_of_sharded": sorted({name for name, n, total in reads if n == total
                                      and total > 1000}),
}))
"""


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llava_ov")
  save_llava_onevision(path, seed=3)
  return path


def test_hf_init_sharded_load_equals_the_eager_loader(llava_dir):
  p = run_python(SHARDED.replace("sys.argv[1]", repr(str(llava_dir))), devices=8, timeout=600)
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["same_keys"] and out["shardings_ok"]
  assert out["max_diff"] == 0.0                       # the checkpoint's float32 values
  # The context tokens start from their initialiser, as in the eager model (the same draws;
  # jit may round the scaling differently in the last bit).
  assert out["fresh_diff"] <= 1e-8 and 0.01 < out["fresh_std"] < 0.04
  assert out["sharded_params"] > 10
  # Each host read is a device's piece: at most half a tensor (tensor axis 2, fsdp 4).
  assert 0 < out["largest_read_of_sharded"] <= 0.5


def test_hf_init_bad_folders_name_the_file_and_key(llava_dir, tmp_path):
  import shutil

  from gaze_jax.convert.families import plan_hf
  from gaze_jax.convert.sharded import check_plan, flat_paths
  from gaze_jax.train.checkpoint import abstract_params
  from flax import nnx

  def copy(name, edit=None):
    d = tmp_path / name
    shutil.copytree(llava_dir, d)
    if edit:
      cfg = json.loads((d / "config.json").read_text())
      edit(cfg)
      (d / "config.json").write_text(json.dumps(cfg))
    return d

  d = copy("unknown", lambda c: c.update(model_type="blip_2"))
  with pytest.raises(ValueError, match=r"unknown/config.json: model_type='blip_2' is not a "
                     "family we convert"):
    plan_hf(d)
  d = copy("missing")
  (d / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="missing has no model.safetensors"):
    plan_hf(d)
  # A config that disagrees with the weights: the first mismatching tensor and its file.
  d = copy("wrong", lambda c: c["text_config"].update(intermediate_size=100))
  plan = plan_hf(d)
  _, abs_state, _ = abstract_params(plan.model)
  abstract, _ = flat_paths(nnx.to_pure_dict(abs_state))
  with pytest.raises(ValueError, match=r"wrong: tensor '.*mlp.(gate|up|down)_proj.weight' in "
                     r".*model.safetensors has shape \(\d+, \d+\), but decoder.layers.0.mlp"):
    check_plan(plan, abstract)


def test_hf_init_config_takes_the_model_shape_from_the_folder(llava_dir):
  """``model.init=hf:<folder>``: the folder gives the shape, the run's config the gaze settings,
  dtypes and the decoder's runtime fields; a shape field that disagrees stops the run, named."""
  from configs import common
  from gaze_jax.train.config import run_config

  c = common.hf_base_config(str(llava_dir))
  c.model.decoder.remat = True
  c.model.gaze.top_k = 3
  cfg = run_config(c).model
  assert (cfg.decoder.hidden_size, cfg.decoder.num_layers, cfg.vision.image_size) == (64, 2, 32)
  assert cfg.decoder.remat and cfg.gaze.top_k == 3 and cfg.projector == "mlp2x_gelu"
  c.model.decoder.hidden_size = 64                      # agreeing with the folder is fine
  assert run_config(c).model.decoder.hidden_size == 64
  c.model.decoder.hidden_size = 32
  with pytest.raises(ValueError, match=r"config.model.decoder.hidden_size=32, but .*config.json "
                     "gives 64"):
    run_config(c).model
  c.model.decoder.hidden_size = 64
  c.model.projector = "pixel_shuffle"
  with pytest.raises(ValueError, match=r"config.model.projector='pixel_shuffle', but "):
    run_config(c).model
  c.model.projector = None
  c.model.init = "hf:"
  with pytest.raises(ValueError, match="'hf:' names no folder"):
    run_config(c).model


def test_hf_init_weights_that_do_not_fit_stop_the_run_before_it_writes(tmp_path):
  """A folder whose config.json disagrees with its weights: train() names the tensor and the
  file from the headers, before the workdir exists."""
  from configs import common
  from gaze_jax.train import trainer
  from tests.llava_onevision_folder import save_folder

  bad = tmp_path / "bad"
  save_folder(bad)                  # with its processor files: the run checks its examples too
  cfg = json.loads((bad / "config.json").read_text())
  cfg["text_config"]["intermediate_size"] = 100
  (bad / "config.json").write_text(json.dumps(cfg))
  c = common.hf_base_config(str(bad))
  c.data.tokenizer = "byte"
  c.mesh.data = 1
  c.data.batch_size = 1
  work = tmp_path / "work"
  with pytest.raises(ValueError, match=r"bad: tensor '.*mlp.(gate|up|down)_proj.weight' in "
                     r".*model.safetensors has shape"):
    trainer.train(c, str(work))
  assert not work.exists()
