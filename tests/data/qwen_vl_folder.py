"""Tiny Qwen2.5-VL / Qwen3-VL folders for the processor tests: a byte-level BPE trained here with
Qwen's special tokens, a Qwen-style chat template, the processors' files as the checkpoints ship
them, and a ``config.json`` naming the family and the vision tower's patch sizes."""

import json

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL / Qwen2.5-VL's template (default system prompt; the media wrappers).
QWEN2_5_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3-VL's media and turn structure (no default system prompt; tools and thinking left out).
QWEN3_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{ content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FILES = {
    "qwen2_5_vl": {
        "config.json": {"model_type": "qwen2_5_vl", "vision_config": {
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "tokens_per_second": 2}},
        # As Qwen2.5-VL-*-Instruct ships it (min_pixels / max_pixels at the top level).
        "preprocessor_config.json": {
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"},
        "video_preprocessor_config.json": {
            "size": {"shortest_edge": 3136, "longest_edge": 12845056}, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "video_processor_type": "Qwen2VLVideoProcessor"},
        "template": QWEN2_5_TEMPLATE,
    },
    "qwen3_vl": {
        "config.json": {"model_type": "qwen3_vl", "vision_config": {
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}},
        # As Qwen3-VL-*-Instruct ships them.
        "preprocessor_config.json": {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast"},
        "video_preprocessor_config.json": {
            "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
            "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2, "min_frames": 4,
            "max_frames": 768, "do_sample_frames": True},
        "template": QWEN3_TEMPLATE,
    },
}


def save_folder(path, family: str):
  """Writes the tiny folder of ``family`` to ``path`` (a directory) and returns it."""
  from tests.hf_folders import bpe_tokenizer

  tok = bpe_tokenizer(SPECIALS, corpus=[
      "You are a helpful assistant. What is in the picture? An astronaut and a cat. "
      "Describe the video. system user assistant seconds 0.1 0.5"] * 20)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>"}))
  files = FILES[family]
  (path / "chat_template.jinja").write_text(files["template"])
  for name, content in files.items():
    if name.endswith(".json"):
      (path / name).write_text(json.dumps(content))
  return path


class _Frames:
  """Stands in for transformers' video processor where torchvision does not import: our pixels,
  grid and sampled frame indices, with the metadata transformers gives frames passed without
  any (no fps), so that the processor's own prompt expansion reads them."""

  def __init__(self, media):
    self.media = media
    v = media.settings.video
    self.merge_size, self.temporal_patch_size = v.merge_size, v.temporal_patch_size

  def __call__(self, videos=None, **kw):
    import transformers
    from transformers.video_utils import VideoMetadata

    out = [self.media.video_pixels(list(v)) for v in videos]
    meta = [VideoMetadata(total_num_frames=len(v), fps=None, frames_indices=idx.tolist())
            for v, (_, _, idx) in zip(videos, out)]
    return transformers.BatchFeature({
        "pixel_values_videos": np.concatenate([p for p, _, _ in out]),
        "video_grid_thw": np.asarray([g for _, g, _ in out]), "video_metadata": meta})


def has_torchvision() -> bool:
  try:
    import torchvision.transforms.v2.functional  # noqa: F401
    return True
  except Exception:                                   # ImportError, or a broken install
    return False


def processor(folder, family: str, media=None, monkeypatch=None):
  """transformers' processor of the folder, built from its classes (no hub): the Pillow image
  processor, the tokenizer, and the video processor where torchvision imports, else ``media``'s
  frames (``_Frames``; its constructor's class check is then patched out)."""
  import transformers

  image = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(folder))
  if has_torchvision():
    video_cls = (transformers.Qwen2VLVideoProcessor if family == "qwen2_5_vl"
                 else transformers.Qwen3VLVideoProcessor)
    video = video_cls.from_pretrained(str(folder))
  else:
    video = _Frames(media)
    monkeypatch.setattr(transformers.ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None)
  tok = transformers.AutoTokenizer.from_pretrained(str(folder))
  cls = (transformers.Qwen2_5_VLProcessor if family == "qwen2_5_vl"
         else transformers.Qwen3VLProcessor)
  return cls(image_processor=image, tokenizer=tok, video_processor=video,
             chat_template=FILES[family]["template"])


def photo(name: str, h: int, w: int) -> np.ndarray:
  """A scikit-image sample photo (``astronaut``, ``chelsea``, ...) resized to h x w; where
  scikit-image is not installed, a synthetic photo (smooth gradients, hard-edged discs, sensor
  noise, seeded by ``name``) of that size."""
  from PIL import Image

  try:
    from skimage import data
    im = getattr(data, name)()
  except ImportError:
    seed = sum(map(ord, name))
    rng = np.random.default_rng(seed)
    H, W = 2 * h + 7, 2 * w + 5                      # drawn larger: the resize below filters
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    img = np.stack([120 + 100 * np.sin(3 * x + seed % 5), 90 + 80 * y, 160 - 90 * x * y], -1)
    yy, xx = np.mgrid[0:H, 0:W]
    for _ in range(6):
      cy, cx, r = rng.uniform(0, 1, 3) * [H, W, min(H, W) / 3]
      img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    im = np.clip(np.round(img), 0, 255).astype(np.uint8)
  return np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))


def save_model_folder(path, family: str, seed: int = 0):
  """A complete tiny Qwen2.5-VL / Qwen3-VL folder, as ``save_pretrained`` writes one: the
  processor files and tokenizer of ``save_folder``, and a random model (vision tower of width
  32 at the processor's patch size, a 2-layer decoder of width 64 whose vocabulary is the
  tokenizer's, M-RoPE sections (2, 3, 3); Qwen3-VL with DeepStack after vision blocks 0 and 1).
  Returns the transformers model (float32, eval mode)."""
  import tokenizers
  import transformers

  from tests.hf_folders import randomize

  save_folder(path, family)
  tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  ids = dict(image_token_id=tok.token_to_id("<|image_pad|>"),
             video_token_id=tok.token_to_id("<|video_pad|>"),
             vision_start_token_id=tok.token_to_id("<|vision_start|>"),
             vision_end_token_id=tok.token_to_id("<|vision_end|>"))
  rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
  text = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-6, rope_parameters=rope)
  patch = FILES[family]["config.json"]["vision_config"]["patch_size"]
  vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
  if family == "qwen2_5_vl":
    # Windows of 2 x 2 merged tokens at block 0, full attention at block 1.
    vision.update(tokens_per_second=2, window_size=4 * patch, fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                        tie_word_embeddings=False, **ids)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
  else:
    text["head_dim"] = 16
    vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                     tie_word_embeddings=False, **ids)
    model = transformers.Qwen3VLForConditionalGeneration(cfg)
  randomize(model, seed)
  model.eval()
  model.save_pretrained(path)
  return model
