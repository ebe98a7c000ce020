"""The numpy safetensors reader/writer: round trips, agreement with the `safetensors` library and
torch, sharded folders, and every kind of broken file giving a CheckpointError that names it."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from convert.safetensors_io import (
    CheckpointError,
    CheckpointReader,
    TensorSpec,
    save_file,
    save_file_streamed,
)


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
  return {
      "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
      "a.bias": rng.standard_normal((5,)).astype(np.float16),
      "b.bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
      "b.fp8": rng.standard_normal((2, 8)).astype(ml_dtypes.float8_e4m3fn),
      "c.int": rng.integers(-100, 100, (7,)).astype(np.int64),
      "c.u8": rng.integers(0, 255, (2, 3)).astype(np.uint8),
      "c.mask": rng.random((3,)) > 0.5,
      "d.scalar": np.array(2.5, np.float32),
      "d.empty": np.zeros((0, 3), np.float32),
  }


def test_round_trip_all_dtypes(tmp_path, np_rng):
  tensors = _tensors(np_rng)
  save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
  with CheckpointReader(tmp_path / "x.safetensors") as reader:
    assert sorted(reader.keys()) == sorted(tensors)
    assert reader.metadata == {"format": "pt"}
    for key, want in tensors.items():
      got = reader.get(key)
      assert got.dtype == want.dtype and got.shape == want.shape, key
      assert got.tobytes() == want.tobytes(), key
      assert reader.shape(key) == want.shape and reader.dtype(key) == want.dtype
    assert reader.nbytes() == sum(t.nbytes for t in tensors.values())
    assert not reader.get("a.weight").flags.writeable
  assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_agrees_with_safetensors_library_both_ways(tmp_path, np_rng):
  tensors = {"w": np_rng.standard_normal((6, 4)).astype(np.float32),
             "i": np_rng.integers(-5, 5, (3,)).astype(np.int8)}
  safetensors.numpy.save_file(tensors, tmp_path / "theirs.safetensors")
  with CheckpointReader(tmp_path / "theirs.safetensors") as reader:
    for key, want in tensors.items():
      np.testing.assert_array_equal(reader.get(key), want)
  save_file(tensors, tmp_path / "ours.safetensors")
  loaded = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
  for key, want in tensors.items():
    np.testing.assert_array_equal(loaded[key], want)


def test_reads_torch_bfloat16(tmp_path):
  torch.manual_seed(0)
  weight = torch.randn(5, 7, dtype=torch.bfloat16)
  safetensors.torch.save_file({"w": weight}, tmp_path / "t.safetensors")
  with CheckpointReader(tmp_path / "t.safetensors") as reader:
    got = reader.get("w")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), weight.float().numpy())


def _write_sharded(folder, rng, with_index=True):
  shard1 = {"x.0": rng.standard_normal((2, 2)).astype(np.float32)}
  shard2 = {"x.1": rng.standard_normal((3,)).astype(np.float32),
            "x.2": np.arange(4, dtype=np.int32)}
  save_file(shard1, folder / "model-00001-of-00002.safetensors")
  save_file(shard2, folder / "model-00002-of-00002.safetensors")
  weight_map = {"x.0": "model-00001-of-00002.safetensors",
                "x.1": "model-00002-of-00002.safetensors",
                "x.2": "model-00002-of-00002.safetensors"}
  if with_index:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
  return {**shard1, **shard2}, weight_map


@pytest.mark.parametrize("open_by", ["folder", "index"])
def test_sharded_folder_with_index(tmp_path, np_rng, open_by):
  tensors, _ = _write_sharded(tmp_path, np_rng)
  path = tmp_path if open_by == "folder" else tmp_path / "model.safetensors.index.json"
  with CheckpointReader(path) as reader:
    assert sorted(reader) == sorted(tensors) and len(reader) == 3
    for key, want in tensors.items():
      np.testing.assert_array_equal(reader.get(key), want)


def test_sharded_folder_without_index_and_variants_ignored(tmp_path, np_rng):
  tensors, _ = _write_sharded(tmp_path, np_rng, with_index=False)
  save_file({"x.0": np.zeros((2, 2), np.float16)}, tmp_path / "model.fp16.safetensors")
  with CheckpointReader(tmp_path) as reader:
    assert sorted(reader) == sorted(tensors)
    assert reader.dtype("x.0") == np.float32


def test_index_errors(tmp_path, np_rng):
  _, weight_map = _write_sharded(tmp_path, np_rng)
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {**weight_map, "x.9": "model-00003.safetensors"}}))
  with pytest.raises(CheckpointError, match=r"shard files listed but missing.*model-00003"):
    CheckpointReader(tmp_path)
  index.write_text(json.dumps({"weight_map": {**weight_map,
                                              "x.0": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(CheckpointError, match=r"not found in the shard the index names.*'x\.0'"):
    CheckpointReader(tmp_path)
  index.write_text("{not json")
  with pytest.raises(CheckpointError, match="not a safetensors index"):
    CheckpointReader(tmp_path)


def test_duplicate_key_across_shards(tmp_path):
  save_file({"k": np.zeros(2, np.float32)}, tmp_path / "a.safetensors")
  save_file({"k": np.ones(2, np.float32)}, tmp_path / "b.safetensors")
  with pytest.raises(CheckpointError, match=r"key 'k' also appears in .*a\.safetensors"):
    CheckpointReader(tmp_path)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="no such file or folder"):
    CheckpointReader(tmp_path / "absent")
  with pytest.raises(CheckpointError, match="holds no .safetensors file"):
    CheckpointReader(tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickled torch weights"):
    CheckpointReader(tmp_path)


def _raw_file(path, header: bytes, payload: bytes = b"", length: int | None = None):
  path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + payload)
  return path


def _header(**entries) -> bytes:
  return json.dumps(entries).encode()


@pytest.mark.parametrize("name,make,match", [
    ("short", lambda p: p.write_bytes(b"\x01\x02"), "shorter than its 8-byte header"),
    ("huge_header", lambda p: _raw_file(p, b"{}", length=1 << 40), "header length"),
    ("header_past_end", lambda p: _raw_file(p, b"{}", length=50), "truncated"),
    ("bad_json", lambda p: _raw_file(p, b"{\"a\": [1, 2"), "corrupt safetensors header"),
    ("not_object", lambda p: _raw_file(p, b"[1, 2, 3]"), "not a JSON object"),
    ("bad_dtype", lambda p: _raw_file(p, _header(w={"dtype": "Q7", "shape": [1],
                                                      "data_offsets": [0, 4]}), b"\0" * 4),
     r"key 'w' has unsupported dtype 'Q7'"),
    ("bad_entry", lambda p: _raw_file(p, _header(w={"dtype": "F32", "shape": "x",
                                                      "data_offsets": [0, 4]}), b"\0" * 4),
     r"bad header entry for key 'w'"),
    ("span_mismatch", lambda p: _raw_file(p, _header(w={"dtype": "F32", "shape": [2, 2],
                                                          "data_offsets": [0, 8]}), b"\0" * 8),
     r"key 'w' is corrupt: shape \(2, 2\) F32 needs 16 bytes, its data_offsets span 8"),
])
def test_corrupt_files(tmp_path, name, make, match):
  path = tmp_path / f"{name}.safetensors"
  make(path)
  with pytest.raises(CheckpointError, match=match) as info:
    CheckpointReader(path)
  assert str(path) in str(info.value)


def test_truncated_file_names_the_key(tmp_path, np_rng):
  path = tmp_path / "t.safetensors"
  save_file({"a": np.ones((4,), np.float32), "b": np_rng.standard_normal((64, 64)).astype(
      np.float32)}, path)
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  with pytest.raises(CheckpointError, match=r"truncated: key 'b' needs bytes up to \d+, the file "
                     rf"has {len(data) - 100}"):
    CheckpointReader(path)


def test_missing_key(tmp_path):
  save_file({"a": np.ones(2, np.float32)}, tmp_path / "m.safetensors")
  with CheckpointReader(tmp_path / "m.safetensors") as reader:
    with pytest.raises(CheckpointError, match=r"missing key 'nope'"):
      reader.get("nope")
    assert "a" in reader and "nope" not in reader


def test_save_file_failure_leaves_nothing(tmp_path):
  with pytest.raises(CheckpointError, match=r"cannot store key 'o' of dtype object"):
    save_file({"a": np.ones(2, np.float32), "o": np.array([None])}, tmp_path / "f.safetensors")
  assert list(tmp_path.iterdir()) == []


def test_streamed_file_reads_with_safetensors_and_checks_what_it_is_given(tmp_path, np_rng):
  """save_file_streamed: tensors made one by one in header order (not sorted) read back with the
  safetensors library; a tensor that is not what the header announced, or a missing one, is a
  ValueError that leaves nothing behind."""
  tensors = {"z": np_rng.standard_normal((3, 2)).astype(np.float32),
             "a": np_rng.integers(-5, 5, (4,)).astype(np.int8)}
  specs = {k: TensorSpec(v.dtype, v.shape) for k, v in tensors.items()}
  made = []

  def produce(items):
    for key, value in items:
      made.append(key)
      yield key, value

  path = tmp_path / "s.safetensors"
  save_file_streamed(specs, produce(tensors.items()), path, {"note": "streamed"})
  assert made == ["z", "a"]
  loaded = safetensors.numpy.load_file(path)
  for key, want in tensors.items():
    np.testing.assert_array_equal(loaded[key], want)
  assert CheckpointReader(path).metadata == {"note": "streamed"}
  bad = [
      (reversed(list(tensors.items())), "got 'a'"),
      ([("z", tensors["z"]), ("a", tensors["a"].astype(np.int16))], "int16"),
      ([("z", tensors["z"])], "'a' and later keys were never produced"),
      ([*tensors.items(), ("b", tensors["a"])], "announced nothing more"),
  ]
  for items, match in bad:
    with pytest.raises(ValueError, match=match):
      save_file_streamed(specs, iter(items), tmp_path / "bad.safetensors")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_file_truncated_after_open(tmp_path):
  path = tmp_path / "t.safetensors"
  save_file({"a": np.ones((64,), np.float32), "b": np.ones((64,), np.float32)}, path)
  reader = CheckpointReader(path)
  path.write_bytes(path.read_bytes()[:-200])
  with pytest.raises(CheckpointError, match=r"t.safetensors: cannot read key 'b'"):
    reader.get("b")
