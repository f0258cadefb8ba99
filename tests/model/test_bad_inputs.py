"""Bad inputs to the model raise clear errors instead of computing something else silently:
token ids outside the vocabulary, images that do not fit the layout, tokens of the wrong shape,
invalid configs."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from gaze_jax.gaze import PAD, TEXT, Image, Text, Video
from gaze_jax.model import MLLM, DecoderConfig, GazeConfig, RopeScaling
from gaze_jax.model.presets import tiny

V = 512                  # the tiny preset's vocabulary


@pytest.fixture(scope="module")
def text_model():
  """The tiny preset without vision, dense attention."""
  cfg = tiny()
  cfg = dataclasses.replace(cfg, vision=None, gaze=dataclasses.replace(
      cfg.gaze, attention="dense", num_ctx=0))
  return MLLM(cfg, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ token ids


@pytest.mark.parametrize("bad_id", [10000, V, -7])
def test_token_ids_outside_the_vocabulary_raise_on_the_host(text_model, bad_id):
  """An eager call checks the ids at TEXT slots (they were clamped: 10000 gave the logits of
  511, -7 those of 0)."""
  layout = text_model.build_layout([[Text(5)], [Text(3)]], seq_len=6)
  tokens = np.ones((2, 6), np.int32)
  tokens[1, 2] = bad_id
  with pytest.raises(ValueError, match=rf"tokens: 1 ids outside the model's vocabulary "
                     rf"\[0, {V}\): {bad_id} at tokens\[1, 2\]"):
    text_model.embed(tokens, layout)
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    text_model.decoder.embed_tokens(tokens)


def test_ids_at_slots_that_are_not_text_are_not_checked(text_model):
  layout = text_model.build_layout([[Text(5)], [Text(3)]], seq_len=6)
  kind = np.asarray(layout.kind)
  tokens = np.where(kind == TEXT, 3, -1).astype(np.int32)
  assert (kind == PAD).any()
  x = np.asarray(text_model.embed(tokens, layout))
  assert np.isfinite(x).all()


def test_traced_token_ids_are_checked_under_checkify(text_model):
  """Inside jit the check is a ``checkify.debug_check``: free under plain jit, raised when the
  caller functionalizes it with ``checkify.checkify``."""
  layout = text_model.build_layout([[Text(5)], [Text(3)]], seq_len=6)
  graphdef, state = nnx.split(text_model)

  def embed(state, tokens, layout):
    return nnx.merge(graphdef, state).embed(tokens, layout)

  checked = jax.jit(checkify.checkify(embed, errors=checkify.user_checks))
  good = np.ones((2, 6), np.int32)
  err, _ = checked(state, good, layout)
  assert err.get() is None
  bad = good.copy()
  bad[1, 2] = 10000
  err, _ = checked(state, bad, layout)
  assert "tokens: id 10000 at flat slot 8 is outside the vocabulary [0, 512)" in err.get()
  jax.jit(embed)(state, bad, layout)                 # plain jit: no check, no error


# ------------------------------------------------------------------ image sizes


@pytest.fixture(scope="module")
def vision_model():
  """The tiny preset: 64 px images, patch 8 (an 8x8 grid), video pool 2."""
  return MLLM(tiny(), rngs=nnx.Rngs(0))


def _zeros(n, size):
  return np.zeros((1, n, size, size, 3), np.float32)


def test_an_image_whose_pooled_grid_fits_the_placeholder_is_refused(vision_model):
  """128 px for an Image(8, 8): the full grid is 16x16 and only its 2x2-pooled grid matches;
  that is the video path, which an image must not take silently."""
  m = vision_model
  layout = m.build_layout([[Text(2), Image(8, 8), Text(2)]], seq_len=96, max_regions=16)
  tokens = np.zeros((1, 96), np.int32)
  with pytest.raises(ValueError, match=r"images of 128x128 px give a 16x16 patch grid, but the "
                     r"layout's image placeholder is 8x8: wrong image size, give it 64x64 px; "
                     r"the 2x2-pooled grid is only for the frames of a Video"):
    m.embed(tokens, layout, _zeros(1, 128))
  # The same size as the frames of a video is pooled, and an image at its full grid is taken.
  video = m.build_layout([[Text(2), Video(2, 8, 8), Text(2)]], seq_len=192, max_regions=32,
                         max_images=2)
  assert m.embed(np.zeros((1, 192), np.int32), video, _zeros(2, 128)).shape == (1, 192, 64)
  big = m.build_layout([[Text(2), Image(16, 16), Text(2)]], seq_len=320, max_regions=64)
  assert m.embed(np.zeros((1, 320), np.int32), big, _zeros(1, 128)).shape == (1, 320, 64)
  # A video frame of neither grid names both sizes.
  with pytest.raises(ValueError, match=r"video frame placeholder is 8x8: wrong image size, give "
                     r"it 64x64 px \(or 128x128 px, pooled 2x2\)"):
    m.embed(np.zeros((1, 192), np.int32), video, _zeros(2, 96))


# ------------------------------------------------------------------ tokens vs layout


def test_tokens_that_do_not_fit_the_layout_are_named(text_model):
  """A tokens array of another shape than the layout gave a raw broadcasting error."""
  m = text_model
  layout = m.build_layout([[Text(5)], [Text(3)]], seq_len=6)
  shape_msg = r"tokens must be \[B, S\] = \(2, 6\), the layout's batch size and seq_len"
  for tokens in (np.ones((2, 5), np.int32), np.ones((1, 6), np.int32), np.ones(6, np.int32)):
    with pytest.raises(ValueError, match=shape_msg):
      m(tokens, layout)
    with pytest.raises(ValueError, match=shape_msg):
      m.prefill(tokens, layout)
  with pytest.raises(ValueError, match="tokens must be integer ids, got dtype float32"):
    m(np.ones((2, 6), np.float32), layout)
  with pytest.raises(ValueError, match=r"tokens must be \[B, T\] with B = 2"):
    m.decode(np.ones((3, 1), np.int32), np.zeros((3, 1), np.int32), layout, None)
  with pytest.raises(ValueError, match=r"q_index must be \[B, T\] like tokens"):
    m.decode(np.ones((2, 1), np.int32), np.zeros((2, 2), np.int32), layout, None)


def test_images_with_a_text_only_layout_are_refused(vision_model):
  """The images would be dropped without a word."""
  m = vision_model
  layout = m.build_layout([[Text(5)]], seq_len=8)
  with pytest.raises(ValueError, match="images were given but the layout has no image/frame "
                     "placeholders"):
    m(np.ones((1, 8), np.int32), layout, _zeros(1, 64))


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("field,value,message", [
    ("score", "cos", r"GazeConfig.score='cos' is not one of 'dot', 'cosine'"),
    ("routing", "query", r"GazeConfig.routing='query' is not one of 'head', 'group'"),
    ("implementation", "triton",
     r"GazeConfig.implementation='triton' is not one of 'reference', 'xla', 'pallas'"),
    ("attention", "sparse", r"GazeConfig.attention='sparse' is not one of 'dense', 'gaze'"),
    ("top_k", 0, r"GazeConfig.top_k=0 must be at least 1"),
    ("top_k", -2, r"GazeConfig.top_k=-2 must be at least 1"),
    ("top_k", 1.5, r"GazeConfig.top_k=1.5 as a ratio must be in \(0, 1\]"),
    ("top_k", 0.0, r"GazeConfig.top_k=0.0 as a ratio"),
    ("region_shape", (0, 2), r"GazeConfig.region_shape must be two ints >= 1"),
    ("region_shape", (2,), r"GazeConfig.region_shape must be two ints >= 1"),
    ("num_ctx", -1, r"GazeConfig.num_ctx must be an int >= 0"),
    ("query_chunk", 0, r"GazeConfig.query_chunk must be None or an int >= 1"),
])
def test_invalid_gaze_config_is_refused_when_built(field, value, message):
  """These were accepted and failed only at the first forward pass (or never, when dense)."""
  with pytest.raises(ValueError, match=message):
    GazeConfig(**{field: value})


def test_valid_gaze_configs_still_build():
  assert GazeConfig(region_shape=[3, 3]).region_shape == (3, 3)    # JSON gives lists
  GazeConfig(score="cosine", routing="group", implementation="reference", top_k=1.0,
             query_chunk=8, num_ctx=0)


def test_rope_scaling_given_as_a_dict():
  """Configs and checkpoint metadata give ``DecoderConfig.rope_scaling`` as a dict."""
  cfg = DecoderConfig(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 64})
  assert cfg.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=64)
  assert dataclasses.replace(cfg) == cfg and hash(dataclasses.replace(cfg)) == hash(cfg)
  with pytest.raises(ValueError, match="DecoderConfig.rope_scaling: .*'nope'"):
    DecoderConfig(rope_scaling={"nope": 1})
  with pytest.raises(ValueError, match=r"RopeScaling.rope_type='yarn' is not supported"):
    DecoderConfig(rope_scaling={"rope_type": "yarn"})
