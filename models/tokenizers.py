"""Text tokenizers read from a model folder with the `tokenizers` library (no torch, no network).

A folder saved by a transformers fast tokenizer (`save_pretrained`) holds `tokenizer.json` and
`tokenizer_config.json`; that is what we read. CLIP folders that ship only `vocab.json` and
`merges.txt` (as FLUX.1's `tokenizer/` does) are rebuilt into the same byte-level BPE pipeline as
transformers' CLIPTokenizer. A T5 folder with only `spiece.model` needs one conversion with
transformers first (the error says how).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

from svdq_jax.errors import InputError

# transformers writes this for "no limit"; we then need the pipeline's own length.
_UNBOUNDED = 10**20
# The special-token roles of a tokenizer_config.json that we keep and write back.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
               r"""[^\s\p{L}\p{N}]+""")


class TokenizerError(InputError):
  """A tokenizer folder that cannot be read: the message names the folder and what is missing."""


@dataclass(frozen=True)
class TokenizedText:
  """input_ids (B, L) int32 and attention_mask (B, L) int32 (1 for tokens, 0 for padding)."""

  input_ids: np.ndarray
  attention_mask: np.ndarray


def _special(config: dict, name: str) -> str | None:
  value = config.get(name)
  if isinstance(value, dict):  # older configs store AddedToken dicts
    value = value.get("content")
  return value


def _clip_from_vocab(folder: Path, config: dict) -> tokenizers.Tokenizer:
  """CLIP's byte-level BPE (lowercased, words end in '</w>') from vocab.json + merges.txt."""
  vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
  lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
  merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
  unk = _special(config, "unk_token") or "<|endoftext|>"
  bos = _special(config, "bos_token") or "<|startoftext|>"
  eos = _special(config, "eos_token") or "<|endoftext|>"
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
      fuse_unk=False, unk_token=unk))
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([t for t in dict.fromkeys((bos, eos, unk))])
  tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                    trim_offsets=False, add_prefix_space=False)
  return tok


class Tokenizer:
  """Pads and truncates to a fixed length, as the diffusers pipelines call their tokenizers.

  Args:
    backend: the `tokenizers.Tokenizer` (special tokens added by its post-processor).
    pad_token_id: id used for padding.
    model_max_length: the tokenizer's own length limit (None when it has none).
    special_tokens: `{role: token}` for the roles of `SPECIAL_TOKENS` the tokenizer has
      ("eos_token": "</s>"), written back by `save_pretrained`; the pad token is always known.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, pad_token_id: int,
               model_max_length: int | None, special_tokens: dict[str, str] | None = None):
    self.backend = backend
    self.pad_token_id = pad_token_id
    self.model_max_length = model_max_length
    self.special_tokens = {**(special_tokens or {}),
                           "pad_token": backend.id_to_token(pad_token_id)}

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike) -> Tokenizer:
    """Reads a tokenizer folder (tokenizer.json, or CLIP's vocab.json + merges.txt)."""
    folder = Path(folder)
    if not folder.is_dir():
      raise TokenizerError(f"{folder}: tokenizer folder does not exist")
    config_path = folder / "tokenizer_config.json"
    try:
      config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    except json.JSONDecodeError as e:
      raise TokenizerError(f"{config_path}: cannot parse: {e}") from e
    if (folder / "tokenizer.json").exists():
      try:
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
      except Exception as e:  # the Rust side raises its own Exception type
        raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot read: {e}") from e
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
      backend = _clip_from_vocab(folder, config)
    elif (folder / "spiece.model").exists():
      raise TokenizerError(
          f"{folder}: only spiece.model (sentencepiece) is there; write tokenizer.json once with "
          "transformers: T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)")
    else:
      raise TokenizerError(f"{folder}: no tokenizer.json (nor CLIP vocab.json + merges.txt)")
    backend.no_padding()
    backend.no_truncation()
    pad = _special(config, "pad_token")
    if pad is None:
      raise TokenizerError(f"{config_path}: no pad_token (the file is missing or does not set "
                           "it); padding to a fixed length needs one")
    pad_id = backend.token_to_id(pad)
    if pad_id is None:
      raise TokenizerError(f"{folder}: pad token {pad!r} from tokenizer_config.json is not in the "
                           "vocabulary")
    limit = config.get("model_max_length")
    limit = int(limit) if isinstance(limit, int | float) and limit < _UNBOUNDED else None
    special = {role: _special(config, role) for role in SPECIAL_TOKENS}
    return cls(backend, pad_token_id=pad_id, model_max_length=limit,
               special_tokens={role: token for role, token in special.items() if token})

  def save_pretrained(self, folder: str | os.PathLike, *, tokenizer_class: str) -> None:
    """Writes the folder a transformers fast tokenizer saves (and `from_pretrained` reads).

    `tokenizer.json` (the backend, without padding or truncation) and `tokenizer_config.json`
    (`tokenizer_class`, e.g. "CLIPTokenizer" or "T5TokenizerFast", the special tokens and
    `model_max_length`); for a BPE model also `vocab.json` and `merges.txt`, which the older
    Python tokenizers of transformers read. `folder` must exist.
    """
    folder = Path(folder)
    self.backend.save(str(folder / "tokenizer.json"))
    if isinstance(self.backend.model, tokenizers.models.BPE):
      self.backend.model.save(str(folder))
    config = {"tokenizer_class": tokenizer_class, **self.special_tokens}
    if self.model_max_length is not None:
      config["model_max_length"] = self.model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                  encoding="utf-8")

  def __call__(self, texts: str | list[str], max_length: int | None = None) -> TokenizedText:
    """Token ids of each text, with special tokens, truncated and padded to `max_length`.

    max_length: default the tokenizer's `model_max_length` (77 for CLIP).
    """
    if isinstance(texts, str):
      texts = [texts]
    length = max_length or self.model_max_length
    if length is None:
      raise ValueError("Tokenizer: max_length is needed (the tokenizer config sets no limit)")
    self.backend.enable_truncation(length)
    self.backend.enable_padding(length=length, pad_id=self.pad_token_id)
    try:
      encodings = self.backend.encode_batch(list(texts))
    finally:
      self.backend.no_padding()
      self.backend.no_truncation()
    ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), length)
    mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(len(texts), length)
    return TokenizedText(ids, mask)
