"""SmolLM2's byte-level BPE tokenizer, rebuilt from GGUF metadata with `tokenizers`.

The GGUF file carries the vocabulary (`tokenizer.ggml.tokens`), the merge list
(`tokenizer.ggml.merges`) and the token types (3 = control token); its
`tokenizer.ggml.pre = "smollm"` is the StarCoder pre-tokenizer: every digit
split on its own, then GPT-2's byte-level regex, with no prefix space.
"""

import functools
import os
import pathlib

import gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

_CONTROL = 3


def from_gguf_reader(reader: gguf.GGUFReader) -> Tokenizer:
  fields = reader.fields
  model = fields["tokenizer.ggml.model"].contents()
  pre = fields["tokenizer.ggml.pre"].contents()
  if model != "gpt2" or pre != "smollm":
    raise ValueError(f"expected a gpt2/smollm tokenizer, got {model}/{pre}")
  tokens = fields["tokenizer.ggml.tokens"].contents()
  types = fields["tokenizer.ggml.token_type"].contents()
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                             byte_fallback=False, ignore_merges=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|endoftext|>, <|im_start|>, ...) must never be split by BPE.
  tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == _CONTROL])
  return tok


def open_gguf(path) -> gguf.GGUFReader:
  """A GGUF file's reader, parsed once per process and version of the file.

  `gguf` parses every metadata field in Python: 6.5 s for SmolLM2's (its
  vocabulary and merges), which a run with a tokenizer and weights from it,
  or the tests, would pay on each opening. The reader maps the file
  read-only, so sharing it is safe."""
  stat = os.stat(path)
  return _reader(str(pathlib.Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
  del mtime_ns, size  # the cache's key: a rewritten file is parsed again
  return gguf.GGUFReader(path)


def from_gguf(path) -> Tokenizer:
  return from_gguf_reader(open_gguf(path))


def from_json(path) -> Tokenizer:
  """A Hugging Face `tokenizer.json`, for users who bring their own weights."""
  return Tokenizer.from_file(str(pathlib.Path(path)))
