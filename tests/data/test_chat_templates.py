"""A model folder's own Jinja chat template (``load_model_tokenizer``, ``JinjaChatTemplate``)
against transformers' ``apply_chat_template``: the rendered text, the generation prompt before
each answer, the token ids a processor would feed the model, and what is trained."""

import json

import numpy as np
import pytest

from gaze_jax.data.features import ExampleProcessor, FeatureConfig, Visual, render_conversation
from gaze_jax.data.tokenizers import JinjaChatTemplate, load_model_tokenizer
from gaze_jax.gaze import Image, Text
from tests.llava_onevision_folder import CHAT_TEMPLATE as LLAVA_OV

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# The chat templates that the SmolVLM and LLaVA-OneVision checkpoints ship (processor
# chat_template.json; LLaVA-OneVision's from its tiny folder), and one with a BOS variable and
# {% generation %} blocks.
SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
WITH_BOS = (
    "{{ bos_token }}{% for message in messages %}[{{ message['role'] }}] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{% generation %}{{ part['text'] | trim }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
TEMPLATES = {"smolvlm": (SMOLVLM, "<end_of_utterance>"), "llava_onevision": (LLAVA_OV, "<|im_end|>"),
             "with_bos": (WITH_BOS, "<|im_end|>")}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>",
            "<end_of_utterance>"]
# (question, answer) turns as the data gives them (LLaVA's "<image>\n" convention), and the
# messages a transformers user writes for the same conversation.
TURNS = [("<image>\nWhat colour is the triangle?", "Red."),
         ("And the <image> circle?", "Blue, I think.")]
MESSAGES = [
    {"role": "user", "content": [{"type": "image"},
                                 {"type": "text", "text": "What colour is the triangle?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    {"role": "user", "content": [{"type": "text", "text": "And the "}, {"type": "image"},
                                 {"type": "text", "text": " circle?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Blue, I think."}]},
]


def _folder(root, name, template, eos):
  """A byte-level BPE trained here, saved with the template as a model folder's tokenizer."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  corpus = ["What colour is the triangle? Red. And the circle? Blue, I think. User Assistant "
            "user assistant"] * 20
  tok.train_from_iterator(corpus, trainer)
  d = root / name
  d.mkdir()
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
      "eos_token": eos, "pad_token": "<|endoftext|>"}))
  (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
  return d


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def folder(request, tmp_path_factory):
  template, eos = TEMPLATES[request.param]
  return _folder(tmp_path_factory.mktemp("tok"), request.param, template, eos), template


def _reference(d, template, messages, **kw):
  ref = transformers.AutoTokenizer.from_pretrained(str(d))
  return ref, ref.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


def test_rendered_text_and_generation_prompts_match_transformers(folder):
  d, template = folder
  tok = load_model_tokenizer(d)
  assert isinstance(tok.template, JinjaChatTemplate)
  parts = render_conversation(tok.template, TURNS, 2)
  text = "".join(tok.template.image_token if p[0] == "media" else p[1] for p in parts)
  _, want = _reference(d, template, MESSAGES)
  prefix = tok.template.prefix if not want.startswith("<|im_start|>") else ""
  assert text == prefix + want
  # Before each answer: exactly transformers' generation prompt for the turns so far.
  answers = [j for j, p in enumerate(parts) if p[0] == "text" and p[2]]
  assert len(answers) == 2
  for k, j in enumerate(answers):
    before = "".join(tok.template.image_token if p[0] == "media" else p[1] for p in parts[:j])
    _, prompt = _reference(d, template, MESSAGES[:2 * k + 1], add_generation_prompt=True)
    assert before == prefix + prompt, k
    # Trained: the answer (after what the template writes past the generation prompt, e.g.
    # SmolVLM's space) and the end-of-turn token that the template writes after it.
    assert parts[j][1].lstrip() == TURNS[k][1] + tok.template.assistant_end


class _OnePatch:
  """Media processing that puts one patch per image (enough to read the token order)."""

  def image(self, image):
    return [Visual(Image(1, 1), np.zeros((1, 8, 8, 3), np.float32))]


def _sequence(tok, turns, n_images):
  """Token ids in sequence order (each image as the image token id) and the trained flags, as
  the pipeline builds them."""
  proc = ExampleProcessor(tok, FeatureConfig(spec=None, image_size=8, patch_size=8),
                          media=_OnePatch())
  example = {"id": "e", "images": [np.zeros((8, 8, 3), np.uint8)] * n_images,
             "turns": [{"question": q, "answer": a} for q, a in turns]}
  segs, ids = proc.segments(example)
  out, trained, it = [], [], iter(ids)
  for seg in segs:
    n = seg.length if isinstance(seg, Text) else 1
    out += [next(it) for _ in range(n)] if isinstance(seg, Text) else [tok.token_to_id("<image>")]
    trained += [bool(getattr(seg, "generated", False))] * n
  return out, trained


def test_token_ids_match_what_a_processor_feeds_the_model(folder):
  """The pipeline's ids equal transformers' tokenization of the whole rendered prompt (a
  processor tokenizes it with special tokens, unless it starts with the BOS); the trained
  tokens are the answers and their end-of-turn tokens."""
  d, template = folder
  tok = load_model_tokenizer(d)
  ids, trained = _sequence(tok, TURNS, 2)
  ref, text = _reference(d, template, MESSAGES)
  special = not text.startswith(ref.bos_token)
  assert ids == ref(text, add_special_tokens=special)["input_ids"]
  answers = tok.decode([i for i, t in zip(ids, trained) if t], skip_special=False)
  eos = tok.template.assistant_end
  assert answers.replace(" ", "") == "".join(a + eos for _, a in TURNS).replace(" ", "")
  assert tok.stop_ids == tuple(sorted({ref.eos_token_id}))


def test_video_and_media_first(tmp_path):
  """A video is one placeholder; without markers the media go first in the first turn, as a
  transformers user writes them."""
  d = _folder(tmp_path, "ov", LLAVA_OV, "<|im_end|>")
  tok = load_model_tokenizer(d)
  parts = render_conversation(tok.template, [("What happens?", "It moves.")], 1, video=True)
  text = "".join(tok.template.video_token if p[0] == "media" else p[1] for p in parts)
  msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "It moves."}]}]
  assert text == _reference(d, LLAVA_OV, msgs)[1]
  assert [p[0] for p in parts].count("media") == 1


def test_bad_folders_and_templates_are_named(tmp_path):
  d = _folder(tmp_path, "a", SMOLVLM, "<end_of_utterance>")
  (d / "chat_template.json").unlink()
  with pytest.raises(FileNotFoundError, match="has no chat template"):
    load_model_tokenizer(d)
  (d / "chat_template.json").write_text("{not json")
  with pytest.raises(ValueError, match="chat_template.json is not valid JSON"):
    load_model_tokenizer(d)
  (d / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM}))
  cfg = json.loads((d / "tokenizer_config.json").read_text())
  (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<nope>"}))
  with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token='<nope>' is not in"):
    load_model_tokenizer(d)
  # A template that drops images, or raises, is an error naming the example.
  drops = JinjaChatTemplate("{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}",
                            where="x.jinja")
  with pytest.raises(ValueError, match="example 'e1': x.jinja wrote 0 '<image>' placeholders"):
    render_conversation(drops, TURNS, 2, where="example 'e1'")
  raises = JinjaChatTemplate("{{ raise_exception('no system role') }}", where="y.jinja")
  with pytest.raises(ValueError, match="y.jinja: the chat template failed: no system role"):
    render_conversation(raises, TURNS, 2)
