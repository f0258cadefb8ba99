"""Tokenizers and chat templates.

Four tokenizers share one small interface (``encode``, ``decode``, ``vocab_size``, ``bos_id``,
``eos_id``, ``pad_id``, ``stop_ids``, ``template``):

* ``ByteTokenizer``: UTF-8 bytes plus a few special tokens, for tiny test configs;
* ``WordTokenizer``: bytes plus one token per word of a closed vocabulary (the synthetic
  datasets' ``scenes.VOCABULARY``), for the CPU demo;
* ``load_hf_tokenizer(dir)``: a Hugging Face ``tokenizer.json`` (``tokenizers`` library);
* ``load_gguf_tokenizer(path)``: the GPT-2-style BPE tokenizer stored in a GGUF file's metadata
  (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``), e.g. SmolLM2's.

``encode`` never adds BOS/EOS by itself: the chat template says where special tokens go, and
special-token strings inside the text (``"<|im_start|>"``) become their ids.

A ``ChatTemplate`` renders a conversation as text pieces; ``render_conversation`` (in
``gaze_jax.data.features``) turns them into segments with images in between.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional, Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Text around the turns of a conversation.

  Rendering: ``prefix`` + (``system_start + system + system_end`` when ``system`` is set), then
  per turn ``user_start + question + user_end + assistant_start`` (prompt), ``answer +
  assistant_end`` (trained: the model learns to stop) and ``turn_sep`` (not trained).
  """
  prefix: str = ""
  system: Optional[str] = None
  system_start: str = ""
  system_end: str = ""
  user_start: str = "User: "
  user_end: str = "\n"
  assistant_start: str = "Assistant: "
  assistant_end: str = ""
  turn_sep: str = "\n"

  @classmethod
  def chatml(cls, system: Optional[str] = None) -> "ChatTemplate":
    """ChatML (Qwen, SmolLM2): ``<|im_start|>role\\ncontent<|im_end|>\\n``."""
    return cls(prefix="", system=system, system_start="<|im_start|>system\n",
               system_end="<|im_end|>\n", user_start="<|im_start|>user\n",
               user_end="<|im_end|>\n", assistant_start="<|im_start|>assistant\n",
               assistant_end="<|im_end|>", turn_sep="\n")

  def header(self) -> str:
    """Text before the first user turn."""
    sys = "" if self.system is None else self.system_start + self.system + self.system_end
    return self.prefix + sys

  def render_text(self, turns: Sequence[tuple[str, str]]) -> str:
    """The whole conversation as one string (text only; for comparisons and logging)."""
    s = self.header()
    for q, a in turns:
      s += self.user_start + q + self.user_end + self.assistant_start + a + self.assistant_end
      s += self.turn_sep
    return s


class Tokenizer(Protocol):
  """What the pipeline and generation need from a tokenizer."""
  template: ChatTemplate

  @property
  def vocab_size(self) -> int: ...
  @property
  def bos_id(self) -> Optional[int]: ...
  @property
  def eos_id(self) -> Optional[int]: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def stop_ids(self) -> tuple[int, ...]: ...
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...


# --------------------------------------------------------------------------- bytes

class ByteTokenizer:
  """UTF-8 bytes shifted past ``SPECIALS``: id ``len(SPECIALS) + b`` is byte ``b``.

  Vocabulary 264. Its chat template is ``<bos><|user|>Q<|assistant|>A<|end|>``.
  """
  SPECIALS = ("<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>",
              "<unk>")
  OFFSET = len(SPECIALS)

  def __init__(self, template: Optional[ChatTemplate] = None):
    self.template = template or ChatTemplate(
        prefix="<bos>", system_start="<|system|>", system_end="", user_start="<|user|>",
        user_end="", assistant_start="<|assistant|>", assistant_end="<|end|>", turn_sep="")
    self._special_id = {s: i for i, s in enumerate(self.SPECIALS)}
    self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

  vocab_size = property(lambda self: self.OFFSET + 256)
  pad_id = property(lambda self: 0)
  bos_id = property(lambda self: 1)
  eos_id = property(lambda self: 2)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return tuple(sorted({self.eos_id, *self.encode(self.template.assistant_end)}))

  def token_to_id(self, token: str) -> Optional[int]:
    return self._special_id.get(token)

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in self._split.split(text):
      if piece in self._special_id:
        ids.append(self._special_id[piece])
      elif piece:
        ids.extend(self.OFFSET + b for b in piece.encode("utf-8"))
    return ids

  def _bytes(self, i: int) -> bytes:
    """The UTF-8 bytes of non-special token ``i``."""
    return bytes([i - self.OFFSET])

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    out, buf = [], bytearray()
    for i in ids:
      i = int(i)
      if i >= self.OFFSET:
        buf += self._bytes(i)
        continue
      out.append(buf.decode("utf-8", errors="replace"))
      buf = bytearray()
      if not skip_special and 0 <= i < self.OFFSET:
        out.append(self.SPECIALS[i])
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


# --------------------------------------------------------------------------- words

class WordTokenizer(ByteTokenizer):
  """``ByteTokenizer`` plus one id per known word, for the closed vocabulary of the synthetic
  datasets: a question word costs one token instead of one per byte, which a 2-layer model
  needs to read "the triangle" in one attention step.

  Ids: ``SPECIALS``, then the 256 bytes (the fallback for anything else), then each word in two
  forms, bare and with a leading space (``"red"``, ``" red"``). Text is cut into maximal runs of
  word characters with an optional leading space; a run in the vocabulary is one token, any
  other text is bytes, so ``decode(encode(s)) == s`` for every string.
  """
  _PIECE = re.compile(r" ?\w+|.", re.S)

  def __init__(self, words: Sequence[str], template: Optional[ChatTemplate] = None):
    super().__init__(template)
    bad = [w for w in words if not re.fullmatch(r"\w+", w)]
    if bad:
      raise ValueError(f"WordTokenizer words must be runs of word characters, got {bad[:5]}")
    # Ids follow the order of ``words``: appending words keeps the ids of the old ones.
    forms = list(dict.fromkeys(f for w in words for f in (w, " " + w)))
    self._words = forms
    base = self.OFFSET + 256
    self._word_id = {w: base + k for k, w in enumerate(forms)}

  vocab_size = property(lambda self: self.OFFSET + 256 + len(self._words))

  def _bytes(self, i: int) -> bytes:
    k = i - self.OFFSET - 256
    return self._words[k].encode("utf-8") if k >= 0 else bytes([i - self.OFFSET])

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in self._split.split(text):
      if piece in self._special_id:
        ids.append(self._special_id[piece])
        continue
      for m in self._PIECE.finditer(piece):
        tok = m.group()
        if tok in self._word_id:
          ids.append(self._word_id[tok])
        else:
          ids.extend(self.OFFSET + b for b in tok.encode("utf-8"))
    return ids


# --------------------------------------------------------------------------- tokenizers lib

class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with our interface. Build it with ``load_hf_tokenizer`` or
  ``load_gguf_tokenizer``."""

  def __init__(self, tokenizer, *, template: ChatTemplate, bos: Optional[str] = None,
               eos: Optional[str] = None, pad: Optional[str] = None):
    self.tokenizer = tokenizer
    self.template = template
    self._bos, self._eos = self._id(bos, "bos"), self._id(eos, "eos")
    pad_id = self._id(pad, "pad")
    self._pad = pad_id if pad_id is not None else (self._eos if self._eos is not None else 0)

  def _id(self, token: Optional[str], what: str) -> Optional[int]:
    if token is None:
      return None
    i = self.tokenizer.token_to_id(token)
    if i is None:
      raise ValueError(f"{what} token {token!r} is not in the vocabulary")
    return i

  vocab_size = property(lambda self: self.tokenizer.get_vocab_size(with_added_tokens=True))
  bos_id = property(lambda self: self._bos)
  eos_id = property(lambda self: self._eos)
  pad_id = property(lambda self: self._pad)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    ids = set(self.encode(self.template.assistant_end))
    if self._eos is not None:
      ids.add(self._eos)
    return tuple(sorted(ids))

  def token_to_id(self, token: str) -> Optional[int]:
    return self.tokenizer.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def fingerprint(tokenizer) -> str:
  """A short hash of what maps text to ids: the tokenizer's kind, vocabulary size and its
  tokens (specials and words; the whole vocabulary of a ``tokenizers`` one). Checkpoints keep
  it, so that weights are not silently read through different ids."""
  import hashlib

  if isinstance(tokenizer, WordTokenizer):
    items = [list(tokenizer.SPECIALS), tokenizer._words]
  elif isinstance(tokenizer, ByteTokenizer):
    items = [list(tokenizer.SPECIALS)]
  elif isinstance(tokenizer, HFTokenizer):
    items = sorted(tokenizer.tokenizer.get_vocab(with_added_tokens=True).items())
  else:
    raise TypeError(f"no fingerprint for {type(tokenizer).__name__}")
  blob = json.dumps([type(tokenizer).__name__, tokenizer.vocab_size, items]).encode()
  return hashlib.sha1(blob).hexdigest()[:16]


# A default system message written literally in a ChatML Jinja template; the newline may be a
# real one or the two characters backslash-n inside a Jinja string literal.
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def template_from_jinja(jinja: Optional[str], vocab_has_chatml: bool) -> ChatTemplate:
  """Our template for a model's Jinja chat template: ChatML when it uses ``<|im_start|>``
  (keeping a default system message written literally in it, as SmolLM2's), else a plain
  ``User: / Assistant:`` template."""
  if (jinja and "<|im_start|>" in jinja) or (not jinja and vocab_has_chatml):
    literal = [m.group(1).replace("\\n", "\n") for m in _CHATML_SYSTEM.finditer(jinja or "")]
    literal = [t for t in literal if not set(t) & set("{}'\"+")]   # not an expression
    return ChatTemplate.chatml(system=literal[0] if literal else None)
  return ChatTemplate()


def _token_str(value) -> Optional[str]:
  """tokenizer_config.json writes special tokens as a string or as ``{"content": ...}``."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def load_hf_tokenizer(path, template: Optional[ChatTemplate] = None) -> HFTokenizer:
  """Loads ``tokenizer.json`` from a directory (or the file itself).

  BOS / EOS / PAD and the chat template come from ``tokenizer_config.json`` beside it when it
  exists (``chat_template`` may also be in ``chat_template.jinja``).
  """
  from tokenizers import Tokenizer as _Tok   # optional dependency, only for real models

  path = Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.exists():
    raise FileNotFoundError(f"no tokenizer.json at {file}")
  tok = _Tok.from_file(str(file))
  cfg_file = file.parent / "tokenizer_config.json"
  cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
  jinja = cfg.get("chat_template")
  jinja_file = file.parent / "chat_template.jinja"
  if jinja is None and jinja_file.exists():
    jinja = jinja_file.read_text()
  if isinstance(jinja, list):                       # [{"name": "default", "template": ...}]
    jinja = next((t.get("template") for t in jinja if t.get("name") == "default"), None)
  if template is None:
    template = template_from_jinja(jinja, tok.token_to_id("<|im_start|>") is not None)
  return HFTokenizer(tok, template=template, bos=_token_str(cfg.get("bos_token")),
                     eos=_token_str(cfg.get("eos_token")), pad=_token_str(cfg.get("pad_token")))


# --------------------------------------------------------------------------- GGUF

# tokenizer.ggml.pre values whose pre-tokenization is GPT-2's byte-level regex.
_GPT2_PRE = ("default", "gpt2", "smollm")
# GGUF token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4


def _gguf_field(reader, key: str, path, required: bool = True):
  f = reader.fields.get(key)
  if f is None:
    if required:
      raise ValueError(f"{path}: GGUF metadata has no {key!r}")
    return None
  return f.contents()


def load_gguf_tokenizer(path, template: Optional[ChatTemplate] = None) -> HFTokenizer:
  """Builds the tokenizer stored in a GGUF file (GPT-2-style BPE, ``tokenizer.ggml.model ==
  "gpt2"``): byte-level pre-tokenizer and decoder, BPE over ``tokens`` / ``merges``, CONTROL
  tokens as special tokens, USER_DEFINED ones as added tokens.

  Raises ValueError for other tokenizer models or pre-tokenizers (their rules differ and would
  give wrong ids silently).
  """
  import gguf
  from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers

  reader = gguf.GGUFReader(str(path))
  kind = _gguf_field(reader, "tokenizer.ggml.model", path)
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) "
                     "is supported")
  pre = _gguf_field(reader, "tokenizer.ggml.pre", path, required=False) or "default"
  if pre not in _GPT2_PRE:
    raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {_GPT2_PRE}")
  tokens = _gguf_field(reader, "tokenizer.ggml.tokens", path)
  merges = _gguf_field(reader, "tokenizer.ggml.merges", path)
  types = _gguf_field(reader, "tokenizer.ggml.token_type", path, required=False)
  types = types if types is not None else [1] * len(tokens)
  add_space = bool(_gguf_field(reader, "tokenizer.ggml.add_space_prefix", path, required=False))

  def special(key):
    i = _gguf_field(reader, key, path, required=False)
    return None if i is None else tokens[int(i)]

  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep:
      raise ValueError(f"{path}: malformed merge {m!r} (expected 'left right')")
    pairs.append((a, b))
  tok = _Tok(models.BPE(vocab=vocab, merges=pairs))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_space, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
  if template is None:
    jinja = _gguf_field(reader, "tokenizer.chat_template", path, required=False)
    template = template_from_jinja(jinja, "<|im_start|>" in vocab)
  return HFTokenizer(tok, template=template, bos=special("tokenizer.ggml.bos_token_id"),
                     eos=special("tokenizer.ggml.eos_token_id"),
                     pad=special("tokenizer.ggml.padding_token_id"))
