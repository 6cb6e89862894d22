"""The checks both training loops run before building a model: each names the path and the fix."""

import os

import numpy as np
import pytest
import torch

from megatron_sparse24.training.preflight import PreflightError, check_indexed_data, check_load_dir, data_prefixes


def _dataset(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_load_dir(tmp_path):
    assert check_load_dir(None) is None
    with pytest.raises(PreflightError, match="does not exist.*--load-optional"):
        check_load_dir(str(tmp_path / "typo"))
    assert check_load_dir(str(tmp_path / "typo"), load_optional=True) is None
    with pytest.raises(PreflightError, match="has no checkpoint"):
        check_load_dir(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12x\n")
    with pytest.raises(PreflightError, match="'12x', not an iteration number"):
        check_load_dir(str(tmp_path), load_optional=True)  # damaged is an error even when optional
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12\n")
    with pytest.raises(PreflightError, match="iter_0000012 does not exist"):
        check_load_dir(str(tmp_path))
    os.makedirs(tmp_path / "iter_0000012")
    assert check_load_dir(str(tmp_path)) == 12


def _saved_checkpoint(load_dir, iteration=7):
    import warnings

    import torch.distributed.checkpoint as dcp

    step_dir = load_dir / f"iter_{iteration:07d}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: dcp saves as a single process
        dcp.save({"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(64)}, checkpoint_id=str(step_dir))
    (load_dir / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return step_dir


def test_damaged_distributed_checkpoints_are_named(tmp_path):
    step_dir = _saved_checkpoint(tmp_path)
    assert check_load_dir(str(tmp_path)) == 7  # whole: passes
    data = sorted(step_dir.glob("*.distcp"))[0]
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PreflightError, match=rf"{data.name} has \d+ bytes but .* truncated; resume from an earlier"):
        check_load_dir(str(tmp_path))
    data.unlink()
    with pytest.raises(PreflightError, match=rf"{data.name} is missing"):
        check_load_dir(str(tmp_path))
    meta = step_dir / ".metadata"
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(PreflightError, match=r"\.metadata cannot be read \(.*\): the checkpoint is damaged"):
        check_load_dir(str(tmp_path))
    meta.write_bytes(b"garbage" * 10)
    with pytest.raises(PreflightError, match=r"\.metadata cannot be read"):
        check_load_dir(str(tmp_path))


def test_garbled_bytes_of_the_right_length_are_caught_by_the_checksums(tmp_path, monkeypatch):
    """A .distcp whose bytes changed but whose length did not: torch's loader reads it without a word
    (the tensor comes back with other values); the preflight check names the file from the CRC-32s
    of its torch.save archives, without unpickling. --skip-load-checksums skips it; each rank checks
    its share of the files."""
    import torch.distributed.checkpoint as dcp

    step_dir = _saved_checkpoint(tmp_path)
    data = sorted(step_dir.glob("*.distcp"))[0]
    blob = bytearray(data.read_bytes())
    meta = dcp.FileSystemReader(str(step_dir)).read_metadata()
    w = next(info for idx, info in meta.storage_data.items() if idx.fqn == "w")
    middle = w.offset + w.length // 2
    blob[middle:middle + 32] = bytes(32)  # zeros inside w's values: same length, other bytes
    data.write_bytes(bytes(blob))
    loaded = {"w": torch.zeros(4096), "b": torch.zeros(64)}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(step_dir))
    assert not torch.equal(loaded["w"], torch.arange(4096, dtype=torch.float32))  # what the check prevents
    with pytest.raises(PreflightError, match=rf"{data.name}: the item at byte {w.offset} fails its CRC-32 check"
                                             r".*damaged.*--skip-load-checksums"):
        check_load_dir(str(tmp_path))
    assert check_load_dir(str(tmp_path), checksums=False) == 7
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_load_dir(str(tmp_path)) == 7  # one file: rank 0's share
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PreflightError, match="CRC-32"):
        check_load_dir(str(tmp_path))
    blob[w.offset:w.offset + w.length] = bytes(w.length)  # zeroed (a hole after a crash): not an archive any more
    data.write_bytes(bytes(blob))
    with pytest.raises(PreflightError, match=rf"the item at byte {w.offset} is not a torch.save archive"):
        check_load_dir(str(tmp_path))


def test_data_prefixes():
    assert data_prefixes(["a", "b"]) == ["a", "b"]
    assert data_prefixes(["0.3", "a", "0.7", "b"]) == ["a", "b"]
    assert data_prefixes(None) == []


def test_indexed_data(tmp_path):
    prefix = _dataset(tmp_path / "good", [[1, 2, 3, 256], [5, 6, 256]])
    check_indexed_data([prefix], vocab_size=257)
    with pytest.raises(PreflightError, match="missing.idx does not exist"):
        check_indexed_data([str(tmp_path / "missing")])
    with pytest.raises(PreflightError, match="token id 256 but the tokenizer's vocabulary has 256 ids"):
        check_indexed_data([prefix], vocab_size=256)
    # a truncated data file
    short = _dataset(tmp_path / "short", [[1, 2, 3, 4, 5, 6, 7, 8]])
    with open(f"{short}.bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(PreflightError, match="short.bin has 6 bytes but its index .* describes 16"):
        check_indexed_data([short])
    # a damaged index: bad header, then a truncated one
    bad = _dataset(tmp_path / "bad", [[1, 2]])
    with open(f"{bad}.idx", "r+b") as f:
        f.write(b"garbage!!")
    with pytest.raises(PreflightError, match="not a megatron indexed-dataset index"):
        check_indexed_data([bad])
    cut = _dataset(tmp_path / "cut", [[1, 2]] * 10)
    with open(f"{cut}.idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(PreflightError, match="index is truncated or damaged"):
        check_indexed_data([cut])
