"""``make gpu-check`` runs on the GPU machine, which has jax, flax, optax, orbax and chex but
neither ml_collections nor TensorFlow nor grain: what it imports (every module pytest collects
under tests/kernels, ``benchmarks/attention.py``, ``benchmarks/generate.py``) and the decode loop
it runs must need none of the three. Checked in a fresh interpreter that refuses them."""

import json

from tests.train.helpers import ROOT, run_python

SCRIPT = r"""
import importlib, importlib.abc, json, pathlib, sys
BLOCKED = ("ml_collections", "tensorflow", "grain")

class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is not installed on the GPU machine")
    return None

sys.meta_path.insert(0, Refuse())
root = pathlib.Path(sys.argv[1])
mods = ["benchmarks.attention", "benchmarks.generate"]
mods += [f"tests.kernels.{p.stem}" for p in sorted((root / "tests/kernels").glob("test_*.py"))]
for m in mods:
  importlib.import_module(m)

import numpy as np
from benchmarks import generate
from gaze_jax.model.config import DecoderConfig
tiny = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8)
case = generate.decode_case(tiny, 1, 1, [0.5], "xla", 1, 1, np.random.default_rng(0),
                            bounds=False)
print(json.dumps({"modules": mods, "rows": sorted(case["rows"]),
                  "blocked": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_gpu_check_needs_no_ml_collections_tensorflow_or_grain():
  p = run_python(SCRIPT.replace("sys.argv[1]", repr(str(ROOT))), timeout=600)
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert "benchmarks.generate" in out["modules"] and len(out["modules"]) > 4
  assert out["rows"] == ["K=50%", "dense", "no images"]
  assert out["blocked"] == []
