"""Word-piece tokenizers of the demo's text encoders, built with the `tokenizers` library.

One byte-pair-encoding vocabulary is learned, deterministically, from the training prompts
(lower-case words split on whitespace, each word ending in "</w>", so decoding gives the text
back). The CLIP tokenizer wraps a prompt as `<bos> ... <eos>` (the CLIP encoder's pooled output is
read at `<eos>`); the T5 one appends `<eos>`. Both pad with `<pad>` (id 0). Each is saved as a
folder with `tokenizer.json` and `tokenizer_config.json`, which
`models.tokenizers.Tokenizer.from_pretrained` reads.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SUFFIX = "</w>"  # marks the end of a word
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3
EOS_ID = SPECIAL_TOKENS.index(EOS)
MAX_LENGTH = 12  # tokens per prompt, specials included (the longest name in the subset has 10)


def learn_merges(texts: Sequence[str], vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
  """Byte-pair merges learned from `texts`, deterministically: (vocabulary, merges).

  Words are the lower-case whitespace-separated pieces; a word starts as its characters, the last
  one carrying "</w>". Each round merges the most frequent adjacent pair (ties: the smallest pair
  in string order), until the vocabulary (special tokens first) holds `vocab_size` entries. The
  `tokenizers` trainer breaks ties in hash order, which differs between runs.
  """
  words = Counter(w for t in texts for w in unicodedata.normalize("NFKC", t).lower().split())
  splits = {w: [*w[:-1], w[-1] + SUFFIX] for w in sorted(words)}
  vocab = list(SPECIAL_TOKENS) + sorted({s for parts in splits.values() for s in parts})
  merges: list[tuple[str, str]] = []
  while len(vocab) < vocab_size:
    pairs: Counter = Counter()
    for w, parts in splits.items():
      for pair in zip(parts, parts[1:], strict=False):
        pairs[pair] += words[w]
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    vocab.append(best[0] + best[1])
    for w, parts in splits.items():
      i, merged = 0, []
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      splits[w] = merged
  return vocab, merges


def build_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A BPE tokenizer (no post-processor) with the merges `learn_merges` finds in `texts`."""
  vocab, merges = learn_merges(texts, vocab_size)
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                        unk_token=UNK, end_of_word_suffix=SUFFIX))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.BPEDecoder(suffix=SUFFIX)
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def _with_template(base: tokenizers.Tokenizer, template: str) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer.from_str(base.to_str())
  ids = [(t, tok.token_to_id(t)) for t in (BOS, EOS) if t in template]
  tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
  return tok


def clip_tokenizer(base: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """`<bos> text <eos>`, as CLIP's tokenizer wraps a prompt."""
  return _with_template(base, f"{BOS} $A {EOS}")


def t5_tokenizer(base: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """`text <eos>`, as T5's tokenizer ends a prompt."""
  return _with_template(base, f"$A {EOS}")


def save_tokenizer(tok: tokenizers.Tokenizer, folder: str | os.PathLike, *,
                   model_max_length: int = MAX_LENGTH) -> Path:
  """Writes `tokenizer.json` and `tokenizer_config.json` (pad token, length limit) to `folder`."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  config = {"pad_token": PAD, "unk_token": UNK, "bos_token": BOS, "eos_token": EOS,
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast"}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return folder
