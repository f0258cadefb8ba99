"""Checks of a training run that need more than its config, made before anything is written to
the workdir (``trainer.train`` calls ``check_before_writing`` after it has built the model and
the tokenizer, before it creates the workdir):

- the workdir is a folder, or can be made one (not a file, nor under one; local or ``gs://``);
- the compute dtype runs on this backend (float16 does not on CPU);
- the tokenizer's ids fit the model's vocabulary;
- the smallest example the run trains on (one image and the chat template around a one-letter
  answer) fits the layout: ``check_example_fits``, which ``check_train_config`` (the checks of
  the config alone, which ``train_main.py`` runs before any device is touched) also runs,
  without the tokenizer;
- the memory a train step needs at least per device (``gaze_jax.model.memory.estimate_memory``
  with fused attention, no compile) is not well above what a device has
  (``config.train.check_memory=False`` skips it).

Each failure raises ``PreflightError`` (a ValueError) naming the config field to change.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gaze_jax.data.features import LIMIT_FIELDS, ExampleProcessor, ExampleTooLong, Visual
from gaze_jax.gaze.layout import Text, build_layout, frames_needed, slots_needed
from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.memory import estimate_memory
from gaze_jax.train import data as data_lib
from gaze_jax.train.config import RunConfig, run_config

log = logging.getLogger("gaze_jax.train")

GiB = 1 << 30
# The estimate is accurate to tens of percent (gaze_jax.model.memory): a run is refused only
# when it needs more than this many times a device's memory.
MEMORY_MARGIN = 1.5
# The answer of the smallest example: one character, so at least one token is trained.
_ANSWER = "a"


class PreflightError(ValueError):
  """A run that cannot work, found before anything is written (the message names the field)."""


# --------------------------------------------------------------------------- example layout

def _smallest_example(run: RunConfig, tokenizer=None):
  """(processor, segments, description) of the smallest example this run trains on: one
  blank image at the model's size, as the run's media processing makes it (tiles included),
  and with ``tokenizer`` the chat template around an empty question and a one-letter answer,
  as the run's ``ExampleProcessor`` tokenizes it; without it, one answer token."""
  model_cfg, spec = run.model, run.spec
  fcfg = data_lib.feature_config(run, model_cfg, spec)     # refuses a model without vision
  blank = np.zeros((fcfg.image_size, fcfg.image_size, 3), np.uint8)
  if tokenizer is not None:
    proc = data_lib.example_processor(run, tokenizer, model_cfg, spec)
    segs, _ = proc.segments({"id": "smallest", "turns": [{"question": "", "answer": _ANSWER}],
                             "images": [blank]})
    text = "the chat template around an empty question and a one-letter answer"
  else:
    proc = ExampleProcessor(None, fcfg, media=data_lib.media_processor(run))
    segs = [p.segment for p in proc.media.image(blank) if isinstance(p, Visual)]
    segs.append(Text(1, generated=True))
    text = "one answer token"
  grids = [s for s in segs if not isinstance(s, Text)]
  n_text = sum(s.length for s in segs if isinstance(s, Text))
  desc = (f"one {blank.shape[0]} px image as {' + '.join(f'{s.gh} x {s.gw}' for s in grids)} "
          f"tokens in regions of config.model.gaze.region_shape={spec.region_shape}, "
          f"config.model.gaze.num_ctx={spec.num_ctx} context tokens after each grid, and "
          f"{n_text} text token{'' if n_text == 1 else 's'}: {text}")
  return proc, segs, desc


def check_example_fits(run: RunConfig, tokenizer=None) -> None:
  """Raises PreflightError naming the field when the smallest example this run trains on
  (``_smallest_example``: one image, and the chat template around a one-letter answer with
  ``tokenizer``, one answer token without it) does not fit the layout: ``config.data.seq_len``,
  ``max_regions``, ``max_images``, ``max_nonvisual`` too small, or
  ``config.model.gaze.region_shape`` larger than the image's token grid. The rules are those
  every batch is held to (``ExampleProcessor``'s fit check and ``build_layout``)."""
  proc, segs, desc = _smallest_example(run, tokenizer)
  spec = run.spec
  # The layout's structure first, with room for everything (else a region shape larger than
  # the grid would read as a sequence too long for seq_len).
  room = max(1, slots_needed(segs, spec))
  try:
    build_layout([segs], dataclasses.replace(spec, seq_len=room, max_regions=room,
                                             max_images=max(1, frames_needed(segs)),
                                             max_nonvisual=None))
  except ValueError as e:
    field = ("config.model.gaze.region_shape" if "region_shape" in str(e)
             else "the model's image layout")
    raise PreflightError(f"{field}: the smallest example this run trains on ({desc}) cannot "
                         f"be laid out: {e}") from None
  try:
    proc._check_fits(segs, "it")
    build_layout([segs], spec)
  except ExampleTooLong as e:
    names = [LIMIT_FIELDS[w] for w in e.needs if w in LIMIT_FIELDS]
    if run.data.max_nonvisual is None and "seq_len" in names and "max_nonvisual" in names:
      names.remove("max_nonvisual")              # None is seq_len: raising seq_len is the fix
    head = (" and ".join(f"config.data.{n}={getattr(run.data, n)!r}" for n in names)
            or "config.data (seq_len, max_regions, max_images, max_nonvisual)")
    head += " is too small" if len(names) == 1 else " are too small"
    raise PreflightError(f"{head} for the smallest example this run trains on ({desc}): "
                         f"{e}") from None
  except ValueError as e:
    raise PreflightError(f"config.data (seq_len, max_regions, max_images, max_nonvisual): the "
                         f"smallest example this run trains on ({desc}) does not fit: {e}") \
        from None


def check_train_config(config: Any, where: str = "config") -> RunConfig:
  """``run_config(config)``, the smallest example a training run trains on against its
  layout (``check_example_fits``, one answer token: the run's tokenizer and chat template are
  checked in ``check_before_writing``) and the top-K plan. Touches no device (train_main.py
  runs it before ``jax.distributed.initialize``). Raises ValueError naming the field."""
  run = run_config(config, where)
  check_example_fits(run)
  run.topk                               # noqa: B018 (derived and checked)
  return run


# --------------------------------------------------------------------------- the run

def check_workdir(workdir) -> None:
  """Raises PreflightError when ``workdir`` (local or ``gs://``) is a file or lies under one:
  the run could not create it."""
  path = epath.Path(workdir)
  for p in (path, *path.parents):
    if p.exists():
      if not p.is_dir():
        where = "is a file" if p == path else f"lies under {p}, a file"
        raise PreflightError(f"--workdir {workdir} {where}, not a folder: give a folder (new "
                             "or a run's) for the checkpoints, metrics and dataset")
      return


def check_dtype(model_cfg: MLLMConfig) -> None:
  """Raises PreflightError when this backend cannot run the model's compute dtype: attention in
  float16 (``jax.nn.dot_product_attention``, float32 accumulation) does not lower on CPU.
  Lowers that one op on a tiny abstract input (no compile, no data)."""
  q = jax.ShapeDtypeStruct((1, 2, 1, 8), jnp.dtype(model_cfg.dtype))
  try:
    jax.jit(jax.nn.dot_product_attention).lower(q, q, q)
  except ValueError as e:
    raise PreflightError(f"config.model.dtype={model_cfg.dtype!r} does not run on "
                         f"{jax.default_backend()}: its attention fails with \"{e}\"; use "
                         "'bfloat16' or 'float32' there") from None


def check_vocabulary(run: RunConfig, tokenizer) -> None:
  """Raises PreflightError when the tokenizer has more ids than the model's vocabulary (its
  ids at or above ``vocab_size`` would stop the run at the first example that uses one)."""
  n, V = getattr(tokenizer, "vocab_size", None), run.model.decoder.vocab_size
  if isinstance(n, int) and n > V:
    raise PreflightError(f"config.model.decoder.vocab_size={V} is below the {n} ids of the "
                         f"tokenizer (config.data.tokenizer={run.data.tokenizer!r}): "
                         f"set vocab_size >= {n}, or use the model's tokenizer")


def device_memory() -> Optional[tuple[int, str]]:
  """(bytes, description) of the memory one device has: ``memory_stats()["bytes_limit"]`` on
  an accelerator, the machine's physical memory split over its CPU devices on CPU; None when
  the backend does not say."""
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
    n = jax.local_device_count()
    return total // n, ("this machine's memory" if n == 1 else
                        f"this machine's {total / GiB:.1f} GiB split over its {n} CPU devices")
  try:
    limit = (dev.memory_stats() or {}).get("bytes_limit")
  except Exception:             # a backend without memory statistics
    limit = None
  return (int(limit), f"{dev.device_kind} memory") if limit else None


def check_memory(run: RunConfig) -> None:
  """Raises PreflightError when a train step needs more than ``MEMORY_MARGIN`` times a device's
  memory (``device_memory``) by ``estimate_memory``: batch ``config.data.batch_size`` over all
  devices, ``spec.seq_len`` slots, the model's dtypes and compiled K, the weights sharded
  when ``config.mesh`` has an fsdp or tensor axis.

  A lower bound, so that no run that fits is refused: one image per example (a Qwen-VL
  tower's activations are not counted, its weights are), one layer's
  activations at a time (as ``remat`` keeps them), and on the XLA path dense attention, whose
  scores over all S slots every gaze row computes too (the estimate of the gaze path also
  counts gathered region blocks for every slot, while only the text rows route).
  ``config.train.check_memory=False`` skips it."""
  if not run.train.check_memory:
    return
  model_cfg, spec = run.train_model, run.spec
  have = device_memory()
  if have is None:
    log.warning("memory check skipped: the %s backend reports no memory size",
                jax.default_backend())
    return
  mesh = run.mesh
  B, S, n = run.data.batch_size, spec.seq_len, jax.device_count()
  remat = model_cfg.decoder.remat
  impl = "pallas" if model_cfg.gaze.implementation == "pallas" else "xla"
  cfg = model_cfg if impl == "pallas" else dataclasses.replace(
      model_cfg, gaze=dataclasses.replace(model_cfg.gaze, attention="dense"))
  try:
    est = estimate_memory(cfg, batch=B, seq_len=S, devices=n,
                          fsdp=mesh.fsdp != 1 or mesh.tensor != 1,
                          param_bytes=jnp.dtype(model_cfg.param_dtype).itemsize,
                          compute_bytes=jnp.dtype(model_cfg.dtype).itemsize, remat=True,
                          images=1 if model_cfg.vision is not None else 0,
                          attention_impl=impl, compiled_top_k=model_cfg.gaze.top_k)
  except ValueError as e:     # a shape the estimate cannot describe: not the run's fault
    log.warning("memory check skipped: estimate_memory: %s", e)
    return
  total, (limit, what) = est.pop("total"), have
  if total <= MEMORY_MARGIN * limit:
    return
  top = sorted(est.items(), key=lambda kv: -kv[1])[:2]
  parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in top)
  raise PreflightError(
      f"config.data.seq_len={S} with config.data.batch_size={B}: a train step needs at least "
      f"{total / GiB:.1f} GiB per device (gaze_jax.model.memory.estimate_memory, one layer at "
      f"a time: {parts} GiB; {B} examples over {n} device(s)), more than "
      f"{MEMORY_MARGIN:g} x the {limit / GiB:.1f} GiB of {what}. Lower config.data.seq_len or "
      "config.data.batch_size"
      + ("" if remat else ", set config.model.decoder.remat=True")
      + (", set config.model.gaze.implementation='pallas'"
         if impl == "xla" and model_cfg.gaze.attention == "gaze" else "")
      + ", use more devices (config.mesh.fsdp shards the weights), or set "
      "config.train.check_memory=False to run anyway")


def check_before_writing(run: RunConfig, workdir, tokenizer) -> None:
  """Everything about a run that its config alone does not show (``check_train_config`` has
  checked that), before the trainer writes to ``workdir``: the workdir, the compute dtype on
  this backend, the tokenizer against the vocabulary, the smallest example with the run's
  tokenizer against the layout, the memory. Raises PreflightError naming the field."""
  check_workdir(workdir)
  check_dtype(run.model)
  check_vocabulary(run, tokenizer)
  check_example_fits(run, tokenizer)
  check_memory(run)
