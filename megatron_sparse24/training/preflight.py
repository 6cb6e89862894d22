"""Checks that run before a model is built, so that a typo or a damaged file stops the run with one
message naming the path and the fix instead of a traceback deep in a library (or no message at all).

Used by both training loops (Megatron-LM's through ``pretrain_gpt_sparse.py``, and the package's own).
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from typing import Iterable, Optional

import numpy as np

__all__ = ["PreflightError", "check_load_dir", "check_indexed_data", "data_prefixes"]

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name, used by both loops
_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}
_SAMPLE_TOKENS = 1 << 20  # token ids checked against the vocabulary: the first and last MiB of tokens


class PreflightError(ValueError):
    """A command-line path or a file it names cannot be used; the message says which and why."""


def check_load_dir(load: Optional[str], load_optional: bool = False, checksums: bool = True) -> Optional[int]:
    """The iteration ``--load DIR`` will resume from (None: start fresh). A missing directory or one
    without a checkpoint is an error unless ``load_optional`` (``--load-optional``): a typo must not
    silently restart training from scratch. A garbled tracker file is an error either way, and so is a
    damaged torch-distributed checkpoint (``checksums``: its items' CRC-32s are verified too, each
    rank reading its share of the files)."""
    if not load:
        return None
    tracker = os.path.join(load, TRACKER)
    if not os.path.isfile(tracker):
        if load_optional:
            return None
        what = "does not exist" if not os.path.isdir(load) else f"has no checkpoint ({TRACKER} is missing)"
        raise PreflightError(f"--load {load}: the directory {what}. To start from scratch, drop --load or add "
                             "--load-optional (then a later run with the same flags resumes from --save)")
    text = open(tracker, encoding="utf-8", errors="replace").read().strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise PreflightError(f"--load {load}: {tracker} holds {text[:40]!r}, not an iteration number: the file is "
                             "damaged (write it again with the iteration of the iter_XXXXXXX directory to resume)")
    iteration = int(text)
    step_dir = os.path.join(load, f"iter_{iteration:07d}")
    if not os.path.isdir(step_dir):
        raise PreflightError(f"--load {load}: {TRACKER} names iteration {iteration} but {step_dir} does not exist")
    _check_distributed_checkpoint(load, step_dir, checksums)
    return iteration


def _check_distributed_checkpoint(load: str, step_dir: str, checksums: bool = True) -> None:
    """A torch-distributed checkpoint (``.metadata`` + ``*.distcp``, Megatron's ``torch_dist`` format) is
    whole: its metadata reads, every data file exists and is as long as the metadata says, and (with
    ``checksums``) every item's bytes match the CRC-32s written with them. (Reading ``.metadata``
    unpickles it, as loading the checkpoint would: load only checkpoints you trust.)"""
    meta_path = os.path.join(step_dir, ".metadata")
    if not os.path.isfile(meta_path):
        return  # another format (or none): the loader reports what it finds
    earlier = (f"resume from an earlier iter_* directory of {load} (write its number into {TRACKER}) or "
               "from a copy of the checkpoint")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(step_dir).read_metadata()
    except Exception as e:  # any failure to read it means the same thing to the user
        raise PreflightError(f"--load {load}: {meta_path} cannot be read ({type(e).__name__}: {e}): the "
                             f"checkpoint is damaged (truncated or overwritten); {earlier}") from None
    needed: dict[str, int] = {}
    items: dict[str, list[tuple[int, int]]] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        path = getattr(info, "relative_path", None)
        if path is not None:
            needed[path] = max(needed.get(path, 0), int(info.offset) + int(info.length))
            items.setdefault(path, []).append((int(info.offset), int(info.length)))
    for name, size in sorted(needed.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            raise PreflightError(f"--load {load}: {path} is missing (its {meta_path} lists it): the checkpoint is "
                                 f"incomplete; {earlier}")
        if os.path.getsize(path) < size:
            raise PreflightError(f"--load {load}: {path} has {os.path.getsize(path)} bytes but the checkpoint's "
                                 f"metadata needs {size}: the file is truncated; {earlier}")
    if checksums:
        rank, world = int(os.environ.get("RANK", 0)), max(1, int(os.environ.get("WORLD_SIZE", 1)))
        bad = _damaged_items(step_dir, {name: items[name] for name in sorted(items)[rank::world]})  # this rank's share
        if bad is not None:
            raise PreflightError(f"--load {load}: {bad}: the file is damaged (its bytes differ from what was saved; "
                                 f"loading it would train on wrong values); {earlier}. --skip-load-checksums skips "
                                 "this check")


class _Window(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a seekable file of their own."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=io.SEEK_SET):
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence] + pos
        return self._pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self._length - self._pos))
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _damaged_items(step_dir: str, items: dict[str, list[tuple[int, int]]]) -> Optional[str]:
    """Where the first damaged item of these ``.distcp`` files is, and what is wrong, or None. Each item
    is a ``torch.save`` archive (megatron-core writes them so, tensors included): a zip whose members
    carry CRC-32s, checked without unpickling anything. Items of a checkpoint written in another
    serialization (none is an archive) have nothing to be checked against; in one whose items are
    archives, an item that is not one is damaged."""
    any_archive, not_archives = False, []
    for name, spans in items.items():
        path = os.path.join(step_dir, name)
        with open(path, "rb") as f:
            for offset, length in sorted(spans):
                f.seek(offset)
                if f.read(4) != b"PK\x03\x04":
                    not_archives.append(f"{path}: the item at byte {offset} is not a torch.save archive")
                    continue
                any_archive = True
                try:
                    with zipfile.ZipFile(io.BufferedReader(_Window(f, offset, length), 1 << 20)) as archive:
                        member = archive.testzip()
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                    return f"{path}: the item at byte {offset} is not a readable archive ({type(e).__name__}: {e})"
                if member is not None:
                    return f"{path}: the item at byte {offset} fails its CRC-32 check (member {member})"
    if any_archive and not_archives:
        return not_archives[0]
    return None


def data_prefixes(data_path: Optional[Iterable[str]]) -> list[str]:
    """The dataset prefixes of Megatron-LM's ``--data-path`` (plain prefixes or weight-prefix pairs)."""
    items = list(data_path or [])
    if len(items) > 1 and len(items) % 2 == 0 and _is_number(items[0]):
        return items[1::2]
    return items


def check_indexed_data(prefixes: Iterable[str], vocab_size: Optional[int] = None):
    """Each ``PREFIX.bin`` / ``PREFIX.idx`` exists, the index is whole and matches the data file's size,
    and (with ``vocab_size``) a sample of the token ids fits the tokenizer's vocabulary."""
    for prefix in prefixes:
        idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
        for path in (idx, bin_):
            if not os.path.isfile(path):
                raise PreflightError(f"--data-path {prefix}: {path} does not exist (make it with "
                                     "tools/preprocess_data.py, or pass --mock-data)")
        dtype, lengths, pointers = _read_index(idx)
        needed = int(pointers[-1]) + int(lengths[-1]) * np.dtype(dtype).itemsize if len(lengths) else 0
        size = os.path.getsize(bin_)
        if size < needed:
            raise PreflightError(f"--data-path {prefix}: {bin_} has {size} bytes but its index {idx} describes "
                                 f"{needed}: the data file is truncated (or belongs to another index); "
                                 "preprocess the data again")
        if vocab_size is not None and needed:
            _check_token_ids(bin_, dtype, needed, vocab_size, prefix)


def _read_index(idx: str):
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1 \
            or head[17] not in _DTYPES:
        raise PreflightError(f"{idx} is not a megatron indexed-dataset index (bad header): preprocess the data again")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    needed = 34 + 12 * sequences + 8 * documents
    if size < needed:
        raise PreflightError(f"{idx} has {size} bytes but its header describes {sequences} sequences needing "
                             f"{needed}: the index is truncated or damaged; preprocess the data again")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=34, shape=(sequences,))
    pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=34 + 4 * sequences, shape=(sequences,))
    if sequences and (lengths.min() < 0 or pointers.min() < 0):
        raise PreflightError(f"{idx} holds negative sequence lengths or offsets: the index is damaged; "
                             "preprocess the data again")
    return _DTYPES[head[17]], lengths, pointers


def _check_token_ids(bin_: str, dtype, nbytes: int, vocab_size: int, prefix: str):
    tokens = np.memmap(bin_, dtype=dtype, mode="r", shape=(nbytes // np.dtype(dtype).itemsize,))
    sample = np.concatenate([tokens[:_SAMPLE_TOKENS], tokens[-_SAMPLE_TOKENS:]])
    top = int(sample.max()) if sample.size else 0
    if top >= vocab_size or (sample.size and int(sample.min()) < 0):
        raise PreflightError(f"--data-path {prefix}: the data holds token id {top} but the tokenizer's vocabulary "
                             f"has {vocab_size} ids: it was tokenized with another tokenizer or vocabulary; pass "
                             "the --tokenizer-type / --tokenizer-model / --vocab-size it was made with")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
