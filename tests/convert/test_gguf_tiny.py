"""GGUF import on a tiny Llama written here with ``gguf.GGUFWriter`` (float32 tensors): runs
without the SmolLM2 weights and checks what the loader refuses."""

import logging

import numpy as np
import pytest

from gaze_jax.convert import gguf as G

gguf = pytest.importorskip("gguf")

V, E, F, HEADS, KV = 32, 16, 24, 2, 1
D = E // HEADS


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
  """A one-layer Llama's GGUF tensors, ``[out, in]`` (PyTorch order)."""
  rng = np.random.default_rng(seed)
  shapes = {"token_embd.weight": (V, E), "output_norm.weight": (E,),
            "blk.0.attn_norm.weight": (E,), "blk.0.ffn_norm.weight": (E,),
            "blk.0.attn_q.weight": (HEADS * D, E), "blk.0.attn_k.weight": (KV * D, E),
            "blk.0.attn_v.weight": (KV * D, E), "blk.0.attn_output.weight": (E, HEADS * D),
            "blk.0.ffn_gate.weight": (F, E), "blk.0.ffn_up.weight": (F, E),
            "blk.0.ffn_down.weight": (E, F)}
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _write(path, tensors):
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(1)
  w.add_embedding_length(E)
  w.add_feed_forward_length(F)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(V)
  for name, arr in tensors.items():
    w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_tiny_gguf_loads(tmp_path):
  tensors = _tensors()
  model = G.load_gguf_causal_lm(_write(tmp_path / "tiny.gguf", tensors))
  assert model.cfg.decoder.tie_embeddings and model.cfg.decoder.vocab_size == V
  np.testing.assert_array_equal(np.asarray(model.decoder.embed.embedding[...]),
                                tensors["token_embd.weight"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, caplog, bad):
  """A NaN or Inf weight is named with its file; ``allow_nonfinite=True`` loads it with a
  warning."""
  tensors = _tensors()
  tensors["blk.0.ffn_up.weight"][3, 5] = bad
  path = _write(tmp_path / "bad.gguf", tensors)
  with pytest.raises(ValueError, match=r"bad\.gguf: tensor 'blk\.0\.ffn_up\.weight'.* 1 (NaN|Inf)"
                     r".*allow_nonfinite=True"):
    G.load_gguf_causal_lm(path)
  with caplog.at_level(logging.WARNING, logger="gaze_jax.convert.mapping"):
    model = G.load_gguf_causal_lm(path, allow_nonfinite=True)
  assert "blk.0.ffn_up.weight" in caplog.text
  up = np.asarray(model.decoder.layers[0].mlp.up_proj.kernel[...])
  assert not np.isfinite(up).all()
