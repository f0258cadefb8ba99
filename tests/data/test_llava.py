"""llava_json: several turns and images per example, clear errors for bad records, skipped
records counted with skip_bad, and the pipeline places the images at their markers."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
from PIL import Image as PILImage  # noqa: E402

from gaze_jax.data import builders  # noqa: E402
from gaze_jax.data.features import ExampleProcessor, FeatureConfig  # noqa: E402
from gaze_jax.data.llava import LlavaRecordError, parse_json  # noqa: E402
from gaze_jax.data.tokenizers import ByteTokenizer  # noqa: E402
from gaze_jax.gaze import PATCH, TEXT, LayoutSpec  # noqa: E402
from tests.data.helpers import all_examples, text  # noqa: E402

GOOD = [
    {"id": "two-images", "image": ["a.png", "sub/b.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the first picture?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And here: <image>?"},
        {"from": "gpt", "value": "Blue."}]},
    {"id": 17, "image": "grey.jpg", "conversations": [
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Grey."}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]


@pytest.fixture
def folder(tmp_path):
  imgs = tmp_path / "images"
  (imgs / "sub").mkdir(parents=True)
  a = np.zeros((40, 30, 3), np.uint8)
  a[..., 0] = 200
  b = np.zeros((20, 50, 3), np.uint8)
  b[..., 2] = 180
  PILImage.fromarray(a).save(imgs / "a.png")
  PILImage.fromarray(b).save(imgs / "sub" / "b.png")
  PILImage.fromarray(np.full((16, 16), 90, np.uint8), mode="L").save(imgs / "grey.jpg")
  return tmp_path, imgs, {"a": a, "b": b}


def _write(tmp_path, records, name="data.json"):
  p = tmp_path / name
  p.write_text(json.dumps(records))
  return p


def test_builds_turns_and_images(folder, data_dir):
  tmp, imgs, pix = folder
  js = _write(tmp, GOOD)
  b = builders.prepare("llava_json", data_dir, json_files={"train": str(js)},
                       image_dir=str(imgs), config_name="good")
  assert builders.skipped_records(b) == {"train": []}
  exs = {text(e["id"]): e for e in all_examples(b, "train")}
  assert set(exs) == {"two-images", "17", "text-only"}
  e = exs["two-images"]
  assert [text(q) for q in e["turns"]["question"]] == [
      "<image>\nWhat is in the first picture?", "And here: <image>?"]
  assert [text(a) for a in e["turns"]["answer"]] == ["Red.", "Blue."]
  np.testing.assert_array_equal(e["images"][0], pix["a"])     # png: lossless, order kept
  np.testing.assert_array_equal(e["images"][1], pix["b"])
  grey = exs["17"]["images"][0]
  assert grey.shape == (16, 16, 3) and (grey == 90).all()     # grey converted to RGB
  assert len(exs["text-only"]["images"]) == 0

  # Through the processor: the two images sit at their markers, one answer per turn.
  tok = ByteTokenizer()
  spec = LayoutSpec(seq_len=320, max_regions=32, max_images=2, region_shape=(2, 2), num_ctx=1)
  f = ExampleProcessor(tok, FeatureConfig(spec=spec, image_size=32, patch_size=8))(e)
  kind = f["kind"]
  first_patch = np.nonzero(kind == PATCH)[0][0]
  assert tok.decode(f["tokens"][:first_patch], skip_special=False) == "<bos><|user|>"
  assert f["frame_valid"].tolist() == [True, True] and f["frame_media"].tolist() == [0, 1]
  second = np.nonzero((kind == PATCH) & (f["frame"] == 1))[0][0]
  between = f["tokens"][first_patch:second][kind[first_patch:second] == TEXT]
  assert tok.decode(between, skip_special=False).startswith(
      "\nWhat is in the first picture?<|assistant|>Red.<|end|><|user|>And here: ")
  assert tok.decode(f["targets"][f["loss_mask"] > 0], skip_special=False) == \
      "Red.<|end|>Blue.<|end|>"
  # The resized red image is image 0, the blue one image 1.
  assert f["images"][0, ..., 0].mean() > 0.5 and f["images"][1, ..., 2].mean() > 0.3


def test_edited_sources_are_prepared_again(folder, data_dir):
  """The prepared folder is keyed by the sources' contents: editing the JSON or replacing an
  image it names prepares the data again (same overrides, new examples); unchanged sources
  reuse the prepared data."""
  import os
  tmp, imgs, _ = folder
  js = _write(tmp, GOOD[1:2])
  kw = dict(json_files={"train": str(js)}, image_dir=str(imgs))
  answers = lambda b: [text(e["turns"]["answer"][0]) for e in all_examples(b, "train")]  # noqa: E731
  first = builders.prepare("llava_json", data_dir, **kw)
  assert answers(first) == ["Grey."]
  assert builders.builder("llava_json", data_dir, **kw).info.config_name == \
      first.info.config_name                                    # nothing changed: reused
  edited = json.loads(js.read_text())
  edited[0]["conversations"][1]["value"] = "Dark grey."
  js.write_text(json.dumps(edited))
  second = builders.prepare("llava_json", data_dir, **kw)
  assert second.info.config_name != first.info.config_name
  assert answers(second) == ["Dark grey."]
  # A replaced image (same name, new size and time) gives a new folder too.
  PILImage.fromarray(np.full((16, 16), 30, np.uint8), mode="L").save(imgs / "grey.jpg")
  os.utime(imgs / "grey.jpg", ns=(1, 1))
  third = builders.prepare("llava_json", data_dir, **kw)
  assert third.info.config_name not in (first.info.config_name, second.info.config_name)
  assert (all_examples(third, "train")[0]["images"][0] == 30).all()


def test_bad_record_error_names_the_record_and_file(folder, data_dir):
  tmp, imgs, _ = folder
  bad = GOOD + [{"id": "lost", "image": "missing.png", "conversations": GOOD[1]["conversations"]}]
  js = _write(tmp, bad)
  with pytest.raises(LlavaRecordError, match=r"record 'lost' \(index 3\): image file "
                     r".*missing\.png does not exist"):
    builders.prepare("llava_json", data_dir, json_files={"train": str(js)},
                     image_dir=str(imgs), config_name="bad")


def test_skip_bad_counts_the_skipped_records(folder, data_dir):
  tmp, imgs, _ = folder
  (imgs / "broken.png").write_bytes(b"not a png at all")
  bad = GOOD + [
      {"id": "lost", "image": "missing.png", "conversations": GOOD[1]["conversations"]},
      {"id": "broken", "image": "broken.png", "conversations": GOOD[1]["conversations"]},
      {"id": "roles", "conversations": [{"from": "gpt", "value": "x"},
                                        {"from": "human", "value": "y"}]},
  ]
  js = _write(tmp, bad)
  b = builders.prepare("llava_json", data_dir, json_files={"train": str(js)},
                       image_dir=str(imgs), skip_bad=True, config_name="skip")
  skipped = builders.skipped_records(b)["train"]
  assert [s["id"] for s in skipped] == ["lost", "broken", "roles"]
  assert "missing.png" in skipped[0]["reason"] and "broken.png" in skipped[1]["reason"]
  assert b.info.splits["train"].num_examples == len(GOOD)
  # The count survives reloading the prepared dataset.
  again = builders.builder("llava_json", data_dir, json_files={"train": str(js)},
                           image_dir=str(imgs), skip_bad=True, config_name="skip")
  assert [s["id"] for s in builders.skipped_records(again)["train"]] == ["lost", "broken", "roles"]


@pytest.mark.parametrize("record, message", [
    ({"image": "a.png", "conversations": []}, "has no 'id'"),
    ({"id": "r", "conversations": [{"from": "human", "value": "q"}]}, "human / gpt pairs"),
    ({"id": "r", "conversations": [{"from": "human", "value": "q"},
                                   {"from": "human", "value": "a"}]},
     "conversations\\[1\\] is from 'human'"),
    ({"id": "r", "image": ["a.png"], "conversations": [
        {"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]},
     "2 <image> markers but 1 images"),
    ({"id": "r", "image": 5, "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "'image' must be"),
    ("just a string", "expected a JSON object"),
    ({"id": "r", "conversations": [{"from": "human", "value": "q"},
                                   {"from": "gpt", "value": " "}]},
     "record 'r' .*conversations\\[1\\] \\(an answer\\) is empty"),
])
def test_malformed_records(folder, record, message):
  tmp, imgs, _ = folder
  js = _write(tmp, [GOOD[1], record])
  with pytest.raises(LlavaRecordError, match=message):
    parse_json(js, imgs)
  records, skipped = parse_json(js, imgs, skip_bad=True)
  assert [r.id for r in records] == ["17"] and len(skipped) == 1
  assert skipped[0]["index"] == 1


def test_image_paths_stay_inside_the_image_folder(folder):
  """A readable image outside the folder ("../", an absolute path) is refused, naming the
  record; sub-folders inside it are fine (GOOD's "sub/b.png")."""
  tmp, imgs, _ = folder
  PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "outside.png")
  for name in ("../outside.png", str(tmp / "outside.png"), "sub/../../outside.png"):
    rec = {"id": "escape", "image": name, "conversations": GOOD[1]["conversations"]}
    with pytest.raises(LlavaRecordError, match="record 'escape'.*outside the image folder"):
      parse_json(_write(tmp, [GOOD[1], rec]), imgs)
  ok = {"id": "inside", "image": "sub/../a.png", "conversations": GOOD[1]["conversations"]}
  records, _ = parse_json(_write(tmp, [ok]), imgs)
  assert records[0].images[0].name == "a.png"


def test_not_a_list(tmp_path):
  js = _write(tmp_path, {"id": 1})
  with pytest.raises(LlavaRecordError, match="expected a JSON list"):
    parse_json(js, tmp_path)
  (tmp_path / "x.json").write_text("[{")
  with pytest.raises(LlavaRecordError, match="not valid JSON"):
    parse_json(tmp_path / "x.json", tmp_path)
