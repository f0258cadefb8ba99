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
import datetime
import functools
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Optional, Protocol, Sequence

from etils import epath

from gaze_jax.paths import read_json

log = logging.getLogger(__name__)


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


# Private-use characters that no template or tokenizer gives a meaning: they mark where each
# answer sits in a rendered conversation.
_ANSWER = "\ue000{}\ue001"
_ANSWER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
  """A model's own Jinja chat template, rendered as transformers renders it (a sandboxed Jinja
  environment with ``trim_blocks``, ``lstrip_blocks``, loop controls, ``tojson``,
  ``raise_exception``, ``strftime_now``, ``{% generation %}`` blocks, and the tokenizer's
  special-token strings as variables).

  A conversation becomes the messages a transformers processor takes: each user turn's content
  is a list of ``{"type": "image"}`` (or ``"video"``) and ``{"type": "text", "text": ...}``
  items in the order of its ``<image>`` markers (the newlines that LLaVA's ``<image>\\n``
  convention puts next to a marker are dropped: the template decides the separator); without
  markers all media go first in the first turn. Each answer is rendered through a private-use
  marker, so the text before it is the prompt and the answer is what is trained, together with
  ``assistant_end`` (the tokenizer's EOS) when the template writes it right after the answer:
  the model learns to stop. The template writes ``image_token`` / ``video_token`` where a
  medium goes; there the media's segments are placed.

  Attributes:
    source: the Jinja source.
    variables: extra template variables, the tokenizer's special tokens (``bos_token``,
      ``eos_token``, ...) as strings.
    assistant_end: the text that ends an answer (the EOS token), or "" for none.
    image_token, video_token: what the template writes for an image / a video item.
    prefix: text the tokenizer adds before a sequence (its post-processor's BOS, which a
      transformers processor adds when tokenizing the rendered prompt), unless the rendered
      text already starts with it.
    where: the file the template came from (for errors).
  """
  source: str
  variables: tuple[tuple[str, str], ...] = ()
  assistant_end: str = ""
  image_token: str = "<image>"
  video_token: str = "<video>"
  prefix: str = ""
  where: str = "chat template"
  _warned_prompt: bool = dataclasses.field(default=False, compare=False, repr=False)

  def _with_prefix(self, text: str) -> str:
    return self.prefix + text if self.prefix and not text.startswith(self.prefix) else text

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The template applied to ``messages`` (transformers' ``apply_chat_template(...,
    tokenize=False)``)."""
    import jinja2   # the [data] extra, for model folders' templates: not at the module's top

    try:
      return _compiled_jinja(self.source).render(
          messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None,
          documents=None, **dict(self.variables))
    except jinja2.TemplateError as e:
      raise ValueError(f"{self.where}: the chat template failed: {e}") from None

  def messages(self, turns: Sequence[tuple[str, str]], n_media: int, video: bool = False,
               marker: str = "<image>") -> list[dict]:
    """The conversation as transformers' messages, answers replaced by their markers."""
    kind = "video" if video else "image"
    out = []
    markers = sum(q.count(marker) for q, _ in turns)
    for k, (q, a) in enumerate(turns):
      content = [{"type": kind}] * n_media if (k == 0 and not markers) else []
      pieces = q.split(marker)
      for j, piece in enumerate(pieces):
        if j:
          content.append({"type": kind})
        piece = piece.lstrip("\n") if j else piece
        piece = piece.rstrip("\n") if j < len(pieces) - 1 else piece
        if piece:
          content.append({"type": "text", "text": piece})
      out.append({"role": "user", "content": content})
      out.append({"role": "assistant", "content": [{"type": "text", "text": _ANSWER.format(k)}]})
    return out

  def render_parts(self, turns: Sequence[tuple[str, str]], n_media: int, where: str = "example",
                   video: bool = False, marker: str = "<image>") -> list:
    """The conversation as ``("text", str, generated)`` and ``("media", k)`` parts in order
    (see ``gaze_jax.data.features.render_conversation``).

    Raises ValueError naming ``where`` when the template drops an answer or writes another
    number of media placeholders than the conversation has.
    """
    messages = self.messages(turns, n_media, video, marker)
    text = self._with_prefix(self.render(messages))
    token = self.video_token if video else self.image_token
    parts, pos, answers = [], 0, 0
    for m in _ANSWER_RE.finditer(text):
      k = int(m.group(1))
      if k != answers:
        raise ValueError(f"{where}: {self.where} reorders the answers")
      # The prompt ends where transformers' generation prompt for these turns ends (it may stop
      # before text the template writes ahead of an answer, e.g. SmolVLM's "Assistant:" vs
      # "Assistant: <answer>"); what follows is trained, the answer's own text included.
      start = m.start()
      prompt = self._with_prefix(self.render(messages[:2 * k + 1], add_generation_prompt=True))
      if pos <= len(prompt) <= start and text.startswith(prompt):
        start = len(prompt)
      elif not self._warned_prompt:
        object.__setattr__(self, "_warned_prompt", True)
        log.warning("%s: the generation prompt is not the start of the rendered conversation; "
                    "the prompts end at the answers instead", self.where)
      parts += _media_parts(text[pos:start], token)
      answer, pos = text[start:m.start()] + turns[k][1], m.end()
      if self.assistant_end and text.startswith(self.assistant_end, pos):
        answer, pos = answer + self.assistant_end, pos + len(self.assistant_end)
      parts.append(("text", answer, True))
      answers += 1
    if answers != len(turns):
      raise ValueError(f"{where}: {self.where} rendered {answers} of the {len(turns)} answers")
    parts += _media_parts(text[pos:], token)
    media = [j for j, p in enumerate(parts) if p[0] == "media"]
    want = min(n_media, 1) if video else n_media
    if len(media) != want:
      raise ValueError(f"{where}: {self.where} wrote {len(media)} {token!r} placeholders for "
                       f"{want} {'video' if video else 'images'}")
    for k, j in enumerate(media):
      parts[j] = ("media", k)
    return [p for p in parts if p[0] == "media" or p[1]]

  def render_text(self, turns: Sequence[tuple[str, str]]) -> str:
    """The whole (text-only) conversation as one string."""
    return self.render([m for q, a in turns for m in (
        {"role": "user", "content": [{"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a}]})])


def _media_parts(text: str, token: str) -> list:
  """``text`` (prompt) split at ``token``: ``("text", piece, False)`` and ``("media", -1)``."""
  out = []
  for j, piece in enumerate(text.split(token)):
    if j:
      out.append(("media", -1))
    out.append(("text", piece, False))
  return out


@functools.lru_cache(maxsize=16)
def _compiled_jinja(source: str):
  """``source`` compiled in an environment like transformers' for chat templates (sandboxed;
  chat templates from a model folder are untrusted code)."""
  # jinja2: the [data] extra, for model folders' templates; not at the module's top.
  import jinja2
  from jinja2 import ext, nodes
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks trained text for transformers' assistant
    masks; here it renders its body (the answer markers say what is trained)."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


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

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``encode(text)`` with each token's ``(start, end)`` character span in ``text``."""
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def fingerprint(tokenizer) -> str:
  """A short hash of what maps text to ids: the tokenizer's kind, vocabulary size and its
  tokens (specials and words; the whole vocabulary of a ``tokenizers`` one). Checkpoints keep
  it, so that weights are not silently read through different ids."""
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


def _folder_chat_template(folder, configs: Sequence) -> tuple[Optional[str], str]:
  """The chat template of a model folder and the file it came from: ``chat_template.jinja``,
  ``chat_template.json`` (a processor's), else the ``chat_template`` key of ``configs`` in
  order (a named list keeps its ``default``)."""
  jinja = folder / "chat_template.jinja"
  if jinja.is_file():
    return jinja.read_text(), str(jinja)
  found = [(folder / "chat_template.json", "chat_template")]
  found += [(c, "chat_template") for c in configs]
  for file, key in found:
    if not file.is_file():
      continue
    value = read_json(file).get(key)
    if isinstance(value, list):                       # [{"name": "default", "template": ...}]
      value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    if value:
      return value, f"{file} ({key})"
  return None, ""


# Model types whose chat template wraps each image / video in vision markers that the media
# processing replaces together with the pad token (``gaze_jax.data.qwen_vl``).
QWEN_VL_TYPES = ("qwen2_5_vl", "qwen3_vl")


def load_model_tokenizer(folder) -> HFTokenizer:
  """The tokenizer and chat template of a Hugging Face model folder (local or ``gs://``), as a
  transformers processor of that folder uses them: ``tokenizer.json``, the special tokens of
  ``tokenizer_config.json``, and the model's Jinja chat template (``chat_template.jinja``,
  ``chat_template.json``, ``processor_config.json`` or ``tokenizer_config.json``) rendered by
  ``JinjaChatTemplate``. The image / video placeholders are the processor's ``image_token`` /
  ``video_token`` (``processor_config.json``, else ``tokenizer_config.json``, else
  ``<image>`` / ``<video>``). For a Qwen2.5-VL / Qwen3-VL folder (``config.json``'s
  ``model_type``, ``QWEN_VL_TYPES``) they are the whole wrapper its template writes and its
  media processing replaces, ``<|vision_start|><|image_pad|><|vision_end|>`` (``<|video_pad|>``;
  the markers' own keys, ``vision_start_token`` / ``vision_end_token``, may rename them).

  Raises FileNotFoundError naming the folder when it has no ``tokenizer.json`` or no chat
  template, ValueError naming the file for malformed JSON or a special token the vocabulary
  lacks.
  """
  from tokenizers import Tokenizer as _Tok   # optional dependency, only for real models

  folder = epath.Path(folder)              # local or gs://
  file = folder / "tokenizer.json"
  if not file.is_file():
    raise FileNotFoundError(f"{folder} has no tokenizer.json")
  tok = _Tok.from_str(file.read_text())
  tcfg_file, pcfg_file = folder / "tokenizer_config.json", folder / "processor_config.json"
  tcfg = read_json(tcfg_file) if tcfg_file.is_file() else {}
  pcfg = read_json(pcfg_file) if pcfg_file.is_file() else {}
  source, where = _folder_chat_template(folder, (pcfg_file, tcfg_file))
  if source is None:
    raise FileNotFoundError(f"{folder} has no chat template (chat_template.jinja, "
                            "chat_template.json, or a chat_template key in processor_config.json "
                            "or tokenizer_config.json)")
  specials = {k: _token_str(v) for k, v in tcfg.items()
              if k.endswith("_token") and isinstance(_token_str(v), str)}
  extra = tcfg.get("extra_special_tokens")
  if isinstance(extra, dict):
    specials.update({k: _token_str(v) for k, v in extra.items()
                     if isinstance(_token_str(v), str)})
  for k, v in specials.items():
    if tok.token_to_id(v) is None:
      raise ValueError(f"{tcfg_file}: {k}={v!r} is not in the vocabulary of {file}")

  def placeholder(key: str, default: str) -> str:
    return _token_str(pcfg.get(key)) or specials.get(key) or default

  model_file = folder / "config.json"
  model_type = read_json(model_file).get("model_type") if model_file.is_file() else None
  if model_type in QWEN_VL_TYPES:
    start = placeholder("vision_start_token", "<|vision_start|>")
    end = placeholder("vision_end_token", "<|vision_end|>")
    image_token = start + placeholder("image_token", "<|image_pad|>") + end
    video_token = start + placeholder("video_token", "<|video_pad|>") + end
  else:
    image_token = placeholder("image_token", "<image>")
    video_token = placeholder("video_token", "<video>")

  eos = specials.get("eos_token")
  # What the tokenizer's post-processor adds before a sequence (a BOS), as text.
  added = tok.encode("", add_special_tokens=True).ids
  prefix = "".join(tok.id_to_token(i) for i in added)
  template = JinjaChatTemplate(
      source=source, variables=tuple(sorted(specials.items())), assistant_end=eos or "",
      image_token=image_token, video_token=video_token, prefix=prefix, where=where)
  return HFTokenizer(tok, template=template, bos=specials.get("bos_token"), eos=eos,
                     pad=specials.get("pad_token"))


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
  # gguf and tokenizers: optional dependencies, only for GGUF tokenizers.
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
