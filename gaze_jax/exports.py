"""Exports of a trained run (``export_main.py``).

* ``export_hf(workdir, out)``: the Hugging Face folder of a run started from
  ``model.init=hf:<folder>``: that folder's files with the run's weights
  (``gaze_jax.convert.export``), which transformers loads and ``model.init=hf:`` restores;
* ``export_params(workdir, out)``: parameters only, for serving: the run's ``config.json`` and a
  checkpoint of the parameters (no optimizer state, no data position) under
  ``<out>/checkpoints``, a folder that ``eval_main.py`` / ``predict_main.py`` take as
  ``--workdir``.

Both read the run's latest (or a given) checkpoint onto a mesh of the local devices, so no
device holds the whole model, and write to any ``etils.epath`` path (local or ``gs://``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import numpy as np
from etils import epath
from flax import nnx

from gaze_jax import runs
from gaze_jax.convert import export as export_lib
from gaze_jax.convert.families import plan_hf
from gaze_jax.convert.sharded import flat_paths
from gaze_jax.train import checkpoint as ckpt_lib
from gaze_jax.train import sharding as shard_lib
from gaze_jax.train.model_init import hf_folder

log = logging.getLogger(__name__)


def _restore(workdir, step: Optional[int]):
  """``(run config, Restored)`` of a run, its parameters sharded over the local devices by the
  run's logical axis rules (fsdp over all of them)."""
  config = runs.load_run_config(workdir)
  mesh = shard_lib.make_mesh({"data": 1, "fsdp": jax.local_device_count(), "tensor": 1},
                             devices=jax.local_devices())
  return config, runs.restore(config, workdir, step, mesh=mesh, rules=config.logical_axis_rules)


def _flat_params(model) -> dict[str, Any]:
  return flat_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]


def export_hf(workdir, out, *, step: Optional[int] = None, dtype: Optional[str] = None,
              max_shard_bytes: int = 2 << 30) -> dict:
  """Writes the run in ``workdir`` as a Hugging Face folder at ``out``.

  Raises ValueError when the run did not start from a Hugging Face folder (``model.init=hf:``:
  its ``config.json``, tokenizer and processor files are the export's), and the checkpoint's
  errors (``CheckpointError``) when no step restores. Returns the writer's summary with the
  step exported.
  """
  config, run = _restore(workdir, step)
  folder = hf_folder(config.init)
  if folder is None:
    raise ValueError(f"{workdir}: the run started from model.init={config.init!r}, not a "
                     "Hugging Face folder (hf:<folder>), whose config, tokenizer and processor "
                     "files the export needs; use --params_only for a serving export")
  cfg = run.model_cfg
  plan = plan_hf(folder, cfg.gaze, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  summary = export_lib.export_hf(_flat_params(run.model), plan, out, gaze=cfg.gaze, dtype=dtype,
                                 max_shard_bytes=max_shard_bytes,
                                 extra_config={"run": str(workdir), "step": int(run.step)})
  log.info("exported step %d of %s to %s (%d tensors, %.1f MB)", run.step, workdir, out,
           summary["tensors"], summary["bytes"] / 1e6)
  return {**summary, "step": int(run.step)}


def export_params(workdir, out, *, step: Optional[int] = None) -> dict:
  """Writes the run's parameters (no optimizer state) at ``out`` as a run folder for serving:
  ``config.json`` and ``checkpoints/<step>/{params, data, meta}`` with their checksums."""
  config, run = _restore(workdir, step)
  _, meta = runs.trained_model(workdir, run.step, config)
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text((epath.Path(workdir) / "config.json").read_text())
  ckpt = ckpt_lib.Checkpointer(out / ckpt_lib.CHECKPOINT_DIR, keep=1, async_save=False)
  params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
  meta = {**meta, "exported_from": {"workdir": str(workdir), "step": int(run.step)}}
  ckpt.save(int(run.step), {"params": params, "opt_state": None}, None, meta, force=True)
  ckpt.close()
  size = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
  log.info("exported the parameters of step %d of %s to %s (%.1f MB)", run.step, workdir, out,
           size / 1e6)
  return {"step": int(run.step), "bytes": size, "files": ["config.json",
                                                          ckpt_lib.CHECKPOINT_DIR]}
