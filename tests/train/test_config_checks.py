"""An invalid config fails before a run writes anything to its workdir (no dataset, no
checkpoints/, metrics.jsonl or tb/), in ``trainer.train`` and in ``train_main.py``, with an error
naming the field; every recipe in configs/ passes the same checks."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gaze_jax.train.config import check_train_config
from tests.train.helpers import ROOT, small_config

RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))

BAD = [
    ({"model.gaze.score": "dott"}, r"score='dott' is not one of 'dot', 'cosine'"),
    ({"model.gaze.top_k": 0}, r"top_k=0 must be (>= 1|at least 1)"),
    ({"topk_schedule.shape": "zigzag"}, r"topk_schedule.shape='zigzag' must be one of"),
    ({"optim.learning_rate": -1e-3}, r"optim.learning_rate=-0.001 must be a number > 0"),
    ({"optim.b2": 1.0}, r"optim.b2=1.0 must be a number in \[0, 1\)"),
    ({"optim.param_groups": (("(", 1.0),)}, r"param_groups: bad regex"),
    ({"train.num_steps": 0}, r"train.num_steps=0 must be an int >= 1"),
    ({"checkpoint.keep": 0}, r"checkpoint.keep=0 must be an int >= 1"),
    ({"train.eval_every": 5, "train.eval_batches": 0}, r"eval_batches=0 .* evaluate nothing"),
]


def _set(c, fields):
  for name, value in fields.items():
    *path, leaf = name.split(".")
    node = c
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("fields,says", BAD, ids=[next(iter(f)) for f, _ in BAD])
def test_train_refuses_an_invalid_config_before_writing_anything(train_data_dir, tmp_path,
                                                                  fields, says):
  from gaze_jax.train.trainer import train
  work = tmp_path / "work"
  c = _set(small_config(train_data_dir), fields)
  with pytest.raises(ValueError, match=says):
    train(c, work)
  assert not work.exists()


def test_train_main_refuses_an_invalid_config_before_writing_anything(train_data_dir,
                                                                       tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from tests.train.helpers import small_config\n\n\ndef get_config():\n"
                 f"  return small_config({str(train_data_dir)!r})\n")
  work = tmp_path / "work"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, str(ROOT / "train_main.py"), f"--config={cfg}",
                      f"--workdir={work}", "--config.model.gaze.top_k=0"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  assert "top_k=0 must be" in p.stderr, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  assert not work.exists()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_the_checks(name):
  check_train_config(importlib.import_module(f"configs.{name}").get_config())
