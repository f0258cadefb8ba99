"""An invalid config fails before a run writes anything to its workdir (no dataset, no
checkpoints/, metrics.jsonl or tb/), in ``trainer.train`` and in ``train_main.py``, with an error
naming the field; every recipe in configs/ passes the same checks and takes ``top_k`` as a count
or a ratio, from its file, the command line and a run's config.json."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from gaze_jax.train.preflight import check_train_config
from tests.train.helpers import ROOT, set_fields, small_config

RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))

BAD = [
    ({"model.gaze.score": "dott"}, r"score='dott' is not one of 'dot', 'cosine'"),
    ({"model.gaze.top_k": 0}, r"top_k=0 must be (>= 1|at least 1)"),
    ({"topk_schedule.shape": "zigzag"}, r"topk_schedule.shape='zigzag' is not one of"),
    ({"optim.learning_rate": -1e-3}, r"optim.learning_rate=-0.001 must be a number > 0"),
    ({"optim.b2": 1.0}, r"optim.b2=1.0 must be a number in \[0, 1\)"),
    ({"optim.param_groups": (("(", 1.0),)}, r"param_groups: bad regex"),
    ({"train.num_steps": 0}, r"train.num_steps=0 must be an int >= 1"),
    ({"checkpoint.keep": 0}, r"checkpoint.keep=0 must be an int >= 1"),
    ({"train.eval_every": 5, "train.eval_batches": 0}, r"eval_batches=0 .* evaluate nothing"),
]


@pytest.mark.parametrize("fields,says", BAD, ids=[next(iter(f)) for f, _ in BAD])
def test_train_refuses_an_invalid_config_before_writing_anything(train_data_dir, tmp_path,
                                                                  fields, says):
  from gaze_jax.train.trainer import train
  work = tmp_path / "work"
  c = set_fields(small_config(train_data_dir), fields)
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


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
  """model_type -> a tiny Hugging Face folder of that family, for the recipes that start from
  one (``model.init=hf:``): the recipe is checked as it runs on a real folder."""
  pytest.importorskip("transformers")
  from tests import hf_folders, llava_onevision_folder
  from tests.data.qwen_vl_folder import save_model_folder

  made = {}

  def get(model_type):
    if model_type not in made:
      path = tmp_path_factory.mktemp(model_type)
      {"smolvlm": hf_folders.save_smolvlm,
       "llava_onevision": llava_onevision_folder.save_folder,
       "qwen2_5_vl": lambda p: save_model_folder(p, "qwen2_5_vl"),
       "qwen3_vl": lambda p: save_model_folder(p, "qwen3_vl")}[model_type](path)
      made[model_type] = str(path)
    return made[model_type]
  return get


def _hf_override(name, tiny_folders) -> list[str]:
  """``--config.model.init=hf:<tiny folder of the recipe's family>`` for a recipe that starts
  from a Hugging Face folder (named after its family), else nothing."""
  c = importlib.import_module(f"configs.{name}").get_config()
  if not str(c.model.init).startswith("hf:"):
    return []
  family = next((f for f in ("smolvlm", "qwen2_5_vl", "qwen3_vl") if name.startswith(f)),
                "llava_onevision")
  return [f"--config.model.init=hf:{tiny_folders(family)}"]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_the_checks(name, tiny_folders):
  check_train_config(_from_command_line(name, *_hf_override(name, tiny_folders)))


def _from_command_line(name, *overrides):
  """The recipe as train_main.py parses it (a locked config file flag)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["train_main.py", f"--config={ROOT / 'configs' / (name + '.py')}", *overrides]
  fv = flags.FlagValues()
  # The override flags are found in the argv given when the flag is defined.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_takes_a_count_or_a_ratio_for_top_k(name, tiny_folders):
  init = _hf_override(name, tiny_folders)
  for flag, want in (("0.25", 0.25), ("2", 2), ("1.0", 1.0), ("1", 1)):
    c = _from_command_line(name, f"--config.model.gaze.top_k={flag}", *init)
    assert type(c.model.gaze.top_k) is type(want) and c.model.gaze.top_k == want
    got = check_train_config(c).model.gaze.top_k
    assert type(got) is type(want) and got == want         # 1 region vs all regions
  # In a file: a recipe's count replaced by a ratio and back.
  c = _from_command_line(name, *init)
  for value in (0.5, 3, 0.25):
    c.model.gaze.top_k = value
    assert type(c.model.gaze.top_k) is type(value)
  check_train_config(c)


def test_a_runs_config_json_takes_a_count_or_a_ratio():
  """config.json (what the trainer writes, and gaze_jax.predict reads back) in its JSON form:
  the weights evaluated at another K, as a count or a ratio, keep its type."""
  from gaze_jax.train.config import config_json, run_config
  from configs import demo
  d = config_json(demo.get_config())
  assert d["model"]["gaze"]["top_k"] == 3
  d["model"]["gaze"]["top_k"] = 0.25
  assert run_config(d).model.gaze.top_k == 0.25
  d["model"]["gaze"]["top_k"] = 2
  assert type(run_config(d).model.gaze.top_k) is int
