"""Model presets (abstract instantiation, parameter counts against published totals and
against transformers' own modules) and the memory estimate and its CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gaze_jax.gaze import Image, Text, num_regions
from gaze_jax.model import MLLM
from gaze_jax.model import memory
from gaze_jax.model.abstract import abstract_model
from gaze_jax.model.memory import GiB, count_params, estimate_memory
from gaze_jax.model.presets import PRESETS, get_preset, tiny

REAL = ["smollm2_135m", "cambrian_4b", "qwen2_5_7b", "llava_onevision_0_5b"]
# With the Qwen-VL vision towers (patch pixels at static buckets, no square image grid).
QWEN_VL = ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_4b", "qwen3_vl_8b"]


def _flat(model):
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ------------------------------------------------------------------ presets

def test_get_preset_names_and_errors():
  assert set(PRESETS) == {"tiny", *REAL, *QWEN_VL}
  assert get_preset("cambrian_4b") == PRESETS["cambrian_4b"]()
  with pytest.raises(ValueError, match="known presets: cambrian_4b, llava_onevision_0_5b"):
    get_preset("qwen3")


@pytest.mark.parametrize("name", sorted(set(PRESETS) - set(QWEN_VL)))
def test_preset_instantiates_abstractly(name):
  cfg = get_preset(name)
  p = _flat(abstract_model(cfg))
  d, v, gz = cfg.decoder, cfg.vision, cfg.gaze
  for var in p.values():
    assert isinstance(var.get_value(), jax.ShapeDtypeStruct)      # no weights were built
  assert p["decoder.embed.embedding"].get_value().shape == (d.vocab_size, d.hidden_size)
  assert p["decoder.layers.0.attn.k_proj.kernel"].get_value().shape == (
      d.hidden_size, d.num_kv_heads * d.head_dim)
  assert f"decoder.layers.{d.num_layers - 1}.mlp.down_proj.kernel" in p
  assert f"decoder.layers.{d.num_layers}.mlp.down_proj.kernel" not in p
  assert ("decoder.lm_head.kernel" in p) == (not d.tie_embeddings)
  assert ("decoder.layers.0.attn.q_proj.bias" in p) == d.qkv_bias
  assert ("decoder.layers.0.attn.q_norm.scale" in p) == d.qk_norm
  assert p["ctx_embed"].get_value().shape == (gz.num_ctx, d.hidden_size)
  assert p["vision.pos_embed"].get_value().shape == (v.grid ** 2, v.hidden_size)
  assert ("vision.post_norm.scale" in p) == v.post_layernorm
  # The paper cuts every grid 4 x 4 into regions (padded for 27 x 27 / 7 x 7).
  if name != "tiny":
    assert num_regions(v.grid, v.grid, gz.region_shape) == 16


@pytest.mark.parametrize("name", QWEN_VL)
def test_qwen_vl_preset_instantiates_abstractly(name):
  cfg = get_preset(name)
  p = _flat(abstract_model(cfg))
  q, d = cfg.qwen_vision, cfg.decoder
  assert all(isinstance(var.get_value(), jax.ShapeDtypeStruct) for var in p.values())
  assert cfg.vision is None and d.mrope_section is not None
  assert p["vision.patch_embed.kernel"].get_value().shape == (
      3, 2, q.patch_size, q.patch_size, q.hidden_size)
  assert p["vision.merger.fc2.kernel"].get_value().shape[-1] == d.hidden_size   # the connector
  deep = {k.split(".")[2] for k in p if k.startswith("vision.deepstack_mergers.")}
  assert len(deep) == (len(q.deepstack_visual_indexes) if name.startswith("qwen3") else 0)


def test_preset_values():
  c, q, o = get_preset("cambrian_4b"), get_preset("qwen2_5_7b"), get_preset("llava_onevision_0_5b")
  assert (c.vision.grid, c.vision.num_layers, c.decoder.head_dim) == (24, 27, 128)
  assert (c.gaze.region_shape, c.gaze.top_k, c.gaze.num_ctx) == ((6, 6), 4, 4)
  assert c.decoder.qk_norm and c.decoder.tie_embeddings and not c.decoder.qkv_bias
  assert q.decoder.qkv_bias and not q.decoder.tie_embeddings and q.vision == c.vision
  assert (o.vision.grid, o.vision.num_layers, o.vision.post_layernorm) == (27, 26, False)
  assert o.gaze.region_shape == (7, 7) and o.decoder.vocab_size == 152000
  t = tiny()
  assert (t.vision.grid, t.gaze.region_shape, t.decoder.num_kv_heads) == (8, (2, 2), 2)


def test_shape_only_rngs_give_the_same_abstract_model_as_nnx_rngs():
  # abstract_model avoids nnx.Rngs only for speed; the tree must be identical. The
  # qwen-like config exercises q/k norm, bias and an untied head on a 2-layer cut.
  small = get_preset("cambrian_4b")
  small = dataclasses.replace(
      small, decoder=dataclasses.replace(small.decoder, num_layers=2, qkv_bias=True,
                                         tie_embeddings=False),
      vision=dataclasses.replace(small.vision, num_layers=2))
  for cfg in (tiny(), small):
    fast = _flat(abstract_model(cfg))
    slow = _flat(nnx.eval_shape(lambda cfg=cfg: MLLM(cfg, rngs=nnx.Rngs(0))))
    assert fast.keys() == slow.keys()
    for k in fast:
      assert fast[k].get_value() == slow[k].get_value(), k
      assert fast[k].get_metadata() == slow[k].get_metadata(), k


# ------------------------------------------------------------------ parameter counts

def _tiny_formula(cfg) -> dict:
  """Hand count of the architecture (SigLIP-style ViT, mlp2x_gelu, Llama/Qwen decoder)."""
  v, d, gz = cfg.vision, cfg.decoder, cfg.gaze
  Ev, Fv, p = v.hidden_size, v.intermediate_size, v.patch_size
  blocks = v.num_layers + 1 + v.feature_layer if v.feature_layer < 0 else v.feature_layer
  vision = (p * p * v.num_channels * Ev + Ev + v.grid ** 2 * Ev
            + blocks * (2 * 2 * Ev + 4 * (Ev * Ev + Ev) + Ev * Fv + Fv + Fv * Ev + Ev)
            + (2 * Ev if v.post_layernorm else 0))
  E, F, V = d.hidden_size, d.intermediate_size, d.vocab_size
  q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
  layer = (E * q + 2 * E * kv + q * E + 3 * E * F + 2 * E
           + ((q + 2 * kv) if d.qkv_bias else 0) + (2 * d.head_dim if d.qk_norm else 0))
  decoder = V * E + d.num_layers * layer + E + (0 if d.tie_embeddings else E * V)
  out = {"vision": vision, "projector": Ev * E + E + E * E + E, "decoder": decoder,
         "ctx": gz.num_ctx * E}
  out["total"] = sum(out.values())
  return out


@pytest.mark.parametrize("variant", ["plain", "qwen2", "qwen3", "llava_vision", "no_ctx"])
def test_count_params_matches_hand_formula_on_tiny(variant):
  cfg = tiny()
  d, v = cfg.decoder, cfg.vision
  if variant == "qwen2":
    d = dataclasses.replace(d, qkv_bias=True, tie_embeddings=True)
  elif variant == "qwen3":
    d = dataclasses.replace(d, qk_norm=True, tie_embeddings=True, num_kv_heads=1)
  elif variant == "llava_vision":
    v = dataclasses.replace(v, num_layers=3, feature_layer=-2, post_layernorm=False)
  cfg = dataclasses.replace(cfg, decoder=d, vision=v)
  if variant == "no_ctx":
    cfg = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, num_ctx=0))
  assert count_params(cfg) == _tiny_formula(cfg)
  # And it counts the same numbers as a real instance.
  real = MLLM(cfg, rngs=nnx.Rngs(0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(real, nnx.Param))) == \
      count_params(cfg)["total"]


# Published totals, with the tolerance of their rounding (half a unit of the last digit):
# SmolLM2-135M 134.5M (transformers' count of the GGUF model, environment.md), Qwen3-4B 4.02B,
# Qwen2.5-7B 7.62B, Qwen2-0.5B 0.49B (Hugging Face model pages; LLaVA-OV's 152000-token
# vocabulary adds 57K, far inside the rounding). The 27-block SigLIP So400m towers without
# their pooling head are 0.40-0.43B; LLaVA-OneVision-0.5B (26 blocks) totals 0.89B.
PUBLISHED_LM = {"smollm2_135m": (134.5e6, 0.05e6), "cambrian_4b": (4.02e9, 0.005e9),
                "qwen2_5_7b": (7.62e9, 0.005e9), "llava_onevision_0_5b": (0.49e9, 0.005e9)}


@pytest.mark.parametrize("name", REAL)
def test_count_params_matches_published_totals(name):
  n = count_params(get_preset(name))
  want, tol = PUBLISHED_LM[name]
  assert abs(n["decoder"] - want) <= tol, (n["decoder"], want)
  if name in ("cambrian_4b", "qwen2_5_7b"):
    assert 0.40e9 <= n["vision"] <= 0.43e9, n["vision"]
  if name == "llava_onevision_0_5b":             # our 4 context-token embeddings: 3584 more
    assert abs(n["total"] - n["ctx"] - 0.89e9) <= 0.005e9, n["total"]
  assert n["total"] == n["vision"] + n["projector"] + n["decoder"] + n["ctx"]


def test_count_params_equals_transformers_modules():
  """Exact counts against transformers' own Llama / Qwen2 / Qwen3 / SigLIP modules, built on
  the meta device (no memory)."""
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("transformers")

  def n_params(m):
    return sum(p.numel() for p in m.parameters())

  def lm(name):
    d = get_preset(name).decoder
    kw = dict(vocab_size=d.vocab_size, hidden_size=d.hidden_size,
              intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers,
              num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
              tie_word_embeddings=d.tie_embeddings)
    if name == "cambrian_4b":
      return tf.Qwen3Config(head_dim=d.head_dim, **kw)
    if name == "smollm2_135m":
      return tf.LlamaConfig(head_dim=d.head_dim, **kw)
    return tf.Qwen2Config(**kw)

  with torch.device("meta"):
    for name in REAL:
      ref = n_params(tf.AutoModelForCausalLM.from_config(lm(name)))
      assert count_params(get_preset(name))["decoder"] == ref, name
    for name in ("cambrian_4b", "llava_onevision_0_5b"):
      v = get_preset(name).vision
      sig = tf.SiglipVisionModel(tf.SiglipVisionConfig(
          hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
          num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
          image_size=v.image_size, patch_size=v.patch_size, vision_use_head=False))
      ref = n_params(sig) - (0 if v.post_layernorm else 2 * v.hidden_size)
      assert count_params(get_preset(name))["vision"] == ref, name


# ------------------------------------------------------------------ memory estimate

def test_fsdp_shards_params_grads_and_optimizer():
  cfg = get_preset("cambrian_4b")
  kw = dict(batch=16, seq_len=4096, mode="train")
  two, four = estimate_memory(cfg, devices=2, **kw), estimate_memory(cfg, devices=4, **kw)
  for k in ("params", "grads", "optimizer"):
    assert abs(two[k] - 2 * four[k]) <= 2, k
  n = count_params(cfg)["total"]
  one = estimate_memory(cfg, devices=1, **kw)
  assert one["params"] == 4 * n and one["grads"] == 4 * n and one["optimizer"] == 8 * n
  # Without FSDP the weights are replicated; the batch is still split, so activations halve.
  rep2 = estimate_memory(cfg, devices=2, fsdp=False, **kw)
  rep4 = estimate_memory(cfg, devices=4, fsdp=False, **kw)
  assert rep2["params"] == rep4["params"] == 4 * n
  assert rep2["activations"] == 2 * rep4["activations"]
  assert rep2["logits"] == 2 * rep4["logits"]
  assert one["gathered_weights"] == 0 < two["gathered_weights"]
  assert one["total"] == sum(v for k, v in one.items() if k != "total")


def test_kv_cache_and_descriptors_hand_computed():
  cfg = tiny()       # 2 layers, 2 KV heads, head_dim 16; one 8x8 image = 16 regions of 2x2
  m = estimate_memory(cfg, batch=4, seq_len=90, devices=2, mode="infer", cache_len=100,
                      compute_bytes=2)
  # 2 (k and v) x 2 layers x 2 KV heads x 16 x 100 slots x 2 examples per device x 2 bytes
  assert m["kv_cache"] == 2 * 2 * 2 * 16 * 100 * 2 * 2
  # 2 layers x 16 regions x 2 KV heads x 16 x 2 examples x 4 bytes (float32)
  assert m["descriptors"] == 2 * 16 * 2 * 16 * 2 * 4
  assert m["grads"] == m["optimizer"] == 0
  dense = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, attention="dense"))
  assert estimate_memory(dense, batch=4, seq_len=90, devices=2, mode="infer")["descriptors"] == 0
  # Default cache length: the prompt.
  assert estimate_memory(cfg, batch=4, seq_len=90, devices=2, mode="infer")["kv_cache"] == \
      2 * 2 * 2 * 16 * 90 * 2 * 2
  assert estimate_memory(cfg, batch=4, seq_len=90, mode="train")["kv_cache"] == 0


def test_activation_levers():
  cfg = get_preset("qwen2_5_7b")
  base = dict(batch=8, seq_len=2048, devices=8)
  m = estimate_memory(cfg, **base)
  assert estimate_memory(cfg, remat=True, **base)["activations"] < m["activations"] / 4
  assert estimate_memory(cfg, attention_impl="flash", **base)["activations"] < m["activations"]
  assert estimate_memory(cfg, remat=True, **base)["vision_activations"] < m["vision_activations"]
  # Twice the examples per device: twice the activations and logits.
  m2 = estimate_memory(cfg, **{**base, "batch": 16})
  assert m2["activations"] == 2 * m["activations"] and m2["logits"] == 2 * m["logits"]
  frozen = estimate_memory(cfg, freeze_vision=True, **base)
  n = count_params(cfg)
  assert m["grads"] - frozen["grads"] == pytest.approx(4 * n["vision"] / 8, abs=2)
  # Gaze's XLA path gathers K region blocks per row: more than dense; equal with flash.
  dense = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, attention="dense"))
  assert estimate_memory(dense, **base)["activations"] < m["activations"]
  video = estimate_memory(cfg, images=0, video_frames=8, **base)
  assert video["vision_activations"] == 8 * m["vision_activations"]
  # Gaze prefill in query chunks bounds the attention working set.
  chunked = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, query_chunk=256))
  infer = dict(base, mode="infer")
  assert estimate_memory(chunked, **infer)["activations"] < \
      estimate_memory(cfg, **infer)["activations"] / 2
  # A per-example ratio K compiles K_max = all regions, in inference too.
  per_ex = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, top_k=0.25,
                                                             top_k_per_example=True))
  assert estimate_memory(per_ex, **infer) == estimate_memory(per_ex, compiled_top_k=1.0,
                                                            **infer)
  assert estimate_memory(per_ex, **infer)["activations"] > \
      estimate_memory(dataclasses.replace(per_ex, gaze=dataclasses.replace(
          per_ex.gaze, top_k_per_example=False)), **infer)["activations"]


@pytest.mark.parametrize("attention", ["dense", "gaze"])
def test_estimate_tracks_xla_buffer_assignment(attention):
  """Activations + logits against the temporaries XLA assigns to a jitted gradient of a
  2-layer SmolLM2 cut (float32: the CPU backend computes bf16 in f32). Seen: 1.00 gaze, 1.05
  dense."""
  optax = pytest.importorskip("optax")
  base = get_preset("smollm2_135m")
  cfg = dataclasses.replace(
      base, vision=tiny().vision, dtype="float32",
      decoder=dataclasses.replace(base.decoder, num_layers=2, vocab_size=8192),
      gaze=dataclasses.replace(base.gaze, region_shape=(2, 2), attention=attention))
  B, S = 2, 512
  model = abstract_model(cfg)
  graph, params = nnx.split(model, nnx.Param)
  layout = model.build_layout([[Text(10), Image(8, 8), Text(S - 78)]] * B, seq_len=S,
                              max_regions=16, max_images=1)

  def loss(p, tokens, layout, images):
    logits = nnx.merge(graph, p)(tokens, layout, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  compiled = jax.jit(jax.grad(loss)).lower(
      params, jax.ShapeDtypeStruct((B, S), jnp.int32), layout,
      jax.ShapeDtypeStruct((B, 1, 64, 64, 3), jnp.float32)).compile()
  xla = compiled.memory_analysis().temp_size_in_bytes
  # The model is built at the preset's K (no schedule): the estimate at that compiled K.
  est = estimate_memory(cfg, batch=B, seq_len=S, compute_bytes=4,
                        compiled_top_k=cfg.gaze.top_k)
  ours = est["activations"] + est["vision_activations"] + est["logits"]
  assert 0.7 * xla <= ours <= 1.3 * xla, (ours / GiB, xla / GiB)


def test_estimate_memory_errors():
  cfg = get_preset("cambrian_4b")
  with pytest.raises(ValueError, match="seq_len=1024"):
    estimate_memory(cfg, batch=1, seq_len=1024, images=2)       # 2 x (576 + 4) slots
  with pytest.raises(ValueError, match="cache_len"):
    estimate_memory(cfg, batch=1, seq_len=1024, mode="infer", cache_len=512)
  with pytest.raises(ValueError, match="mode"):
    estimate_memory(cfg, batch=1, seq_len=1024, mode="eval")
  with pytest.raises(ValueError, match="devices"):
    estimate_memory(cfg, batch=1, seq_len=1024, devices=0)
  text = dataclasses.replace(cfg, vision=None)
  assert estimate_memory(text, batch=1, seq_len=1024)["vision_activations"] == 0
  with pytest.raises(ValueError, match="no vision tower"):
    estimate_memory(text, batch=1, seq_len=1024, images=1)


def _table(out: str) -> dict:
  rows = {}
  for line in out.splitlines():
    parts = line.split()
    if len(parts) >= 2 and parts[0] in (*memory.COMPONENTS, "total"):
      rows[parts[0]] = float(parts[1])
  return rows


def test_cli_prints_table(capsys):
  argv = ["--preset=cambrian_4b", "--batch=8", "--seq_len=4096", "--devices", "8"]
  assert memory.main(argv + ["--remat", "--attention_impl=flash"]) == 0
  out = capsys.readouterr().out
  want = estimate_memory(get_preset("cambrian_4b"), batch=8, seq_len=4096, devices=8,
                         remat=True, attention_impl="flash")
  rows = _table(out)
  assert rows["total"] == pytest.approx(want["total"] / GiB, abs=0.006)
  for k in ("params", "grads", "optimizer", "activations", "logits"):
    assert rows[k] == pytest.approx(want[k] / GiB, abs=0.006), k
  assert "4.445B parameters" in out and "fits in 80 GiB" in out
  # Over budget: the CLI says so and prices the levers.
  assert memory.main(argv) == 0
  out = capsys.readouterr().out
  assert "does NOT fit" in out and "--remat" in out and "--attention_impl=flash" in out
  assert memory.main(argv + ["--mode=infer", "--cache_len=8192"]) == 0
  rows = _table(capsys.readouterr().out)
  assert rows["kv_cache"] == pytest.approx(2 * 36 * 8 * 128 * 8192 * 1 * 2 / GiB, abs=0.006)
  assert memory.main(argv + ["--images", "9"]) == 2                     # does not fit seq_len
  assert "error:" in capsys.readouterr().err
  # Flags absl rejects: a misspelt one, a value out of range, a stray argument.
  for bad, why in ((["--seq-len=4096"], "seq-len"), (["--query_chunk=0"], "query_chunk"),
                   (["extra"], "unexpected arguments")):
    assert memory.main(argv + bad) == 2
    assert why in capsys.readouterr().err
  assert memory.main(["--batch=1"]) == 2
  assert "--preset" in capsys.readouterr().err
  assert memory.main(["--help"]) == 0
  assert "--exact" in capsys.readouterr().out
