"""A very small training config shared by the train tests (and their subprocess scripts), and
the lines of a main's output that libraries logged (``library_log_lines``)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def small_config(data_dir, **train):
  """The demo recipe shrunk: 32 px images (4 x 4 patches, 4 regions of 2 x 2), a 2-layer
  decoder of width 32, batch 8, gaze_shapes' ``tiny`` builder."""
  from configs import common

  c = common.base_config("tiny")
  c.model.vision.image_size = 32
  c.model.vision.hidden_size = 32
  c.model.vision.intermediate_size = 64
  c.model.vision.num_layers = 1
  c.model.decoder.hidden_size = 32
  c.model.decoder.intermediate_size = 64
  c.model.decoder.head_dim = 8
  c.model.gaze.top_k = 1
  c.data.builder_config = "tiny"
  c.data.builder_overrides.num_train = 32
  c.data.builder_overrides.num_validation = 8
  c.data.builder_overrides.num_test = 8
  c.data.data_dir = str(data_dir)
  c.data.seq_len = 80
  c.data.max_regions = 4
  c.data.batch_size = 8
  c.data.num_threads = 1
  c.optim.learning_rate = 1e-2
  # Adam divides by |g| + eps: with eps 1e-8, gradients at round-off level (~1e-10) would make
  # the update of those weights depend on summation order; 1e-4 keeps mesh comparisons tight.
  c.optim.eps = 1e-4
  c.optim.warmup_steps = 2
  c.train.num_steps = 8
  c.train.log_every = 1
  c.topk_schedule.warmup_steps = 3
  c.checkpoint.save_every = 2
  for k, v in train.items():
    section, field = k.split("__")
    c[section][field] = v
  return c


def set_fields(c, fields):
  """``c`` with each ``{"model.gaze.top_k": 2, ...}`` field set (dotted names); returns it."""
  for name, value in fields.items():
    *path, leaf = name.split(".")
    node = c
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def run_python(code: str, *, devices: int = 1, timeout: int = 300, env=None, check=True):
  """Runs ``code`` in a fresh interpreter (``devices`` fake CPU devices) from the repo root."""
  e = dict(os.environ)
  e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e.update(env or {})
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                     text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"subprocess failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                         f"{p.stderr[-6000:]}")
  return p


# An absl-formatted log line of Python code: "I1207 03:57:00.927 140014711757696
# checkpoint_manager.py:701] ..." (TensorFlow's C++ lines, "port.cc:153] oneDNN ...", come
# before absl::InitializeLog when tfds builds a dataset, and no Python setting stops them).
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([^:\s]+\.py):\d+\] ")
# What orbax logs of its internals (issue: 33 of eval_main's 56 lines).
ORBAX_INTERNALS = ("checkpoint_manager.py", "event_tracking.py", "standard_logger.py",
                   "caching.py", "composite_checkpoint_handler.py", "_NonBlockingMetadataStore",
                   "Given directory is read only", "read_only=True")


def library_log_lines(output: str) -> list[str]:
  """The lines of a main's ``output`` (stdout + stderr) that a library logged: absl-formatted
  lines from a Python file that is not one of the project's (``gaze_jax/**.py`` and the mains), and
  any line that names one of ``ORBAX_INTERNALS``."""
  ours = {p.name for p in (ROOT / "gaze_jax").rglob("*.py")} | {p.name for p in ROOT.glob("*.py")}
  out = []
  for line in output.splitlines():
    m = _ABSL_LINE.match(line)
    if (m and m.group(1) not in ours) or any(s in line for s in ORBAX_INTERNALS):
      out.append(line)
  return out
