"""Remembered sha256s (sdfast/hash_memo.py): a second check reads nothing, and no change slips by."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from sdfast import hash_memo


@pytest.fixture
def memo(tmp_path, monkeypatch):
    monkeypatch.setenv("SDFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(hash_memo.ENV, raising=False)
    monkeypatch.setattr(hash_memo, "RACY_S", 0.0)  # files made by the test are seconds old at most
    return tmp_path / "cache" / "verified-hashes"


class Counting:
    def __init__(self):
        self.reads = 0

    def __call__(self, path):
        self.reads += 1
        return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(tmp_path, data: bytes = b"w" * 4096):
    p = tmp_path / "unet.bin"
    p.write_bytes(data)
    old = time.time() - 60
    os.utime(p, (old, old))
    return p


def test_a_second_check_of_an_unchanged_file_reads_nothing(tmp_path, memo):
    p, h = weights(tmp_path), Counting()
    first = hash_memo.sha256_of(p, h)
    assert first == hashlib.sha256(p.read_bytes()).hexdigest() and h.reads == 1
    assert hash_memo.sha256_of(p, h) == first and h.reads == 1
    assert len(list(memo.iterdir())) == 1


def test_a_file_changed_in_place_with_its_size_and_mtime_restored_is_hashed_again(tmp_path, memo):
    p, h = weights(tmp_path), Counting()
    hash_memo.sha256_of(p, h)
    st = p.stat()
    with open(p, "r+b") as fh:  # the same size, another byte
        fh.write(b"X")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    assert hash_memo.sha256_of(p, h) == hashlib.sha256(p.read_bytes()).hexdigest() and h.reads == 2


def test_a_file_replaced_by_another_is_hashed_again(tmp_path, memo):
    p, h = weights(tmp_path), Counting()
    hash_memo.sha256_of(p, h)
    other = tmp_path / "other.bin"
    other.write_bytes(b"v" * 4096)
    os.replace(other, p)
    assert hash_memo.sha256_of(p, h) == hashlib.sha256(b"v" * 4096).hexdigest() and h.reads == 2


def test_a_file_changed_just_now_is_not_remembered(tmp_path, memo, monkeypatch):
    monkeypatch.setattr(hash_memo, "RACY_S", 3600.0)
    p, h = tmp_path / "fresh.bin", Counting()
    p.write_bytes(b"f" * 100)
    hash_memo.sha256_of(p, h)
    hash_memo.sha256_of(p, h)
    assert h.reads == 2 and not memo.exists()


def test_the_off_switch_hashes_every_time_and_writes_nothing(tmp_path, memo, monkeypatch):
    monkeypatch.setenv(hash_memo.ENV, "off")
    p, h = weights(tmp_path), Counting()
    hash_memo.sha256_of(p, h)
    hash_memo.sha256_of(p, h)
    assert h.reads == 2 and not memo.exists()


def test_an_entry_in_a_folder_others_may_write_is_never_believed(tmp_path, memo):
    p, h = weights(tmp_path), Counting()
    hash_memo.sha256_of(p, h)
    entry = next(memo.iterdir())
    entry.write_text("0" * 64)  # a planted entry vouching for other contents
    os.chmod(memo, 0o777)
    try:
        assert hash_memo.sha256_of(p, h) == hashlib.sha256(p.read_bytes()).hexdigest() and h.reads == 2
    finally:
        os.chmod(memo, 0o700)
    os.chmod(entry, 0o666)
    assert hash_memo.sha256_of(p, h) == hashlib.sha256(p.read_bytes()).hexdigest() and h.reads == 3


@pytest.mark.parametrize("content", ["", "not a hash", "g" * 64, "a" * 63])
def test_a_damaged_entry_is_a_hash_computed_again(tmp_path, memo, content):
    p, h = weights(tmp_path), Counting()
    hash_memo.sha256_of(p, h)
    next(memo.iterdir()).write_text(content)
    assert hash_memo.sha256_of(p, h) == hashlib.sha256(p.read_bytes()).hexdigest() and h.reads == 2


def test_an_unwritable_cache_still_checks(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder would go")
    monkeypatch.setenv("SDFAST_CACHE", str(blocker))
    monkeypatch.setattr(hash_memo, "RACY_S", 0.0)
    p, h = weights(tmp_path), Counting()
    assert hash_memo.sha256_of(p, h) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert hash_memo.sha256_of(p, h) and h.reads == 2
