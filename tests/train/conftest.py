"""The tiny gaze_shapes dataset, built once per session for the train tests."""

import pytest


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
  pytest.importorskip("grain", reason="the [data] extra is not installed")
  from gaze_jax.data import builders

  tfds.disable_progress_bar()
  d = tmp_path_factory.mktemp("train_tfds")
  builders.prepare("gaze_shapes", d, "tiny", num_train=32, num_validation=8, num_test=8)
  return d
