"""Training metrics: TensorBoard event files, a JSONL log, the progress line, FLOPs and MFU.

TensorBoard files are written by tensorboardX's ``SummaryWriter`` (scalar ``simple_value``
summaries), so training needs neither TensorFlow nor tensorboard installed.

The workdir may be local or ``gs://`` (files through ``etils.epath``). A Cloud Storage object
cannot be appended to, so there a JSONL file is rewritten whole at every write (one write per
logged step: ``train.log_every`` steps apart), and so is the TensorBoard event file at every
flush, by ``ObjectEventFile``, registered as tensorboardX's writer for ``gs://``. tensorboardX
has a ``gs://`` writer of its own (google-cloud-storage) that rewrites the object too, but its
``__del__`` uploads the file again after ``close``: at interpreter exit, or once the bucket is
gone, that upload retries for two minutes. Ours closes once and writes through epath, the same
client and credentials as every other run file.

Why not clu's ``metric_writers`` and ``periodic_actions.ReportProgress``, as flax's examples
use: both import clu's TensorFlow summary writer, and the trainer runs without TensorFlow (the
GPU images ship none); a resumed run must also drop the records past its checkpoint from the
JSONL and the event file (``drop_records_after``, ``purge_step``), which clu's writers do not
do. The progress line is ReportProgress's (steps/s, ETA) with the loss, K and MFU beside it,
and the profile its ``Profile`` action is ``gaze_jax.train.profile``.

FLOPs per train step: ``gaze_jax.gaze.accounting.train_flops``. MFU = FLOPs per step / (step
time * devices * peak FLOP/s per device); the peak comes from ``train.peak_flops_per_device``
or, when that is 0, from ``PEAK_FLOPS`` by device kind (bf16 dense); unknown devices (CPU)
report no MFU.
"""

from __future__ import annotations

import io
import json
import time
from typing import Mapping, Optional

from etils import epath

from gaze_jax import paths


# Dense bf16 peak FLOP/s per device (vendor figures), matched as substrings of device_kind.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str, override: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of one device: ``override`` when > 0, else the table, else None."""
  if override and override > 0:
    return float(override)
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


# ----------------------------------------------------------------------------- JSONL + progress

class JsonlWriter:
  """One JSON object per line, after the lines already in ``path``; readable after every write.

  A local file is appended to and flushed. On ``gs://`` (no appends) the text is kept here and
  the object rewritten whole at every write (``paths.write_atomic``): a reader sees every line
  written so far, never a partial one."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._f = self._text = None
    if paths.is_local(self.path):
      self._f = self.path.open("a")
    else:
      self._text = self.path.read_text() if self.path.exists() else ""

  def write(self, record: Mapping):
    line = json.dumps(dict(record), sort_keys=True) + "\n"
    if self._f is not None:
      self._f.write(line)
      self._f.flush()
    else:
      self._text += line
      paths.write_atomic(self.path, self._text)

  def close(self):
    if self._f is not None:
      self._f.close()


def progress_line(step: int, num_steps: int, m: Mapping[str, float], tokens_per_s: float,
                  eta_s: Optional[float]) -> str:
  """``step 120/600 | loss 1.2345 | token acc 0.500 | 12.3k tok/s | K 8 | union 9.5 |
  lr 1.0e-03 | MFU 41.0% | ETA 03:12``: one line per logged step, which the trainer logs
  (``token acc``: the step's ``token_accuracy``, answer tokens argmax-correct).

  A tqdm bar redraws itself with carriage returns, one endless line in a log file; only
  tqdm's formatters are used here, for the speed and the ETA (``[H:]MM:SS``).
  """
  # tqdm comes with the [data] extra that training needs, not the core: not at the top.
  from tqdm import tqdm

  parts = [f"step {step}/{num_steps}", f"loss {m['loss']:.4f}",
           f"token acc {m['token_accuracy']:.3f}", f"{tqdm.format_sizeof(tokens_per_s)} tok/s"]
  if m.get("k", 0) > 0:
    parts.append(f"K {int(m['k'])}")
    if "union_per_kv_head" in m:
      parts.append(f"union {m['union_per_kv_head']:.1f}")
  parts.append(f"lr {m['lr']:.1e}")
  if m.get("mfu") is not None:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  parts.append("ETA -- (first step: compiling)" if eta_s is None else
               f"ETA {tqdm.format_interval(eta_s)}")
  return " | ".join(parts)


def drop_records_after(path, step: int) -> int:
  """Rewrites the JSONL file ``path`` (local or ``gs://``) without its records past ``step`` (and
  without a line that does not parse: a kill mid-write leaves a partial last line). Returns how
  many lines went; the file is replaced atomically, and left alone when nothing goes."""
  path = epath.Path(path)
  if not path.exists():
    return 0
  lines = path.read_text().splitlines()
  keep = []
  for line in lines:
    try:
      rec = json.loads(line)
    except ValueError:
      continue
    if int(rec.get("step", 0)) <= step:
      keep.append(line)
  if len(keep) < len(lines):
    paths.write_atomic(path, "".join(line + "\n" for line in keep))
  return len(lines) - len(keep)


class ObjectEventFile:
  """A TensorBoard event file in Cloud Storage, for tensorboardX's ``RecordWriter``: the records
  are kept here and the object rewritten whole at every flush (objects cannot be appended)."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self._buf = io.BytesIO()
    self._closed = False

  def write(self, data: bytes):
    self._buf.write(data)

  def flush(self):
    paths.write_atomic(self.path, self._buf.getvalue())

  def close(self):
    if not self._closed:
      self.flush()
      self._closed = True


class _ObjectEventFiles:
  """tensorboardX's writer factory for ``gs://`` logdirs (``record_writer.open_file``)."""

  def open(self, path: str) -> ObjectEventFile:
    return ObjectEventFile(path)

  def directory_check(self, path: str):
    del path                    # an object store has no folders to create


class MetricsLogger:
  """Writes every record to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``) on the
  primary process; other processes write nothing.

  ``start_step``: the step the run starts after (the restored checkpoint's, 0 for a fresh
  run). A resumed run redoes the steps after it, so the records past it, written before a kill,
  are dropped from ``metrics.jsonl`` (``dropped`` counts them) and TensorBoard is told to purge
  them (``purge_step``): every step appears once."""

  def __init__(self, workdir, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.jsonl = self.tb = None
    self.dropped = 0
    if enabled:
      # Imported here: tensorboardX imports torch whenever that is installed.
      from tensorboardX import SummaryWriter, record_writer
      record_writer.register_writer_factory("gs", _ObjectEventFiles())
      path = epath.Path(workdir) / "metrics.jsonl"
      self.dropped = drop_records_after(path, start_step)
      self.jsonl = JsonlWriter(path)
      # The event file is named by the second it was opened: the nanoseconds keep a restart
      # within the same second from overwriting it, and in order. tensorboardX picks the
      # writer by the logdir's "gs://" prefix, so it gets a str.
      self.tb = SummaryWriter(str(epath.Path(workdir) / "tb"), purge_step=start_step + 1,
                              filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, values: Mapping[str, float], prefix: str = "train"):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items() if v is not None}
    self.jsonl.write({"step": int(step), "split": prefix, **clean})
    for k, v in clean.items():
      self.tb.add_scalar(f"{prefix}/{k}", v, int(step))
    self.tb.flush()          # readable while the run goes (not after flush_secs)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
