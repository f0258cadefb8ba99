"""A tiny random LLaVA-OneVision folder as ``save_pretrained`` leaves it, with its processor
files (tokenizer, chat template, image / video processor settings), made here with transformers
(no hub); and transformers' processor of that folder. Shared by the converter and processor
tests."""

from __future__ import annotations

import json

import numpy as np

from tests.hf_folders import TEXT_KW, VISION_KW, bpe_tokenizer, randomize

TILE = VISION_KW["image_size"]                       # 32 px tiles, patch 8: 4 x 4 tokens
G = TILE // VISION_KW["patch_size"]
# 1 x 1 up to 2 x 2 tiles: a 40 x 60 image takes 2 x 2 (6 x 8 tokens once unpadded).
PINPOINTS = [[TILE, TILE], [TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# The byte-level BPE needs its 256 byte symbols: a vocabulary of 300, the model's of 320.
VOCAB = 320
# The chat template the LLaVA-OneVision checkpoints ship (their chat_template.json).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ("What is in the picture? A red cat on a mat. Describe the video. A ball rolls left. "
          "user assistant system")


def _tokenizer():
  """A byte-level BPE trained here (vocabulary < the model's ``VOCAB`` ids), specials first."""
  return bpe_tokenizer(SPECIALS, VOCAB - 20, [CORPUS] * 20)


def save_folder(path, seed: int = 0):
  """The model (SigLIP 32 px / patch 8, Qwen2 of width 64, the image and video token ids of
  the tokenizer, 1 x 1 to 2 x 2 tiles) and its processor files in ``path``; returns the
  transformers model (float32, eval mode)."""
  import transformers

  tok = _tokenizer()
  image_id, video_id = tok.token_to_id("<image>"), tok.token_to_id("<video>")
  cfg = transformers.LlavaOnevisionConfig(
      text_config=transformers.Qwen2Config(**{**TEXT_KW, "vocab_size": VOCAB}).to_dict(),
      vision_config=transformers.SiglipVisionConfig(**VISION_KW).to_dict(),
      vision_feature_layer=-2, image_token_index=image_id, video_token_index=video_id,
      image_grid_pinpoints=PINPOINTS)
  hf = transformers.LlavaOnevisionForConditionalGeneration(cfg)
  randomize(hf, seed)
  hf.eval()
  hf.save_pretrained(path)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
      extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
  fast.save_pretrained(path)
  transformers.LlavaOnevisionImageProcessorPil(
      size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS).save_pretrained(path)
  # transformers' video processor needs torchvision to be made and saved: its file by hand.
  (path / "video_preprocessor_config.json").write_text(json.dumps({
      "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": TILE,
                                                                       "width": TILE},
      "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
      "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
      "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
      "do_sample_frames": False}))
  (path / "processor_config.json").write_text(json.dumps({
      "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>",
      "video_token": "<video>", "num_image_tokens": G * G,
      "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
  (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
  return hf


class _Frames:
  """Stands in for transformers' video processor, which needs torchvision: the frames as our
  processing gives them (the token counts depend only on the frame count)."""

  def __init__(self, media):
    self.media = media

  def __call__(self, videos=None, **kw):
    import transformers

    pix = np.stack([self.media.frames(v) for v in videos]).transpose(0, 1, 4, 2, 3)
    return transformers.BatchFeature({"pixel_values_videos": pix})


def processor(path, media, monkeypatch):
  """transformers' ``LlavaOnevisionProcessor`` of the folder: its tokenizer and (Pillow) image
  processor, the video frames from ``media`` (``_Frames``)."""
  import transformers

  # Its constructor checks each part's class, and the video processor's needs torchvision.
  monkeypatch.setattr(transformers.ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None)
  settings = json.loads((path / "processor_config.json").read_text())
  return transformers.LlavaOnevisionProcessor(
      image_processor=transformers.LlavaOnevisionImageProcessorPil.from_pretrained(path),
      tokenizer=transformers.AutoTokenizer.from_pretrained(path),
      video_processor=_Frames(media), chat_template=CHAT_TEMPLATE,
      num_image_tokens=settings["num_image_tokens"],
      vision_feature_select_strategy=settings["vision_feature_select_strategy"])


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A synthetic photo (uint8 ``[h, w, 3]``): smooth colour gradients, a few hard-edged discs
  and sensor noise, so that resizing filters and crops all show."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.stack([120 + 100 * np.sin(3 * x + 1), 90 + 80 * y, 160 - 90 * x * y], -1)
  for _ in range(4):
    cy, cx, r = rng.uniform(0, 1, 3) * [h, w, min(h, w) / 3]
    disc = (np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r
    img[disc] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 6, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)
