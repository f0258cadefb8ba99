"""Model configuration: plain frozen dataclasses, so that models and kernels import without
ml_collections (the training configs in ``configs/`` build these)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Optional, Sequence, Union


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class FieldError(ValueError):
  """A bad value of one field of a config dataclass. The message names the field as
  ``Owner.field`` (``VisionConfig.patch_size=0 must be ...``); ``at(where)`` is the same error
  naming it where the config tree holds it (``config.model.vision.patch_size=0 must be ...``)."""

  def __init__(self, owner: str, field: str, says: str):
    self.owner, self.field, self.says = owner, field, says
    super().__init__(f"{owner}.{field}{says}")

  def at(self, where: str) -> "FieldError":
    return FieldError(where, self.field, self.says)


def check_counts(obj, counts: Sequence[tuple[str, int]]) -> None:
  """Each ``(field, lowest)`` of ``counts`` is a whole number >= lowest (a size of 0 fails
  deep inside the model: a ZeroDivisionError, an empty weight); numpy ints become ints."""
  owner = type(obj).__name__
  for name, low in counts:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
      raise FieldError(owner, name, f"={v!r} must be an int >= {low}")
    object.__setattr__(obj, name, int(v))


def one_of(obj, name: str, allowed: Sequence[str]) -> None:
  """Field ``name`` of ``obj`` is one of the strings ``allowed``."""
  value = getattr(obj, name)
  if value not in allowed:
    raise FieldError(type(obj).__name__, name,
                     f"={value!r} is not one of {', '.join(map(repr, allowed))}")


def _from_fields(cls, fields: Mapping[str, Any], where: str):
  """``cls(**fields)`` (a config given as a dict), a ValueError naming ``where`` for an
  unknown field."""
  try:
    return cls(**fields)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from None


POS_RESIZE = ("bicubic", "buckets")
PROJECTORS = ("mlp2x_gelu", "pixel_shuffle")
VIDEO_POOL_MODES = ("mean", "bilinear")
# The float types a model computes in or stores its weights in (``MLLMConfig.dtype``,
# ``param_dtype``): jax keeps no float64 arrays unless x64 is on.
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """SigLIP-style ViT: patch embedding, learned positions, pre-LN blocks, no CLS token.

  ``feature_layer`` indexes the hidden states as Hugging Face does (0 = patch embeddings,
  ``i`` = output of block i, -1 = last block); ``post_layernorm`` applies the final LayerNorm to
  the chosen features (SigLIP's ``last_hidden_state`` is feature_layer=-1 with it; LLaVA models
  take ``hidden_states[-1]`` without it). ``video_pool`` pools video frame features
  ``video_pool x video_pool`` (docs/method.md: 2x2-pooled 24x24 frames): ``video_pool_mode``
  ``"mean"`` averages each block (the remainder of a grid it does not divide is dropped);
  ``"bilinear"`` resizes the grid to ``ceil(g / video_pool)`` per side as PyTorch's bilinear
  interpolation does (LLaVA-OneVision's ``apply_pooling``); ``pooled_grid`` is the one
  definition of the pooled size.
  ``pos_resize`` says which learned position serves each patch of a grid other than the native
  ``grid x grid``: ``"bicubic"`` resizes the table as SigLIP's ``interpolate_pos_encoding``;
  ``"buckets"`` gives patch ``(i, j)`` of a ``gh x gw`` grid the entry of the fractional
  coordinate bucket ``(i / gh, j / gw)``, as Idefics3 / SmolVLM do (``bucket_position_ids``).
  """
  image_size: int = 384
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 27
  num_heads: int = 16
  layer_norm_eps: float = 1e-6
  feature_layer: int = -1
  post_layernorm: bool = True
  video_pool: int = 2
  pos_resize: str = "bicubic"
  video_pool_mode: str = "mean"

  def __post_init__(self):
    one_of(self, "pos_resize", POS_RESIZE)
    one_of(self, "video_pool_mode", VIDEO_POOL_MODES)
    check_counts(self, (("image_size", 1), ("patch_size", 1), ("num_channels", 1),
                         ("hidden_size", 1), ("intermediate_size", 1), ("num_layers", 1),
                         ("num_heads", 1), ("video_pool", 1)))
    # Not "divisible": a remainder is dropped, as the VALID patch convolution does (SigLIP
    # so400m-patch14-384 has 384 px images of 14 px patches).
    if self.patch_size > self.image_size:
      raise FieldError("VisionConfig", "patch_size", f"={self.patch_size} must be <= "
                       f"image_size={self.image_size} (an image of one patch at least)")
    if self.hidden_size % self.num_heads:
      raise FieldError("VisionConfig", "hidden_size", f"={self.hidden_size} must be a multiple "
                       f"of num_heads={self.num_heads} (each head takes hidden_size / "
                       "num_heads channels)")

  def pooled_grid(self, gh: int, gw: int) -> tuple[int, int]:
    """The video-pooled size of a ``gh x gw`` token grid (``video_pool_mode``)."""
    p = self.video_pool
    if self.video_pool_mode == "bilinear":
      return -(-gh // p), -(-gw // p)
    return gh // p, gw // p

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_blocks(self) -> int:
    """The blocks built: those up to the feature layer (the ones after it are never used)."""
    f = self.feature_layer
    return self.num_layers + 1 + f if f < 0 else f


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 RoPE frequency scaling (Hugging Face ``rope_type="llama3"``).

  Frequencies whose wavelength is shorter than ``original_max_position_embeddings /
  high_freq_factor`` stay; those longer than ``original_max_position_embeddings /
  low_freq_factor`` are divided by ``factor``; the ones between are blended smoothly.
  """
  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type != "llama3":
      raise ValueError(f"RopeScaling.rope_type={self.rope_type!r} is not supported (only "
                       "'llama3')")
    for name in ("factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"RopeScaling.{name} must be a number > 0, got {v!r}")
    if not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"RopeScaling.high_freq_factor={self.high_freq_factor} must exceed "
                       f"low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Llama / Qwen2 / Qwen3 decoder: GQA, RoPE, RMSNorm, SwiGLU; Qwen2 adds ``qkv_bias``,
  Qwen3 ``qk_norm``. ``remat`` recomputes each layer's activations in the backward pass
  (``nnx.remat`` around every layer of a full-sequence forward) to save memory in training.
  ``scan_layers`` runs the layers of a full-sequence forward as one scan over their stacked
  weights (same results as the loop; the layer compiles once, so deep models compile fast).
  ``rope_scaling``: None (plain RoPE) or a ``RopeScaling`` (a dict of its fields is accepted,
  as configs and checkpoint metadata give it).

  M-RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, Hugging Face ``rope_parameters["mrope_section"]``):
  ``mrope_section`` = three counts (time, height, width) of rotary frequencies, summing to
  ``head_dim // 2``; each frequency is rotated by one component of the token's position triple
  (``TokenLayout.rope_position``, built when ``LayoutSpec.mrope`` is set). Contiguous sections
  (Qwen2-VL / Qwen2.5-VL) by default; ``mrope_interleaved`` interleaves them as Qwen3-VL's
  ``apply_interleaved_mrope`` does (``layers.mrope_components``). None: plain 1-D RoPE."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: Optional[int] = None
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  remat: bool = False
  scan_layers: bool = False
  mrope_section: Optional[tuple[int, ...]] = None
  mrope_interleaved: bool = False

  def __post_init__(self):
    check_counts(self, (("vocab_size", 1), ("hidden_size", 1), ("intermediate_size", 1),
                         ("num_layers", 1), ("num_heads", 1), ("num_kv_heads", 1)))
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise FieldError("DecoderConfig", "hidden_size", f"={self.hidden_size} must be a "
                         f"multiple of num_heads={self.num_heads}, or head_dim set")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    check_counts(self, (("head_dim", 1),))
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", _from_fields(RopeScaling, self.rope_scaling,
                                                            "DecoderConfig.rope_scaling"))
    elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError("DecoderConfig.rope_scaling must be None, a RopeScaling or a dict of its "
                       f"fields, got {self.rope_scaling!r}")
    if self.num_heads % self.num_kv_heads:
      raise FieldError("DecoderConfig", "num_heads", f"={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    self._check_mrope()

  def _check_mrope(self):
    sec = self.mrope_section
    if not isinstance(self.mrope_interleaved, bool):
      raise FieldError("DecoderConfig", "mrope_interleaved", f"={self.mrope_interleaved!r} must "
                       "be a bool")
    if sec is None:
      if self.mrope_interleaved:
        raise FieldError("DecoderConfig", "mrope_interleaved", "=True needs mrope_section (the "
                         "M-RoPE sections to interleave)")
      return
    if (isinstance(sec, (str, bytes)) or not isinstance(sec, Sequence) or len(sec) != 3
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0
                   for n in sec)):
      raise FieldError("DecoderConfig", "mrope_section", f"={sec!r} must be None or three ints "
                       ">= 0 (time, height, width frequency counts)")
    sec = tuple(int(n) for n in sec)
    object.__setattr__(self, "mrope_section", sec)
    if self.head_dim % 2 or sum(sec) != self.head_dim // 2:
      raise FieldError("DecoderConfig", "mrope_section", f"={sec} must sum to head_dim // 2 = "
                       f"{self.head_dim // 2} (head_dim={self.head_dim}, even)")


@dataclasses.dataclass(frozen=True)
class GazeConfig:
  """Decoder attention: ``attention="dense"`` or ``"gaze"`` with the routing options of
  ``gaze_attention``; ``region_shape`` and ``num_ctx`` must match the batches' LayoutSpec.
  ``kernel``: options of the Pallas kernels (``implementation="pallas"``): None for the
  defaults of the current backend, a ``pallas_kernels.config.KernelConfig`` or a dict of its
  fields (e.g. ``{"kernel": "tpu", "interpret": False}`` to compile for a TPU from a CPU).
  ``top_k_per_example``: a ratio ``top_k`` applies to each example's own regions (the paper's
  semantics: ``ceil(ratio * regions)`` per example, a traced K under the static K_max of all
  regions) rather than to the batch's ``max_regions``; off by default.
  ``offload``: decoding keeps the visual K/V in host memory and a region cache of
  ``offload_cache`` blocks per example and KV head on the device (0: as many as one step can
  select; ``gaze_jax.model.offload``); ``generate(offload=...)`` overrides it."""
  attention: str = "gaze"
  top_k: Union[int, float] = 4
  score: str = "dot"
  routing: str = "head"
  route_prompt: bool = True
  implementation: str = "xla"
  query_chunk: Optional[int] = None
  region_shape: tuple[int, int] = (6, 6)
  num_ctx: int = 4
  kernel: Any = None
  top_k_per_example: bool = False
  offload: bool = False
  offload_cache: int = 0

  def __post_init__(self):
    # The allowed strings are those gaze_attention dispatches on (imported here, not at the
    # top, so that this module stays importable without the attention code).
    from gaze_jax.gaze.plan import IMPLEMENTATIONS
    from gaze_jax.gaze.routing import ROUTINGS, SCORES, TopKError, check_top_k

    for name, allowed in (("attention", ("dense", "gaze")), ("score", SCORES),
                          ("routing", ROUTINGS), ("implementation", IMPLEMENTATIONS)):
      one_of(self, name, allowed)
    try:
      check_top_k(self.top_k, self.top_k_per_example)
    except TopKError as e:
      raise FieldError("GazeConfig", e.field, e.says) from None
    shape = self.region_shape
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
        or not all(_is_int(n) and n >= 1 for n in shape)):
      raise FieldError("GazeConfig", "region_shape", " must be two ints >= 1 (rows, cols), "
                       f"got {shape!r}")
    object.__setattr__(self, "region_shape", tuple(int(n) for n in shape))
    if not _is_int(self.num_ctx) or self.num_ctx < 0:
      raise FieldError("GazeConfig", "num_ctx", f" must be an int >= 0, got {self.num_ctx!r}")
    if not isinstance(self.offload, bool):
      raise FieldError("GazeConfig", "offload", f" must be True or False, got {self.offload!r}")
    if not _is_int(self.offload_cache) or self.offload_cache < 0:
      raise FieldError("GazeConfig", "offload_cache", " must be an int >= 0 (0: one step's "
                       f"regions), got {self.offload_cache!r}")
    if self.query_chunk is not None and (not _is_int(self.query_chunk) or self.query_chunk < 1):
      raise FieldError("GazeConfig", "query_chunk", " must be None or an int >= 1, got "
                       f"{self.query_chunk!r}")
    if isinstance(self.kernel, Mapping):
      # No Pallas import, but jax: not at this module's top (see __post_init__'s first line).
      from pallas_kernels.config import KernelConfig
      object.__setattr__(self, "kernel", _from_fields(KernelConfig, self.kernel,
                                                      "GazeConfig.kernel"))

  def resolve_k(self, n_regions: int):
    """This config's K over ``n_regions`` regions (``layout.max_regions``): a
    ``gaze_jax.gaze.routing.ResolvedK`` (the static K_max, and the per-example ratio with
    ``top_k_per_example``)."""
    from gaze_jax.gaze.routing import resolve_k   # not at the top: see __post_init__
    return resolve_k(self.top_k, n_regions, per_example=self.top_k_per_example)

  # top_k=1 (one region) and top_k=1.0 (all regions) compare equal as numbers; the config is
  # static jit metadata, so equality and hashing must tell them apart.
  def _key(self):
    return (type(self.top_k),) + dataclasses.astuple(self)

  def __eq__(self, other):
    return type(other) is type(self) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
  """A multimodal LLM: vision tower -> projector -> decoder with gaze attention.
  ``vision=None`` gives a text-only LM.

  ``projector``: ``"mlp2x_gelu"`` (LLaVA: one visual token per patch) or ``"pixel_shuffle"``
  (Idefics3 / SmolVLM: each ``scale_factor x scale_factor`` block of patches is concatenated
  into one token, then a bias-free linear layer). ``scale_factor`` is 1 for ``mlp2x_gelu``.
  ``token_pixels`` is the one definition of the pixels per side of a visual token.
  ``newline_token_ids``: token ids whose embedding at TEXT slots is the learned ``image_newline``
  vector (LLaVA-NeXT / OneVision: the image and video token ids, which their processors write
  where the newline embedding goes: after each row of a tiled grid, after a video); empty (the
  default) builds no such parameter.

  ``qwen_vision``: a Qwen2.5-VL / Qwen3-VL vision tower (``gaze_jax.model.qwen_vision.
  QwenVisionConfig``, or a dict of its fields) instead of ``vision``: its 2 x 2 merger is the
  connector (``out_hidden_size`` = the decoder's width; ``projector`` and ``scale_factor`` are
  unused), its inputs are patch rows (``MLLM`` takes ``QwenPatches`` where other models take
  images), and Qwen3-VL's DeepStack features are added to the hidden states at the visual slots
  after the first ``len(deepstack_visual_indexes)`` decoder layers. ``qwen_grids``: the static
  patch grids ``(t, h, w)`` of the visual segments of every example, in sequence order (the
  buckets a training config fixes), used inside ``jit`` when a batch's ``QwenPatches`` carries
  no static grids of its own (``MLLM.qwen_features``); empty: the grids must come with the
  batch.
  """
  decoder: DecoderConfig
  vision: Optional[VisionConfig] = None
  gaze: GazeConfig = GazeConfig()
  projector: str = "mlp2x_gelu"
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"    # master weights
  scale_factor: int = 1
  newline_token_ids: tuple[int, ...] = ()
  qwen_vision: Any = None
  qwen_grids: tuple[tuple[int, int, int], ...] = ()

  def __post_init__(self):
    self._check_qwen()
    one_of(self, "projector", PROJECTORS)
    one_of(self, "dtype", DTYPES)
    one_of(self, "param_dtype", DTYPES)
    s = self.scale_factor
    if not _is_int(s) or s < 1:
      raise FieldError("MLLMConfig", "scale_factor", f" must be an int >= 1, got {s!r}")
    if self.projector == "mlp2x_gelu" and s != 1:
      raise FieldError("MLLMConfig", "scale_factor", f"={s} needs projector='pixel_shuffle' "
                       "(mlp2x_gelu keeps one token per patch)")
    if self.vision is not None and self.vision.grid % s:
      raise FieldError("MLLMConfig", "scale_factor", f"={s} must divide the vision tower's "
                       f"native grid {self.vision.grid} (image_size {self.vision.image_size} / "
                       f"patch_size {self.vision.patch_size})")
    ids = self.newline_token_ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (tuple, list)) or not all(
        _is_int(i) and 0 <= i < self.decoder.vocab_size for i in ids):
      raise FieldError("MLLMConfig", "newline_token_ids", " must be token ids in [0, "
                       f"vocab_size={self.decoder.vocab_size}), got {ids!r}")
    if ids and self.vision is None:
      raise FieldError("MLLMConfig", "newline_token_ids", " needs a vision tower (vision=None)")
    object.__setattr__(self, "newline_token_ids", tuple(int(i) for i in ids))

  def _check_qwen(self):
    qv = self.qwen_vision
    if qv is None:
      if self.qwen_grids:
        raise FieldError("MLLMConfig", "qwen_grids", " needs qwen_vision (a Qwen vision tower)")
      return
    # jax and flax, only when used; and qwen_vision imports this module (via vision).
    from gaze_jax.model.qwen_vision import QwenVisionConfig
    if isinstance(qv, Mapping):
      qv = _from_fields(QwenVisionConfig, qv, "MLLMConfig.qwen_vision")
      object.__setattr__(self, "qwen_vision", qv)
    elif not isinstance(qv, QwenVisionConfig):
      raise FieldError("MLLMConfig", "qwen_vision", f" must be None, a QwenVisionConfig or a "
                       f"dict of its fields, got {qv!r}")
    if self.vision is not None:
      raise FieldError("MLLMConfig", "qwen_vision", " and vision are exclusive (one vision "
                       "tower: set vision=None)")
    if self.scale_factor != 1 or self.projector != "mlp2x_gelu":
      raise FieldError("MLLMConfig", "qwen_vision", " has its own merger as the connector: "
                       "leave projector and scale_factor at their defaults")
    if qv.out_hidden_size != self.decoder.hidden_size:
      raise FieldError("MLLMConfig", "qwen_vision", f".out_hidden_size={qv.out_hidden_size} "
                       f"must equal the decoder's hidden_size={self.decoder.hidden_size}")
    n = len(qv.deepstack_visual_indexes)
    if n > self.decoder.num_layers:
      raise FieldError("MLLMConfig", "qwen_vision", f".deepstack_visual_indexes has {n} levels, "
                       f"more than the decoder's num_layers={self.decoder.num_layers}")
    grids = self.qwen_grids
    m = qv.spatial_merge_size
    ok = isinstance(grids, (tuple, list)) and all(
        isinstance(g, (tuple, list)) and len(g) == 3 and all(_is_int(x) and x >= 1 for x in g)
        and g[1] % m == 0 and g[2] % m == 0 for g in grids)
    if not ok:
      raise FieldError("MLLMConfig", "qwen_grids", f" must be (t, h, w) patch grids of ints >= 1 "
                       f"with h and w multiples of spatial_merge_size={m}, got {grids!r}")
    object.__setattr__(self, "qwen_grids", tuple(tuple(int(x) for x in g) for g in grids))

  @property
  def has_vision(self) -> bool:
    """Whether the model has a vision tower (SigLIP-style ``vision`` or ``qwen_vision``)."""
    return self.vision is not None or self.qwen_vision is not None

  @property
  def token_pixels(self) -> int:
    """Pixels per side of one visual token: the patch size times the projector's scale factor
    (an ``H x W`` image gives an ``H // token_pixels x W // token_pixels`` token grid); for a
    Qwen tower the patch size times its merge size."""
    if self.qwen_vision is not None:
      return self.qwen_vision.patch_size * self.qwen_vision.spatial_merge_size
    if self.vision is None:
      raise ValueError("a text-only model (vision=None) has no visual tokens")
    return self.vision.patch_size * self.scale_factor

  @property
  def token_grid(self) -> int:
    """Visual tokens per side of an image at the tower's native size."""
    if self.qwen_vision is not None:
      raise ValueError("a Qwen vision tower has no native image size (its grids are the "
                       "processor's buckets)")
    return self.vision.image_size // self.token_pixels
