"""The weights' digest memo: the class-image cache key hashes the model's files on every run; a memo keyed by
the files' stat spares re-reading ~40 GB of IF-I-XL weights, and must never return a stale digest."""

import json
import os

from dreambooth_fast import fileio
from dreambooth_fast.fileio import sha256_files


def weights(tmp_path, names=("a.safetensors", "b.safetensors")):
    paths = []
    for i, name in enumerate(names):
        path = tmp_path / name
        path.write_bytes(bytes([i]) * 1000)
        paths.append(path)
    return paths


def test_the_memo_gives_the_digest_of_the_files(tmp_path):
    paths = weights(tmp_path)
    memo = tmp_path / "memo.json"
    assert sha256_files(paths, memo) == sha256_files(paths)
    assert sha256_files(paths, memo) == sha256_files(paths)  # now read from the memo
    assert list(json.loads(memo.read_text()).values()) == [sha256_files(paths)]


def test_unchanged_files_are_not_read_again(tmp_path):
    paths = weights(tmp_path)
    memo = tmp_path / "memo.json"
    sha256_files(paths, memo)
    stamp = next(iter(json.loads(memo.read_text())))
    memo.write_text(json.dumps({stamp: "remembered"}))
    assert sha256_files(paths, memo) == "remembered"


def test_a_file_rewritten_with_the_same_size_and_mtime_is_hashed_again(tmp_path):
    paths = weights(tmp_path)
    memo = tmp_path / "memo.json"
    before = sha256_files(paths, memo)
    old = os.stat(paths[1])
    paths[1].write_bytes(b"\x07" * 1000)
    os.utime(paths[1], ns=(old.st_atime_ns, old.st_mtime_ns))  # what a copy keeping timestamps does
    after = sha256_files(paths, memo)
    assert after != before
    assert after == sha256_files(paths)


def test_a_damaged_memo_is_ignored_and_rewritten(tmp_path):
    paths = weights(tmp_path)
    memo = tmp_path / "memo.json"
    for damage in ("{not json", "[1, 2]", ""):
        memo.write_text(damage)
        assert sha256_files(paths, memo) == sha256_files(paths)
        assert list(json.loads(memo.read_text()).values()) == [sha256_files(paths)]


def test_the_memo_keeps_only_the_latest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "MEMO_ENTRIES", 3)
    memo = tmp_path / "memo.json"
    for i in range(5):
        (tmp_path / f"w{i}").write_bytes(bytes([i]))
        sha256_files([tmp_path / f"w{i}"], memo)
    assert list(json.loads(memo.read_text()).values()) == [sha256_files([tmp_path / f"w{i}"]) for i in (2, 3, 4)]


def test_a_memo_that_cannot_be_written_does_not_stop_the_hashing(tmp_path):
    paths = weights(tmp_path)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    assert sha256_files(paths, tmp_path / "cache" / "memo.json") == sha256_files(paths)
