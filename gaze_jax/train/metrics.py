"""Training metrics: TensorBoard event files, a JSONL log, the progress line, FLOPs and MFU.

TensorBoard files are written by ``EventWriter`` directly (TFRecord framing of ``Event``
protocol buffers with scalar ``simple_value`` summaries, encoded by hand), so training needs
neither TensorFlow nor tensorboard installed; TensorBoard and ``tf.compat.v1.train.
summary_iterator`` read them.

FLOPs per train step (``train_flops``), counting a multiply-add as 2 and the backward pass as
twice the forward (so train = 3 x forward):

  forward = 2 * B * S * (L * (E * (Hq + 2 * Hkv) * D + Hq * D * E + 3 * E * F) + E * V)  # decoder
          + 2 * B * L * Hq * D * S * S                           # causal attention, q.k and p.v
          + 2 * B * Fr * P * (Lv * (4 * Ev^2 + 2 * Ev * Fv) + Ev * E + E * E)   # ViT + projector
          + 4 * B * Fr * Lv * Ev * P^2                            # ViT attention (bidirectional)

with B the global batch, S the sequence slots, Fr the image/frame slots per example, P the
patches per image. Attention is counted as dense causal (an upper bound for gaze, whose
routed text rows read fewer keys; patch rows stay dense). Embedding lookups are free.
MFU = FLOPs per step / (step time * devices * peak FLOP/s per device); the peak comes from
``train.peak_flops_per_device`` or, when that is 0, from ``PEAK_FLOPS`` by device kind (bf16
dense); unknown devices (CPU) report no MFU.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping, Optional

from gaze_jax.model.config import MLLMConfig

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


def train_flops(cfg: MLLMConfig, *, batch: int, seq_len: int, frames: int,
                patches: int) -> float:
  """FLOPs of one train step (forward + backward) by the formula in the module docstring."""
  d = cfg.decoder
  E, F, L, V = d.hidden_size, d.intermediate_size, d.num_layers, d.vocab_size
  Hq, Hkv, D = d.num_heads, d.num_kv_heads, d.head_dim
  per_layer = E * (Hq + 2 * Hkv) * D + Hq * D * E + 3 * E * F
  fwd = 2.0 * batch * seq_len * (L * per_layer + E * V)
  fwd += 2.0 * batch * L * Hq * D * seq_len * seq_len
  if cfg.vision is not None and frames:
    v = cfg.vision
    Ev, Fv, Lv = v.hidden_size, v.intermediate_size, v.num_layers
    n = batch * frames * patches
    fwd += 2.0 * n * (Lv * (4 * Ev * Ev + 2 * Ev * Fv) + Ev * E + E * E)
    fwd += 4.0 * batch * frames * Lv * Ev * patches * patches
  return 3.0 * fwd


# ----------------------------------------------------------------------------- TensorBoard

def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord files use."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
  """An ``Event`` message: wall_time (1, double), step (2, int64), file_version (3),
  summary (5)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version:
    out += _field_bytes(3, file_version.encode())
  if summary:
    out += _field_bytes(5, summary)
  return out


def _scalar_summary(scalars: Mapping[str, float]) -> bytes:
  """A ``Summary`` with one ``Value{tag (1), simple_value (2, float)}`` per scalar."""
  out = b""
  for tag, value in scalars.items():
    v = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value))
    out += _field_bytes(1, v)
  return out


class EventWriter:
  """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>``."""

  def __init__(self, logdir):
    Path(logdir).mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = Path(logdir) / name
    self._f = open(self.path, "ab")
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, record: bytes):
    header = struct.pack("<Q", len(record))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + record
                  + struct.pack("<I", _masked_crc(record)))

  def scalars(self, step: int, values: Mapping[str, float]):
    self._write(_event(time.time(), int(step), summary=_scalar_summary(values)))
    self._f.flush()

  def close(self):
    self._f.close()


# ----------------------------------------------------------------------------- JSONL + progress

class JsonlWriter:
  """One JSON object per line (appended, flushed every write)."""

  def __init__(self, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    self.path = Path(path)
    self._f = open(self.path, "a")

  def write(self, record: Mapping):
    self._f.write(json.dumps(dict(record), sort_keys=True) + "\n")
    self._f.flush()

  def close(self):
    self._f.close()


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(step: int, num_steps: int, m: Mapping[str, float], tokens_per_s: float,
                  eta_s: Optional[float]) -> str:
  """``step 120/600 | loss 1.234 | acc 0.512 | 12.3k tok/s | K 8 | lr 1.0e-03 | ETA 3m12s``."""
  parts = [f"step {step}/{num_steps}", f"loss {m['loss']:.4f}", f"acc {m['accuracy']:.3f}",
           f"{tokens_per_s / 1e3:.1f}k tok/s"]
  if m.get("k", 0) > 0:
    parts.append(f"K {int(m['k'])}")
    if "union_per_kv_head" in m:
      parts.append(f"union {m['union_per_kv_head']:.1f}")
  parts.append(f"lr {m['lr']:.1e}")
  if m.get("mfu") is not None:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  parts.append("ETA -- (first step: compiling)" if eta_s is None else
               f"ETA {format_duration(eta_s)}")
  return " | ".join(parts)


class MetricsLogger:
  """Writes every record to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``) on the
  primary process; other processes write nothing."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = JsonlWriter(Path(workdir) / "metrics.jsonl") if enabled else None
    self.tb = EventWriter(Path(workdir) / "tb") if enabled else None

  def write(self, step: int, values: Mapping[str, float], prefix: str = "train"):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items() if v is not None}
    self.jsonl.write({"step": int(step), "split": prefix, **clean})
    self.tb.scalars(step, {f"{prefix}/{k}": v for k, v in clean.items()})

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
