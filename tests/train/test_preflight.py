"""Config values that used to fail late or deep (a ZeroDivisionError, a 75 TB allocation, an
error at the first batch inside grain, after the workdir was written) are refused before
anything is written, with a ValueError naming the config field: by ``check_train_config``
(what the config alone shows) or ``preflight.check_before_writing`` (the workdir, the backend,
the tokenizer, the memory), which ``trainer.train`` runs before it creates the workdir."""

import jax
import pytest

from gaze_jax.runs import run_tokenizer
from gaze_jax.train import preflight
from gaze_jax.train.preflight import check_train_config
from tests.train.helpers import set_fields, small_config


def _demo(**fields):
  """configs/demo.py (64 px images of 16 px patches: a 4 x 4 grid, regions of 1 x 1,
  seq_len 48) with ``fields`` ("model.vision.patch_size" -> value) set."""
  from configs import demo
  return set_fields(demo.get_config(), fields)


def _preflight(c, workdir):
  """``check_before_writing`` as the trainer calls it."""
  run = check_train_config(c)
  preflight.check_before_writing(run, workdir, run_tokenizer(run))


CONFIG_ONLY = [
    ({"model.vision.patch_size": 0}, r"config\.model\.vision\.patch_size=0 must be an int >= 1"),
    ({"model.decoder.hidden_size": 0},
     r"config\.model\.decoder\.hidden_size=0 must be an int >= 1"),
    ({"model.vision.hidden_size": 0}, r"config\.model\.vision\.hidden_size=0 must be an int >= 1"),
    ({"model.vision.patch_size": 128},
     r"config\.model\.vision\.patch_size=128 must be <= image_size=64"),
    ({"model.vision.num_heads": 3},
     r"config\.model\.vision\.hidden_size=64 must be a multiple of num_heads=3"),
    ({"model.decoder.num_heads": 3},
     r"config\.model\.decoder\.num_heads=3 must be a multiple of num_kv_heads=2"),
    ({"model.dtype": "float17"}, r"config\.model\.dtype='float17' is not one of 'float32'"),
    ({"data.seq_len": 8},
     r"config\.data\.seq_len=8 is too small for the smallest example .* needs \d+ slots"),
    ({"data.max_regions": 1},
     r"config\.data\.max_regions=1 is too small for the smallest example .* needs 16 regions"),
    ({"model.gaze.num_ctx": 1000},
     r"config\.data\.seq_len=48 is too small .*config\.model\.gaze\.num_ctx=1000"),
    ({"model.gaze.region_shape": (8, 8)},
     r"config\.model\.gaze\.region_shape: .* region_shape \(8, 8\) is larger than the grid "
     r"\(4, 4\)"),
]


@pytest.mark.parametrize("fields,says", CONFIG_ONLY, ids=[str(f) for f, _ in CONFIG_ONLY])
def test_check_train_config_names_the_field(fields, says):
  """Before: a ZeroDivisionError (patch_size=0), nothing at all (sizes of 0, float17), or
  ExampleTooLong / a layout error at the first batch, inside grain."""
  with pytest.raises(ValueError, match=says):
    check_train_config(_demo(**fields))


def test_the_demo_passes_every_check(tmp_path):
  _preflight(_demo(), tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_seq_len_too_small_for_the_chat_template(tmp_path):
  """25 slots hold the image, its context tokens and one answer token (check_train_config), not
  the tokenizer's chat template around them (preflight)."""
  c = _demo(**{"data.seq_len": 25})
  check_train_config(c)
  with pytest.raises(ValueError, match=r"config\.data\.seq_len=25 is too small .*chat "
                                       r"template.*needs \d+ slots"):
    _preflight(c, tmp_path / "work")


def test_vocab_size_below_the_tokenizers(tmp_path):
  """Before: a warning, then an error at the first example that uses an id >= vocab_size."""
  c = _demo(**{"model.decoder.vocab_size": 100})
  n = run_tokenizer(check_train_config(c)).vocab_size
  with pytest.raises(ValueError, match=rf"config\.model\.decoder\.vocab_size=100 is below the "
                                       rf"{n} ids of the tokenizer"):
    _preflight(c, tmp_path / "work")


def test_device_memory_is_known():
  limit, what = preflight.device_memory()
  assert limit > 0 and what


@pytest.fixture
def device_of_16_gib(monkeypatch):
  """A 16 GiB device, so that the memory checks do not depend on this machine's."""
  monkeypatch.setattr(preflight, "device_memory", lambda: (16 << 30, "a 16 GiB test device"))


def test_memory_beyond_the_device(tmp_path, device_of_16_gib):
  """Before: seq_len=100000 tried to allocate terabytes at the first step."""
  with pytest.raises(ValueError, match=r"config\.data\.seq_len=100000 .* GiB per device .*"
                                       r"a 16 GiB test device.*config\.model\.decoder\.remat=True.*"
                                       r"config\.train\.check_memory=False"):
    _preflight(_demo(**{"data.seq_len": 100000}), tmp_path / "work")
  # The check can be turned off (the estimate is a planning aid).
  _preflight(_demo(**{"data.seq_len": 100000, "train.check_memory": False}), tmp_path / "work")
  assert not (tmp_path / "work").exists()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="float16 is refused on CPU only")
def test_float16_on_cpu(tmp_path):
  """Before: "The precision 'F16_F16_F32' is not supported by dot_general on CPU" at the first
  step, after the workdir was written."""
  with pytest.raises(ValueError, match=r"config\.model\.dtype='float16' does not run on cpu.*"
                                       r"'bfloat16'"):
    _preflight(_demo(**{"model.dtype": "float16"}), tmp_path / "work")
  _preflight(_demo(**{"model.param_dtype": "float16"}), tmp_path / "work")   # this one runs


def test_workdir_that_is_a_file(tmp_path):
  """Before: a FileExistsError / NotADirectoryError from mkdir."""
  f = tmp_path / "a_file"
  f.write_text("mine")
  with pytest.raises(ValueError, match=rf"--workdir {f} is a file, not a folder"):
    _preflight(_demo(), f)
  with pytest.raises(ValueError, match=rf"--workdir {f / 'run'} lies under {f}, a file"):
    _preflight(_demo(), f / "run")
  assert f.read_text() == "mine"


@pytest.mark.parametrize("fields,says", [
    ({"data__seq_len": 100000}, r"config\.data\.seq_len=100000 .* 16 GiB test device"),
    ({"model__dtype": "float16"}, r"config\.model\.dtype='float16' does not run on cpu"),
], ids=["memory", "float16"])
def test_train_refuses_before_writing_the_workdir(tmp_path, device_of_16_gib, fields, says):
  """The trainer runs the preflight checks before it creates the workdir (the dataset is never
  built: the data_dir stays empty too)."""
  from gaze_jax.train.trainer import train
  if "float16" in says and jax.default_backend() != "cpu":
    pytest.skip("float16 is refused on CPU only")
  c = small_config(tmp_path / "tfds")
  for k, v in fields.items():
    section, field = k.split("__")
    c[section][field] = v
  with pytest.raises(ValueError, match=says):
    train(c, tmp_path / "work")
  assert not (tmp_path / "work").exists() and not (tmp_path / "tfds").exists()


def test_train_refuses_a_workdir_that_is_a_file(tmp_path):
  from gaze_jax.train.trainer import train
  f = tmp_path / "a_file"
  f.write_text("mine")
  with pytest.raises(ValueError, match=rf"--workdir {f} is a file"):
    train(small_config(tmp_path / "tfds"), f)
  assert f.read_text() == "mine" and not (tmp_path / "tfds").exists()
