"""SmolVLM / Idefics3 image processing at a fixed tile grid (``gaze_jax.data.smolvlm``) against
transformers: the tiles' pixels against its image processor, the prompt's token ids against its
processor, and clear errors for a bad processor folder.

transformers' ``SmolVLMProcessor`` cannot be built here (it needs torchvision for its video
processor and num2words): the prompt is checked against ``Idefics3Processor`` (the same image
prompt code) fed the SmolVLM image processor, and SmolVLM's own prompt function is compared with
our text directly. Without torchvision, transformers' ``SmolVLMImageProcessor`` is its Pillow
backend, which our processing follows."""

import dataclasses
import json

import numpy as np
import pytest

from gaze_jax.data.features import ExampleProcessor, FeatureConfig, Visual
from gaze_jax.data.smolvlm import SmolVLMMedia, TileSettings, natural_grid
from gaze_jax.data.tokenizers import load_model_tokenizer
from gaze_jax.gaze import PATCH, TEXT, Image, LayoutSpec

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers.models.smolvlm.image_processing_pil_smolvlm import (  # noqa: E402
    SmolVLMImageProcessorPil)
from transformers.models.smolvlm.processing_smolvlm import (  # noqa: E402
    DEFAULT_CHAT_TEMPLATE, get_image_prompt_string)

M, LONGEST, G = 64, 128, 4          # tile px, size.longest_edge, tokens per tile side
SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
             "<image>", "<global-img>"] +
            [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
# Image sizes whose natural grid (transformers' choice) is the fixed grid we test; (0, 0) is
# the global image only, of a processor that does not split.
SIZES = {(2, 2): (100, 150), (1, 2): (40, 150), (2, 1): (150, 70), (0, 0): (50, 60)}


def _photo(h, w, seed=0):
  """A photo-like uint8 image: smooth colour gradients, a few discs and sensor noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  y, x = yy / max(h, w), xx / max(h, w)
  im = np.stack([np.sin(3 * x + 1) * 0.5 + 0.5, y, np.cos(5 * x * y) * 0.5 + 0.5], -1) * 200
  for _ in range(4):
    cy, cx = rng.uniform(0, 1, 2) * (h, w)
    r = rng.uniform(0.1, 0.3) * min(h, w)
    im[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
  return np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8)


def _image_processor(**kw):
  return SmolVLMImageProcessorPil(size={"longest_edge": LONGEST},
                                  max_image_size={"longest_edge": M}, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A processor folder as transformers 5 saves it (tokenizer, chat template, processor_config
  .json with the image processor inside), and the processor itself."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["User: What is in the picture? Assistant: A red disc. And here? "
                           "Two discs, I think.\n"] * 20, trainer)
  d = tmp_path_factory.mktemp("smolvlm_processor")
  tok.save(str(d / "tokenizer.json"))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                              bos_token="<|im_start|>",
                                              eos_token="<end_of_utterance>",
                                              pad_token="<|endoftext|>")
  proc = transformers.Idefics3Processor(image_processor=_image_processor(), tokenizer=fast,
                                        image_seq_len=G * G, chat_template=DEFAULT_CHAT_TEMPLATE)
  proc.save_pretrained(str(d))
  return d, proc


def _hf_pixels(ip, image, **kw):
  out = ip(images=[[image]], return_tensors="np", return_row_col_info=True, **kw)
  return out["pixel_values"][0].transpose(0, 2, 3, 1), (out["rows"][0][0], out["cols"][0][0])


@pytest.mark.parametrize("grid", sorted(SIZES))
@pytest.mark.parametrize("mode", ["RGB", "grey", "RGBA"])
def test_tiles_match_transformers_image_processor(folder, grid, mode):
  """At an image size whose natural grid is ours, the tiles (row by row, then the global image)
  are transformers' to float32 rounding (the same Pillow resizes of the same uint8 pixels, the
  same float64 rescale and float32 normalisation; we allow 1e-6)."""
  d, _ = folder
  h, w = SIZES[grid]
  image = _photo(h, w)
  if mode == "grey":
    image = image[..., :1]          # transformers takes grey as [h, w, 1]
  elif mode == "RGBA":
    image = np.concatenate([image, _photo(h, w, 1)[..., :1]], -1)
  settings = TileSettings.from_folder(d)
  ip = _image_processor()
  if grid == (0, 0):        # the global image only: a processor that does not split
    settings, ip = dataclasses.replace(settings, splitting=False), _image_processor(
        do_image_splitting=False)
  else:
    assert natural_grid(h, w, M, LONGEST) == grid
  want, hf_grid = _hf_pixels(ip, image)
  assert hf_grid == grid
  got = SmolVLMMedia(settings, grid).tiles(image)
  assert got.shape == (grid[0] * grid[1] + 1, M, M, 3) == want.shape
  diff = float(np.abs(got - want).max())
  print(f"\n[pixels] grid {grid} {mode}: max abs diff {diff:.3e}")
  assert diff <= 1e-6


def test_other_sizes_are_resized_to_the_fixed_grid(folder):
  """An image whose natural grid is another one still gives the fixed grid's tiles."""
  d, _ = folder
  image = _photo(30, 200)
  assert natural_grid(30, 200, M, LONGEST) == (1, 2)
  media = SmolVLMMedia.from_folder(d, (2, 2))
  assert media.tiles(image).shape == (5, M, M, 3)


def test_settings_from_legacy_preprocessor_config(folder, tmp_path):
  """Older folders keep the image processor in preprocessor_config.json and image_seq_len in
  processor_config.json: the same settings."""
  d, _ = folder
  _image_processor().save_pretrained(str(tmp_path))
  (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": G * G}))
  assert (tmp_path / "preprocessor_config.json").is_file()
  old, new = TileSettings.from_folder(tmp_path), TileSettings.from_folder(d)
  assert dataclasses.replace(old, where="") == dataclasses.replace(new, where="")
  assert (new.tile_size, new.tokens_per_side, new.longest_edge, new.resample) == (M, G, LONGEST, 1)


@pytest.mark.parametrize("grid", [(2, 2), (1, 2), (0, 0)])
def test_image_text_is_smolvlm_prompt(folder, grid):
  """Our parts around the tiles, with each tile read as its image tokens, are SmolVLM's
  processor's prompt for that grid."""
  d, _ = folder
  media = SmolVLMMedia.from_folder(d, grid)
  parts = media.image(_photo(*SIZES[grid]))
  assert all(isinstance(p, str) or p.segment == Image(G, G) for p in parts)
  text = "".join(p if isinstance(p, str) else "<image>" * (G * G) for p in parts)
  assert text == get_image_prompt_string(*grid, G * G, fake_token_around_image=(
      "<fake_token_around_image>"), image_token="<image>", global_image_token="<global-img>")


def test_prompt_token_ids_match_transformers(folder):
  """One conversation with two images (one per turn) at grid 1 x 2: transformers' processor
  ``input_ids`` vs ours in position order (image slots read as the image token), and the tiles
  in the order of the layout's frames vs its ``pixel_values``."""
  d, proc = folder
  grid = (1, 2)
  images = [_photo(*SIZES[grid], seed=s) for s in (0, 1)]
  turns = [("<image>What is in the picture?", "A red disc."),
           ("And here <image>?", "Two discs, I think.")]
  messages = [
      {"role": "user", "content": [{"type": "image"},
                                   {"type": "text", "text": "What is in the picture?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A red disc."}]},
      {"role": "user", "content": [{"type": "text", "text": "And here "}, {"type": "image"},
                                   {"type": "text", "text": "?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "Two discs, I think."}]}]
  text = proc.apply_chat_template(messages)
  want = proc(text=[text], images=[images], return_tensors="np")

  tok = load_model_tokenizer(d)
  n_tiles = 2 * (grid[0] * grid[1] + 1)
  spec = LayoutSpec(seq_len=512, max_regions=n_tiles * 4, max_images=n_tiles,
                    region_shape=(2, 2), num_ctx=0)
  media = SmolVLMMedia.from_folder(d, grid)
  proc_ours = ExampleProcessor(tok, FeatureConfig(spec=spec, image_size=M, patch_size=M // G),
                               media=media)
  f = proc_ours.features({"id": "two-images", "images": images,
                          "turns": [{"question": q, "answer": a} for q, a in turns]})
  kind, pos = f["kind"], f["position"]
  live = (kind == TEXT) | (kind == PATCH)
  image_id = tok.token_to_id("<image>")
  ids = np.zeros(int(pos[live].max()) + 1, np.int64)
  ids[pos[live]] = np.where(kind[live] == PATCH, image_id, f["tokens"][live])
  np.testing.assert_array_equal(ids, want["input_ids"][0])
  # The frames, in layout order, are the processor's tiles of both images.
  np.testing.assert_allclose(f["images"][:n_tiles], want["pixel_values"][0].transpose(0, 2, 3, 1),
                             rtol=0, atol=1e-6)
  # Trained: the answers and their end-of-utterance tokens.
  trained = "".join(tok.decode([t], skip_special=False) for t, m in
                    zip(f["targets"], f["loss_mask"]) if m)
  assert "A red disc.<end_of_utterance>" in trained
  assert "Two discs, I think.<end_of_utterance>" in trained


# ------------------------------------------------------------------ clear errors

def _edited(folder, tmp_path, edit_image=None, edit_proc=None, name="bad"):
  """A copy of the processor folder with its processor_config.json edited."""
  import shutil
  d, _ = folder
  out = tmp_path / name
  shutil.copytree(d, out)
  cfg = json.loads((out / "processor_config.json").read_text())
  if edit_image:
    edit_image(cfg["image_processor"])
  if edit_proc:
    edit_proc(cfg)
  (out / "processor_config.json").write_text(json.dumps(cfg))
  return out


@pytest.mark.parametrize("edit_image,edit_proc,match", [
    (lambda c: c.update(resample="lanczos"), None, r"resample='lanczos' is not supported"),
    (lambda c: c.update(size={"height": 64, "width": 64}), None,
     r"size=\{'height': 64, 'width': 64\} is not supported"),
    (lambda c: c.update(max_image_size=512), None, r"max_image_size=512 is not supported"),
    (lambda c: c.update(image_processor_type="CLIPImageProcessor"), None,
     r"image_processor_type='CLIPImageProcessor' is not supported"),
    (lambda c: c.update(image_mean=[0.5, 0.5]), None, r"image_mean=\[0.5, 0.5\] must be 3"),
    (None, lambda c: c.update(image_seq_len=15), r"image_seq_len=15 is not a square"),
], ids=["resample", "size", "max_image_size", "type", "mean", "seq_len"])
def test_bad_processor_fields_name_file_and_key(folder, tmp_path, edit_image, edit_proc, match):
  bad = _edited(folder, tmp_path, edit_image, edit_proc)
  with pytest.raises(ValueError, match=rf"processor_config.json.*{match}"):
    SmolVLMMedia.from_folder(bad, (2, 2))


def test_bad_grids_and_folders(folder, tmp_path):
  d, _ = folder
  settings = TileSettings.from_folder(d)
  with pytest.raises(ValueError, match=r"grid \(1, 1\): transformers does not split"):
    SmolVLMMedia(settings, (1, 1))
  with pytest.raises(ValueError, match="both 0"):
    SmolVLMMedia(settings, (2, 0))
  with pytest.raises(ValueError, match=r"do_image_splitting=false, but grid \(2, 2\)"):
    SmolVLMMedia(dataclasses.replace(settings, splitting=False), (2, 2))
  with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
    TileSettings.from_folder(tmp_path)
  # The model's config.json beside the processor files must agree on the tile.
  bad = _edited(folder, tmp_path, name="with_model")
  (bad / "config.json").write_text(json.dumps({
      "model_type": "smolvlm", "scale_factor": 2,
      "vision_config": {"image_size": 96, "patch_size": 8}}))
  with pytest.raises(ValueError, match=r"max_image_size.longest_edge=64, but \S*config.json: "
                     r"vision_config.image_size=96"):
    SmolVLMMedia.from_folder(bad, (2, 2))
  (bad / "config.json").write_text(json.dumps({
      "model_type": "smolvlm", "scale_factor": 4,
      "vision_config": {"image_size": 64, "patch_size": 8}}))
  with pytest.raises(ValueError, match=r"image_seq_len=16 \(processor_config.json\), but \S*"
                     r"config.json gives 4 visual tokens per tile"):
    SmolVLMMedia.from_folder(bad, (2, 2))
  with pytest.raises(NotImplementedError, match="SmolVLM video"):
    SmolVLMMedia(settings, (2, 2)).video([_photo(64, 64)])
  with pytest.raises(ValueError, match="uint8"):
    SmolVLMMedia(settings, (2, 2)).tiles(np.zeros((8, 8, 3), np.float32))
  assert isinstance(SmolVLMMedia(settings, (0, 0)).image(_photo(64, 64))[1], Visual)
