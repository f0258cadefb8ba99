"""Bad inputs to the model raise clear errors instead of computing something else silently:
token ids outside the vocabulary, images that do not fit the layout, tokens of the wrong shape,
invalid configs."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from gaze_jax.gaze import PAD, TEXT, Text
from gaze_jax.model import MLLM
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
