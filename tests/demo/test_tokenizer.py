"""demo.tokenizer: BPE learned from names, saved folders read by models.tokenizers."""

import pytest

from demo import tokenizer as demo_tokenizer
from models.tokenizers import Tokenizer

NAMES = ["red apple", "green apple", "fox face", "dog face", "rocket", "t-rex", "ice cream",
         "hot pepper", "red heart", "rocket ship"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  base = demo_tokenizer.build_bpe(NAMES, vocab_size=120)
  root = tmp_path_factory.mktemp("tok")
  demo_tokenizer.save_tokenizer(demo_tokenizer.clip_tokenizer(base), root / "tokenizer")
  demo_tokenizer.save_tokenizer(demo_tokenizer.t5_tokenizer(base), root / "tokenizer_2")
  return root


def test_round_trip_and_special_tokens(folders):
  clip = Tokenizer.from_pretrained(folders / "tokenizer")
  t5 = Tokenizer.from_pretrained(folders / "tokenizer_2")
  assert clip.pad_token_id == t5.pad_token_id == 0
  assert clip.model_max_length == demo_tokenizer.MAX_LENGTH
  clip_ids = clip(NAMES, 12).input_ids
  t5_ids = t5(NAMES, 12).input_ids
  assert clip_ids.shape == t5_ids.shape == (len(NAMES), 12)
  bos, eos = (demo_tokenizer.SPECIAL_TOKENS.index(t) for t in (demo_tokenizer.BOS,
                                                              demo_tokenizer.EOS))
  for name, c, t in zip(NAMES, clip_ids, t5_ids, strict=True):
    assert c[0] == bos
    n = int((t != 0).sum())
    assert t[n - 1] == eos and (t[n:] == 0).all()
    assert list(c[1:n]) == list(t[:n - 1])  # same pieces, CLIP adds <bos>
    assert clip.backend.decode(c.tolist()) == name
    assert t5.backend.decode(t.tolist()) == name


def test_unseen_words_fall_back_to_pieces(folders):
  t5 = Tokenizer.from_pretrained(folders / "tokenizer_2")
  ids = t5(["Red Apple"], 8).input_ids[0]
  assert list(ids) == list(t5(["red apple"], 8).input_ids[0])  # lower-cased
  unseen = t5.backend.encode("rocket apple").ids
  assert demo_tokenizer.SPECIAL_TOKENS.index(demo_tokenizer.UNK) not in unseen


def test_build_is_deterministic():
  a = demo_tokenizer.build_bpe(NAMES, vocab_size=120).to_str()
  b = demo_tokenizer.build_bpe(list(reversed(NAMES)), vocab_size=120).to_str()
  assert a == b
