"""Shared fixtures for the data tests: tiny datasets built once per session under one tmp dir
(importing TensorFlow, which tfds uses to write records, is the slow part)."""

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
  tfds.disable_progress_bar()
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def tiny_builders(data_dir):
  """The tiny preset of each procedural dataset, prepared."""
  from gaze_jax.data import builders
  return {name: builders.prepare(name, data_dir, "tiny")
          for name in ("gaze_shapes", "digit_grid", "gaze_video")}
