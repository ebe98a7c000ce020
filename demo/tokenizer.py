"""Word-piece tokenizers of the demo's text encoders, built with the `tokenizers` library.

One byte-pair-encoding vocabulary is learned from the training prompts (lower-case words split on
whitespace, each word ending in "</w>", so decoding gives the text back). The CLIP tokenizer wraps
a prompt as `<bos> ... <eos>` (the CLIP encoder's pooled output is read at `<eos>`); the T5 one
appends `<eos>`. Both pad with `<pad>` (id 0). Each is saved as a folder with `tokenizer.json`
and `tokenizer_config.json`, which `models.tokenizers.Tokenizer.from_pretrained` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3
EOS_ID = SPECIAL_TOKENS.index(EOS)
MAX_LENGTH = 12  # tokens per prompt, specials included (the longest name in the subset has 10)


def build_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A BPE tokenizer learned from `texts` (no post-processor), deterministic for its input."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.BPEDecoder(suffix="</w>")
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                end_of_word_suffix="</w>", show_progress=False)
  tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
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
