"""Training a Qwen2.5-VL / Qwen3-VL model from its Hugging Face folder: the static tower grids
a run's one bucket fixes (``qwen_static_grids``), and the train step's use of the patch rows
(the fixed grids inside jit give the loss that the batch's own grids give; the patches count).
The whole journey (8 devices, export, transformers) is ``tests/test_journey.py``."""

import dataclasses

import jax
import numpy as np
import pytest

from gaze_jax.train import config as cfg_lib

pytest.importorskip("transformers")


def _config(folder, data, family="qwen2_5_vl"):
  from configs import qwen2_5_vl_7b

  c = qwen2_5_vl_7b.get_config(str(folder), (112, 112) if family == "qwen2_5_vl" else (128, 128))
  c.data.builder_overrides.json_files.train = data["json_files"]["train"]
  c.data.builder_overrides.json_files.validation = data["json_files"]["validation"]
  c.data.builder_overrides.image_dir = data["image_dir"]
  c.model.dtype = "float32"
  c.model.gaze.region_shape = (2, 2)
  c.model.gaze.num_ctx = 2
  c.model.gaze.top_k = 2
  c.data.seq_len, c.data.max_regions, c.data.batch_size = 192, 8, 4
  c.data.num_threads = 1
  c.mesh.tensor = 1
  c.topk_schedule.enabled = False
  return c


# Qwen3-VL's train step in make test-all (its model and kernels have fast tests of their own).
@pytest.fixture(scope="module", params=["qwen2_5_vl", pytest.param("qwen3_vl",
                                                                  marks=pytest.mark.slow)])
def run(request, tmp_path_factory):
  from tests.data.qwen_vl_folder import save_model_folder
  from tests.hf_folders import write_llava_json

  family = request.param
  root = tmp_path_factory.mktemp(family)
  save_model_folder(root / "model", family)
  data = write_llava_json(root / "data", n=12, size=64, validation=4)
  return family, root, _config(root / "model", data, family)


def test_one_bucket_fixes_the_tower_grids_qwen2_5_vl_qwen3_vl(run):
  family, _, c = run
  p = 14 if family == "qwen2_5_vl" else 16
  g = 112 // p if family == "qwen2_5_vl" else 128 // p
  assert cfg_lib.run_config(c).model.qwen_grids == ((1, g, g),) * 2     # max_images = 2
  assert cfg_lib.run_config(c).train_model.qwen_grids == ((1, g, g),) * 2
  c.data.max_patches = g * g + 3                      # room for one frame's rows only
  assert cfg_lib.run_config(c).model.qwen_grids == ((1, g, g),)
  c.data.max_patches = 0
  c.data.buckets = ((112, 112), (56, 112)) if family == "qwen2_5_vl" else ((128, 128), (64, 128))
  assert cfg_lib.run_config(c).model.qwen_grids == ()   # several: each batch's own grids
  c.data.buckets = ((112, 112),) if family == "qwen2_5_vl" else ((128, 128),)


def test_train_step_reads_the_patches_with_fixed_or_batch_grids_qwen2_5_vl_qwen3_vl(run):
  from gaze_jax.model.mllm import QwenPatches
  from gaze_jax.runs import run_tokenizer
  from gaze_jax.train import data as data_lib
  from gaze_jax.train import trainer
  from gaze_jax.train.step import step_batch, visual_input

  family, root, c = run
  s = trainer.build(c)
  assert s.model_cfg.qwen_grids
  state = trainer.hf_init_state(s, str(root / "model"), seed=0)
  builder = data_lib.prepare(s.config, root / "work")
  tok = run_tokenizer(s.config)
  batch = next(data_lib.make_iterator(s.config, builder, tok, s.model_cfg, s.spec))
  assert np.asarray(batch["patches"]).any()
  fn = jax.jit(s.train_step.eval_fn)

  fixed = step_batch(batch, s.batch_sharding, s.model_cfg)
  assert isinstance(visual_input(fixed, s.model_cfg), QwenPatches)
  assert visual_input(fixed, s.model_cfg).grids is None          # the config's grids
  own = step_batch(batch, s.batch_sharding, dataclasses.replace(s.model_cfg, qwen_grids=()))
  assert own["images"].grids == QwenPatches.grids_of(batch["patch_grids"])
  a, b = fn(state["params"], fixed), fn(state["params"], own)
  np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
  # The patches reach the loss: other pixels, another loss.
  other = dict(batch, patches=np.asarray(batch["patches"])[::-1].copy())
  z = fn(state["params"], step_batch(other, s.batch_sharding, s.model_cfg))
  assert abs(float(z["loss"]) - float(a["loss"])) > 1e-4
  # The train step runs; the tower gets gradients (the first step's learning rate is 0).
  _, m = s.train_step.jit(s.state_shardings, s.batch_sharding,
                          jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()))(
      jax.tree.map(lambda x: x.copy(), state), fixed)
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  grads = jax.grad(lambda p: s.train_step.loss_fn(p, fixed, None)[0])(state["params"])
  assert float(np.abs(np.asarray(grads["vision"]["blocks"][0]["attn"]["qkv"]["kernel"])).max()) > 0


def test_several_buckets_refuse_a_multi_process_run_qwen2_5_vl():
  from gaze_jax.model.presets import get_preset
  from gaze_jax.train.step import check_static_grids

  cfg = get_preset("qwen2_5_vl_3b")
  assert not cfg.qwen_grids
  check_static_grids(cfg, 1)
  with pytest.raises(ValueError, match="config.data.buckets"):
    check_static_grids(cfg, 2)
  check_static_grids(dataclasses.replace(cfg, qwen_grids=((1, 16, 16),)), 2)
