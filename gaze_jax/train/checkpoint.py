"""Checkpoints: an orbax ``CheckpointManager`` holding the train state and the data position.

Layout: ``<workdir>/checkpoints/<step>/{params, opt_state, data, meta}``:

* ``params``: the float32 master weights (``nnx.to_pure_dict`` layout), saved sharded;
* ``opt_state``: the optax state (same sharding as the parameters it mirrors);
* ``data``: JSON ``{"process_count": n, "states": [grain iterator state of each process]}``
  (the position after the step's batch), so a resumed run continues the data order exactly;
* ``meta``: JSON ``{"step", "model" (MLLMConfig fields), "config" (the run config),
  "tokenizer" ({"name", "fingerprint"}), "topk_plan"}``;
* ``checksums.json``: ``{"algorithm": "crc32", "files": {"params/...": {"size", "crc32"}}}``,
  the size and CRC-32 of every file of the four items, recorded when the step is committed.

Saving is asynchronous (orbax writes in a background thread after copying device arrays to
host memory), every ``save_every`` steps (``FixedIntervalPolicy``) keeping the last ``keep``
(``LatestN``); ``save(..., force=True)`` saves now (SIGTERM, the last step). The checksums are
computed in that background thread too, from the written files, once every process has written
its part and before orbax commits the step: a committed step always has them.

The directory may be local or ``gs://`` (every file goes through ``etils.epath``). Orbax commits
a local step by renaming its temporary folder ``<step>.orbax-checkpoint-tmp-*`` to ``<step>``;
on Cloud Storage (no atomic rename) it writes ``<step>`` in place and commits it by writing
``<step>/commit_success.txt`` last, so there a step folder without that file is the incomplete
one. Either way the checksums are written before the commit.

Restoring goes against an abstract tree of ``jax.ShapeDtypeStruct`` carrying the *target*
shardings, so a checkpoint written on one mesh restores onto any other mesh / device count.

Damage is never silently ignored:

* an incomplete save (interrupted job: orbax's ``*.orbax-checkpoint-tmp-*`` folder, or on
  ``gs://`` a step folder without its commit file) is reported with a warning naming it and
  then removed (by orbax);
* before a step is restored, the files of the items it reads are checked against its
  ``checksums.json`` (each process checks a share of the files); a missing, truncated or
  altered file makes the step damaged (``DamagedCheckpoint``, naming the step and the files);
  a step without ``checksums.json`` (saved before they were recorded) is restored with a
  warning that it was not verified;
* a step whose restore fails (damaged, or orbax cannot read it) raises ``CheckpointError``
  naming the folder and the cause, or, with ``fallback=True`` (the trainer's default, and only
  when no step was requested explicitly), is reported with a warning and the previous step is
  tried;
* once an earlier step restores, the later steps that failed are moved aside (renamed
  ``<step>.damaged``, kept for inspection and reported at every start; on ``gs://`` the rename
  copies the step's objects) unless the checkpointer is read-only (evaluation): they no longer
  count towards ``keep``, and the resumed run saves those steps anew. When no step restores (a
  changed model, say), nothing is moved.

For evaluation: ``restore_model(workdir, config)`` returns ``(MLLM, step)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import zlib
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from gaze_jax import logs, paths
from gaze_jax.data.tokenizers import fingerprint
from gaze_jax.model.abstract import abstract_model
from gaze_jax.model.config import MLLMConfig
from gaze_jax.train import sharding
from gaze_jax.train.config import run_config
from gaze_jax.train.errors import CheckpointError
from gaze_jax.train.nonfinite import check_finite

ITEMS = ("params", "opt_state", "data", "meta")
CHECKPOINT_DIR = "checkpoints"
TMP_MARKER = ".orbax-checkpoint-tmp"
CHECKSUMS = "checksums.json"
DAMAGED = ".damaged"


class DamagedCheckpoint(CheckpointError):
  """A step's files are missing or differ from the checksums recorded when it was saved."""


class Restored(NamedTuple):
  step: int
  params: Any
  opt_state: Any
  data: Optional[dict]
  meta: Optional[dict]


# The data item is not grain's orbax handler (grain.checkpoint.CheckpointSave / Restore, grain
# 0.2.18): it writes one process_<i>-of-<n>.json per process but restores only onto the same
# process count (an error otherwise, where a run here restarts its data order with a warning
# and keeps the weights), and it needs the live iterator at restore time, while ``restore``
# (and its fallback past damaged steps) runs before the iterator exists; the checkpoints
# already written also hold this JSON item.
def gather_json(obj: Any) -> list:
  """``obj`` (JSON-serialisable) of every process, in process order (a list of one on a single
  host)."""
  if jax.process_count() == 1:
    return [obj]

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))))
  buf = np.zeros(n, np.uint8)
  buf[:raw.size] = raw
  allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), n)
  return [json.loads(bytes(b).rstrip(b"\0").decode()) for b in allb]


def file_crc32(path, chunk: int = 1 << 24) -> str:
  """The CRC-32 of a file's bytes (local or ``gs://``, read through epath), as 8 hex digits
  (read in chunks of ``chunk`` bytes)."""
  crc = 0
  with epath.Path(path).open("rb") as f:
    while block := f.read(chunk):
      crc = zlib.crc32(block, crc)
  return f"{crc:08x}"


def item_files(folder, items) -> list[str]:
  """The files under ``folder/<item>`` for each of ``items``, as sorted POSIX paths relative to
  ``folder`` (``"params/manifest.ocdbt"``)."""
  folder = epath.Path(folder)
  return sorted(p.relative_to(folder).as_posix() for i in items
                for p in paths.list_files(folder / i))


def record_checksums(folder) -> dict:
  """Writes ``folder/checksums.json``: the size and CRC-32 of every file of the items. Returns
  what it wrote."""
  folder = epath.Path(folder)
  files = {rel: {"size": (folder / rel).stat().length, "crc32": file_crc32(folder / rel)}
           for rel in item_files(folder, ITEMS)}
  record = {"algorithm": "crc32", "files": files}
  (folder / CHECKSUMS).write_text(json.dumps(record, indent=1))
  return record


def damaged_files(folder, recorded: dict, items, *, index: int = 0,
                  count: int = 1) -> list[str]:
  """What differs from ``recorded`` (``checksums.json``) among the files of ``items`` in
  ``folder``: one line per missing, resized or altered file (empty when all match). Checks the
  files ``index``, ``index + count``, ... of the sorted list (a share per process)."""
  folder = epath.Path(folder)
  names = sorted(rel for rel in recorded["files"] if rel.split("/", 1)[0] in items)
  out = []
  for rel in names[index::count]:
    want, path = recorded["files"][rel], folder / rel
    try:
      if not path.is_file():
        out.append(f"{rel} is missing")
      elif (size := path.stat().length) != want["size"]:
        out.append(f"{rel} has {size} bytes, {want['size']} when saved")
      elif (crc := file_crc32(path)) != want["crc32"]:
        out.append(f"{rel} has CRC-32 {crc}, {want['crc32']} when saved (same size: altered "
                   "bytes)")
    except OSError as e:       # reported, not raised: every process must reach the gather
      out.append(f"{rel} is unreadable ({e})")
  return out


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) with ``shardings``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Saves and restores train states under ``directory`` (see the module docstring)."""

  def __init__(self, directory, *, save_every: int = 1000, keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = paths.absolute(directory)
    if save_every < 1 or keep < 1:
      raise ValueError(f"checkpoint.save_every ({save_every}) and keep ({keep}) must be >= 1")
    self._report_incomplete()
    self.async_save, self.read_only = async_save, read_only
    self._saving: Optional[int] = None         # the step whose save is in flight
    policies = ocp.checkpoint_managers
    if read_only:              # orbax warns on every read-only manager: noise to our users
      logs.drop_known_noise()
    # Always orbax's asynchronous path, whose post-finalization callback records the checksums
    # before the commit; a synchronous save waits for it (``save``).
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(save_every),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=True, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._record_checksums))
    self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def _report_incomplete(self):
    if not self.directory.exists():
      return
    # What orbax removes as unfinished: its temporary folders, or on gs:// the step folders
    # without a commit file.
    tmp = sorted(ocp.path.step.tmp_checkpoints(self.directory))
    if tmp:
      logging.warning("checkpoints: ignoring and removing %d incomplete checkpoint folder(s) in "
                      "%s (a save was interrupted): %s", len(tmp), self.directory, tmp)
    damaged = sorted(p.name for p in self.directory.iterdir() if DAMAGED in p.name)
    if damaged:
      logging.warning("checkpoints: %d damaged step(s) in %s, moved aside and kept for "
                      "inspection (never restored; delete them when done): %s", len(damaged),
                      self.directory, damaged)

  # ------------------------------------------------------------------ queries

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self.mngr.should_save(step)

  # ------------------------------------------------------------------ save

  def save(self, step: int, state: dict, data_state: Any = None, meta: Optional[dict] = None,
           *, force: bool = False) -> bool:
    """Saves ``state`` (``{"params", "opt_state", ...}``) at ``step`` if the policy says so
    (or ``force``). Every process must call it. ``data_state`` is this process's iterator
    state (gathered from all processes). ``opt_state=None`` saves the parameters only (a
    serving export; such a step restores with ``abstract_opt_state=None``). Returns whether a
    save started."""
    if not force and not self.mngr.should_save(step):
      return False
    # orbax's save waits for the previous one as well; waiting first keeps ``_saving`` of the
    # step the callback finalises.
    self.wait()
    self._saving = int(step)
    data = {"process_count": jax.process_count(), "states": gather_json(data_state)}
    items = dict(params=ocp.args.StandardSave(state["params"]), data=ocp.args.JsonSave(data),
                 meta=ocp.args.JsonSave({"step": int(step), **(meta or {})}))
    if state.get("opt_state") is not None:
      items["opt_state"] = ocp.args.StandardSave(state["opt_state"])
    args = ocp.args.Composite(**items)
    with self._disk_full_reported():
      started = self.mngr.save(step, args=args, force=force)
    if not self.async_save:
      self.wait()
    return started

  @contextlib.contextmanager
  def _disk_full_reported(self):
    """A full disk (ENOSPC, from the save's thread or here) becomes one ``CheckpointError``
    that names the lost step and the committed ones, which it does not touch."""
    try:
      yield
    except OSError as e:
      cause = e
      while cause is not None and getattr(cause, "errno", None) != errno.ENOSPC:
        cause = cause.__cause__ or cause.__context__
      if cause is None:
        raise
      try:
        self.mngr.reload()
        kept = self.steps()
      except Exception:  # reporting must not fail on the full disk
        kept = "unknown"
      raise CheckpointError(
          f"no space left on the device while saving checkpoint step {self._saving} in "
          f"{self.directory}: that step is not saved; the committed steps ({kept}) are intact. "
          "Free some space and rerun the same command to resume from the latest.") from e

  def _record_checksums(self):
    """orbax's post-finalization callback (background thread, primary process, after every
    process wrote its files): checksums of the step's files, in its temporary folder when the
    filesystem has one (committed by the rename that follows), else in the step folder (on
    gs:// orbax writes the step in place and commits it with ``commit_success.txt``, written
    after this)."""
    step = self._saving
    tmp = sorted(self.directory.glob(f"{step}{TMP_MARKER}*"))
    if len(tmp) > 1:
      raise CheckpointError(f"checkpoint step {step}: several temporary folders {tmp}")
    record_checksums(tmp[0] if tmp else self.directory / str(step))

  def wait(self):
    with self._disk_full_reported():
      self.mngr.wait_until_finished()

  def read_meta(self, step: Optional[int] = None) -> Optional[tuple[int, dict]]:
    """``(step, meta)`` of ``step`` (default: the latest), reading only its ``meta`` item (a
    small JSON): what a run was trained as, before any weight is read. None without
    checkpoints. Raises ``CheckpointError`` naming the folder when the item cannot be read."""
    steps = self.steps()
    if not steps:
      return None
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; it has {steps}")
    try:
      out = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint {self.directory / str(step)}: its meta item cannot be "
                            f"read ({type(e).__name__}: {str(e)[:300]})") from e
    return step, dict(out["meta"] or {})

  def close(self):
    try:
      self.wait()
    finally:
      self.mngr.close()

  # ------------------------------------------------------------------ restore

  def verify(self, step: int, items=ITEMS) -> bool:
    """Checks the files of ``items`` of ``step`` against its ``checksums.json``; every process
    checks a share and all see the union. Returns False (with a warning) when the step has no
    checksums. Raises ``DamagedCheckpoint`` naming the step and the files that differ."""
    folder = self.directory / str(step)
    path = folder / CHECKSUMS
    if not path.is_file():
      logging.warning("checkpoint %s has no %s (saved before checksums were recorded): its files "
                      "are not verified", folder, CHECKSUMS)
      return False
    try:
      recorded = json.loads(path.read_text())
      recorded["files"].items()
    except (ValueError, KeyError, AttributeError) as e:
      raise DamagedCheckpoint(f"checkpoint {folder} is damaged (step {step}): its {CHECKSUMS} "
                              f"is unreadable ({type(e).__name__}: {e})") from None
    bad = damaged_files(folder, recorded, items, index=jax.process_index(),
                        count=jax.process_count())
    bad = sorted(x for part in gather_json(bad) for x in part)
    if bad:
      more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
      raise DamagedCheckpoint(f"checkpoint {folder} is damaged (step {step}): "
                              + "; ".join(bad[:8]) + more)
    return True

  def _restore_step(self, step: int, abstract_params, abstract_opt_state) -> Restored:
    folder = self.directory / str(step)
    items = [i for i in ITEMS if abstract_opt_state is not None or i != "opt_state"]
    missing = [i for i in items if not (folder / i).exists()]
    if missing:
      raise DamagedCheckpoint(f"checkpoint {folder} is incomplete (step {step}): no {missing} "
                              "item(s)")
    self.verify(step, items)
    args = {"params": ocp.args.StandardRestore(abstract_params),
            "data": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
      args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    try:
      out = self.mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint {folder} could not be restored ({type(e).__name__}: "
                            f"{str(e)[:500]})") from e
    return Restored(step, out["params"], out.get("opt_state"), out["data"], out["meta"])

  def _move_aside(self, steps: list[int]) -> None:
    """Renames the folders of ``steps`` to ``<step>.damaged`` (``-2``, ... if taken) on the
    primary process, then every process rereads the steps."""
    if jax.process_index() == 0:
      for step in steps:
        dst, n = self.directory / f"{step}{DAMAGED}", 1
        while dst.exists():
          n += 1
          dst = self.directory / f"{step}{DAMAGED}-{n}"
        (self.directory / str(step)).rename(dst)
        logging.warning("checkpoints: moved damaged step %d aside to %s (kept for inspection; "
                        "it no longer counts towards keep, and step %d is saved anew)", step,
                        dst, step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("gaze_jax.train.checkpoint.move_aside")
    self.mngr.reload()

  def restore(self, abstract_params, abstract_opt_state=None, *, step: Optional[int] = None,
              fallback: bool = True) -> Optional[Restored]:
    """Restores ``step`` (default: the latest) against abstract trees carrying the target
    shardings (``abstract_opt_state=None`` restores the parameters only).

    Returns None when there is no checkpoint. With ``step=None`` and ``fallback``, a damaged
    latest step is reported (warning) and earlier steps are tried, and once one restores the
    failed ones are moved aside (not when read-only); otherwise, and when every step fails,
    raises ``CheckpointError``.
    """
    steps = self.steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; it has "
                              f"{steps}")
      return self._restore_step(step, abstract_params, abstract_opt_state)
    if not steps:
      return None
    errors, failed = [], []
    for s in reversed(steps):
      try:
        got = self._restore_step(s, abstract_params, abstract_opt_state)
      except CheckpointError as e:
        if not fallback:
          raise
        errors.append(str(e))
        failed.append(s)
        logging.warning("%s; falling back to the previous checkpoint", e)
        continue
      if errors:
        logging.warning("restored step %d of %s after skipping %d damaged checkpoint(s)", s,
                        self.directory, len(errors))
        # Step s restored against the same abstract trees: the later ones are damaged, not
        # from another model; left in place they would block the saves of their steps.
        if not self.read_only:
          self._move_aside(failed)
      return got
    raise CheckpointError(f"no checkpoint in {self.directory} could be restored:\n  "
                          + "\n  ".join(errors))


# ---------------------------------------------------------------------- for evaluation

def abstract_params(cfg) -> tuple[Any, Any, Any]:
  """(graphdef, abstract params pure dict of ShapeDtypeStruct, non-Param state) of
  ``MLLM(cfg)`` without allocating weights."""
  gd, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
  return gd, params, rest


def check_tokenizer(meta: Optional[dict], tokenizer, where) -> None:
  """Raises CheckpointError when the checkpoint ``meta`` records a tokenizer whose fingerprint
  differs from ``tokenizer``'s (checkpoints written before fingerprints are accepted)."""
  saved = (meta or {}).get("tokenizer") or {}
  if not saved.get("fingerprint"):
    return
  now = fingerprint(tokenizer)
  if saved["fingerprint"] != now:
    raise CheckpointError(
        f"{where} was trained with tokenizer {saved.get('name')!r} (fingerprint "
        f"{saved['fingerprint']}), but this run's tokenizer has fingerprint {now}: its token ids "
        "would not match the weights. Use the run's config.data.tokenizer (and vocabulary).")


# Fields that say how a model runs, not what its weights are: a checkpoint restores into a model
# that differs in these (evaluation may run in bf16, with the Pallas kernels, without remat).
RUNTIME_FIELDS = ("dtype", "param_dtype", "decoder.remat", "decoder.scan_layers",
                  "gaze.implementation", "gaze.query_chunk", "gaze.kernel", "gaze.offload",
                  "gaze.offload_cache")


def with_runtime_fields(cfg, source):
  """``cfg`` (an ``MLLMConfig``) with the ``RUNTIME_FIELDS`` of ``source``."""
  out = cfg
  for name in RUNTIME_FIELDS:
    *path, leaf = name.split(".")
    value = source
    for p in path + [leaf]:
      value = getattr(value, p)
    if not path:
      out = dataclasses.replace(out, **{leaf: value})
    else:
      sub = getattr(out, path[0])
      out = dataclasses.replace(out, **{path[0]: dataclasses.replace(sub, **{leaf: value})})
  return out


def flat_fields(d: Any, prefix: str = "") -> dict[str, Any]:
  """``{"decoder.hidden_size": 64, ...}`` of a nested dict (an ``asdict`` of an
  ``MLLMConfig``), lists as tuples."""
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict) and k != "kernel":
      out.update(flat_fields(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def model_differences(have: Any, want: Any, *, ignore=RUNTIME_FIELDS) -> dict[str, tuple]:
  """``{field: (have, want)}`` for the fields of two model configs (``MLLMConfig`` or its dict)
  that differ, runtime fields aside; a field only one of them has counts when it is set."""
  def flat(x):
    return flat_fields(dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x)
  a, b = flat(have), flat(want)
  skip = lambda k: any(k == f or k.startswith(f + ".") for f in ignore)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if not skip(k) and a.get(k) != b.get(k) and (k in a and k in b)}


# The fields that decide the shapes of the weights: a checkpoint restores only into a model
# that agrees on all of them.
WEIGHT_FIELDS = ("decoder", "vision", "projector", "scale_factor", "newline_token_ids",
                 "gaze.num_ctx")


def weight_differences(meta_model: Optional[dict], cfg) -> dict[str, tuple]:
  """The fields that decide the weights' shapes in which a checkpoint's model (its
  ``meta["model"]``) and ``cfg`` differ: ``{field: (checkpoint, cfg)}``."""
  if not meta_model:
    return {}
  diff = model_differences(meta_model, cfg)
  return {k: v for k, v in diff.items()
          if any(k == f or k.startswith(f + ".") for f in WEIGHT_FIELDS)}


def restore_model(workdir, config, step: Optional[int] = None, *, mesh=None, rules=None,
                  fallback: bool = True, tokenizer=None, allow_nonfinite: bool = False):
  """The trained model of a run: ``(MLLM, step)``.

  Args:
    workdir: the run's ``--workdir`` (checkpoints under ``workdir/checkpoints``).
    config: the model to build: an ``MLLMConfig``, or a run config (``config.run_config``
      converts a ConfigDict) whose target model (``config.model.gaze.top_k``, not the
      schedule's start) is built. ``gaze_jax.runs.restore`` gives the model as the run
      trained it.
    step: a specific step; default the latest (falling back past damaged ones when
      ``fallback``).
    mesh, rules: shard the weights on ``mesh`` by the logical axis ``rules`` (default:
      ``gaze_jax.train.sharding.DEFAULT_RULES``); without a mesh they go to the default device.
    tokenizer: when given, it must be the one the run trained with (``check_tokenizer``).
    allow_nonfinite: serve parameters that hold NaN or infinite values (with a warning).
  Raises:
    CheckpointError: no checkpoint (or none that restores) under ``workdir``, one of a model
      whose weights have other shapes (naming the fields that differ, before any weight is
      read), one trained with another tokenizer, or (``NonFiniteCheckpoint``) one whose
      parameters are not finite.
  """
  cfg = config if isinstance(config, MLLMConfig) else run_config(config).model
  ckpt = Checkpointer(epath.Path(workdir) / CHECKPOINT_DIR, read_only=True)
  try:
    if not ckpt.steps():
      raise CheckpointError(f"no checkpoint under {epath.Path(workdir) / CHECKPOINT_DIR}")
    try:
      found = ckpt.read_meta(step)
    except CheckpointError as e:     # a damaged step: the restore below reports it, falls back
      logging.warning("%s", e)
      found = (step, {})
    diff = weight_differences(found[1].get("model"), cfg)
    if diff:
      shown = "; ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in diff.items())
      raise CheckpointError(f"checkpoint step {found[0]} in {workdir} holds another model's "
                            f"weights: {shown}")
    gd, abs_state, rest = abstract_params(cfg)
    pure = nnx.to_pure_dict(abs_state)
    if mesh is None:
      dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: dev, pure)
    else:
      specs = sharding.param_specs(abs_state, rules or sharding.DEFAULT_RULES, mesh)
      shardings = sharding.named(mesh, specs)
    got = ckpt.restore(abstract_like(pure, shardings), None, step=step, fallback=fallback)
  finally:
    ckpt.close()
  if got is None:
    raise CheckpointError(f"no checkpoint under {epath.Path(workdir) / CHECKPOINT_DIR}")
  if tokenizer is not None:
    check_tokenizer(got.meta, tokenizer, f"checkpoint step {got.step} in {workdir}")
  check_finite(got.params, f"checkpoint step {got.step} in {workdir}", allow=allow_nonfinite)
  return nnx.merge(gd, got.params, rest), got.step
