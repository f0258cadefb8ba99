"""Text-level answer matching: the usual VQA / SQuAD normalisation of generated strings.

``normalize_answer`` lower-cases, drops punctuation, the articles "a", "an", "the" and
collapses whitespace, so "The red Circle." and "red circle" compare equal.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Iterable, Union

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower case, no punctuation (ASCII and Unicode ``P*`` categories), no articles, single
  spaces, stripped."""
  text = unicodedata.normalize("NFKC", str(text)).lower()
  text = "".join(" " if (c in _PUNCT or unicodedata.category(c).startswith("P")) else c
                 for c in text)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def text_exact_match(prediction: str, references: Union[str, Iterable[str]]) -> bool:
  """True when the normalised prediction equals the normalised reference (or any of several)."""
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError("text_exact_match needs at least one reference answer")
  pred = normalize_answer(prediction)
  return any(pred == normalize_answer(r) for r in refs)


def decode(tokenizer, ids, skip_special: bool = True) -> str:
  """``tokenizer.decode`` of the ids inside its vocabulary (a model's vocabulary may be larger
  than its tokenizer's, e.g. the tiny preset's 512 ids with the 264-id byte tokenizer)."""
  n = getattr(tokenizer, "vocab_size", None)
  ids = [int(i) for i in ids if n is None or 0 <= int(i) < n]
  return tokenizer.decode(ids, skip_special=skip_special)
