"""Renders one example of each dataset to ``docs/<dataset>.png``: the image(s) or video frames
with the ground-truth boxes drawn, and the question / answer below.

Run: ``PYTHONPATH=. .venv/bin/python scripts/make_dataset_pictures.py [--out docs]``
(builds tiny versions of the datasets in a temporary folder; needs the ``[data]`` extra).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BOX = (255, 255, 255)          # white: visible on every shape colour and on the digits
PANEL = 256           # pixels per image / frame in the picture
GAP = 8


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:                      # Pillow without FreeType: a fixed bitmap font
    return ImageFont.load_default()


def _s(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def render(example: dict, title: str) -> Image.Image:
  """One picture: panels for the images with their boxes, then the conversation."""
  images = [np.asarray(im) for im in example["images"]]
  boxes, where = np.asarray(example["boxes"]), np.asarray(example["box_image"])
  video = bool(example["is_video"])
  panels = []
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    scale = PANEL / max(h, w)
    p = Image.fromarray(im).resize((round(w * scale), round(h * scale)), Image.NEAREST)
    d = ImageDraw.Draw(p)
    for (x0, y0, x1, y1), f in zip(boxes, where):
      if f == i:
        d.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=BOX, width=3)
    if video:
      d.text((4, 2), f"frame {i + 1}", fill=(255, 255, 255), font=_font(14))
    panels.append(p)
  q = example["turns"]["question"]
  a = example["turns"]["answer"]
  lines = [title]
  for qi, ai in zip(q, a):
    lines += textwrap.wrap("Q: " + _s(qi).replace("\n", " "), 70)
    lines += textwrap.wrap("A: " + _s(ai), 70)
  font = _font(15)
  width = max(sum(p.width for p in panels) + GAP * (len(panels) + 1), 520)
  height = max((p.height for p in panels), default=0) + 2 * GAP + 20 * len(lines) + GAP
  canvas = Image.new("RGB", (width, height), (250, 250, 250))
  x = GAP
  for p in panels:
    canvas.paste(p, (x, GAP))
    x += p.width + GAP
  d = ImageDraw.Draw(canvas)
  y = GAP * 2 + max((p.height for p in panels), default=0)
  for k, line in enumerate(lines):
    d.text((GAP, y + 20 * k), line, fill=(20, 20, 20) if k else (90, 90, 90), font=font)
  return canvas


def _pick(builder, qtype: str | None = None, split: str = "train") -> dict:
  src = builder.as_data_source(split)
  for i in range(len(src)):
    ex = src[i]
    if qtype is None or _s(ex["question_type"]) == qtype:
      return ex
  return src[0]


def _llava_files(root: Path) -> tuple[Path, Path]:
  """A two-turn, two-image LLaVA record about two procedural scenes, answers read off them."""
  from gaze_jax.data import scenes

  imgs = root / "llava_images"
  imgs.mkdir(parents=True, exist_ok=True)
  objs = []
  for k in range(2):
    image, o = scenes.shapes_scene(np.random.default_rng([7, k]), 192, 4, 5)
    Image.fromarray(image).save(imgs / f"scene{k}.png")
    objs.append(o)
  unique = [o for o in objs[1] if sum(p.shape == o.shape for p in objs[1]) == 1][0]
  rec = [{"id": "demo-0", "image": ["scene0.png", "scene1.png"], "conversations": [
      {"from": "human", "value": "<image>\nHow many shapes are in this picture?"},
      {"from": "gpt", "value": str(len(objs[0]))},
      {"from": "human", "value": f"What colour is the {unique.shape} here? <image>"},
      {"from": "gpt", "value": unique.colour}]}]
  js = root / "llava.json"
  js.write_text(json.dumps(rec))
  return js, imgs


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
  ap.add_argument("--data_dir", default=None, help="where to build (default: a temp folder)")
  args = ap.parse_args()

  import tensorflow_datasets as tfds

  from gaze_jax.data import builders

  tfds.disable_progress_bar()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(args.data_dir or tmp)
    small = dict(num_train=16, num_validation=4, num_test=4)
    shapes = builders.prepare("gaze_shapes", root, "tiny", image_size=192, **small)
    digits = builders.prepare("digit_grid", root, "tiny", image_size=192, **small)
    video = builders.prepare("gaze_video", root, "tiny", image_size=96, **small)
    js, imgs = _llava_files(root)
    llava = builders.prepare("llava_json", root, json_files={"train": str(js)},
                             image_dir=str(imgs), config_name="demo")
    pictures = {
        "gaze_shapes": render(_pick(shapes, "relation"), "gaze_shapes (192 px)"),
        "digit_grid": render(_pick(digits, "sum"), "digit_grid (4 x 4 digits, 192 px)"),
        "gaze_video": render(_pick(video, "change_frame"), "gaze_video (4 frames, 96 px)"),
        "llava_json": render(_pick(llava), "llava_json (2 images, 2 turns)"),
    }
    for name, pic in pictures.items():
      path = out / f"{name}.png"
      pic.save(path, optimize=True)
      kb = path.stat().st_size / 1024
      print(f"{path}: {pic.width}x{pic.height}, {kb:.0f} KB")
      if kb > 200:
        raise SystemExit(f"{path} is {kb:.0f} KB, over the 200 KB budget")


if __name__ == "__main__":
  main()
