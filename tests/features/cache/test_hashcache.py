"""The weight-digest cache: reused only while path, size, mtime and inode are unchanged."""
import hashlib
import os

import pytest

from features.cache import hashcache
from features.encoders.base import weights_hash
from features.cache.hashcache import sha256_file
from features.media.ffmpeg import sha256_file as plain_sha256


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashcache, "MIN_BYTES", 0)
    return tmp_path / "cache"


def _counting(digest="d"):
    calls = []

    def compute():
        calls.append(1)
        return f"{digest}{len(calls)}"
    return compute, calls


def test_hit_while_unchanged_miss_after_any_change(tmp_path, cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    compute, calls = _counting()
    assert hashcache.cached("k", [f], compute) == "d1"
    assert hashcache.cached("k", [f], compute) == "d1" and len(calls) == 1  # hit
    assert hashcache.cached("other-kind", [f], compute) == "d2"  # kinds never share entries
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, new content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert hashcache.cached("k", [f], compute) == "d3"
    os.replace(f, tmp_path / "moved.bin")
    (tmp_path / "moved.bin").rename(f)  # same bytes, same mtime: still a hit
    assert hashcache.cached("k", [f], compute) == "d3"


def test_real_digests_equal_uncached_ones(tmp_path, cache, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(5000))
    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert sha256_file(folder / "model.safetensors") == expected
    assert sha256_file(folder / "model.safetensors") == expected  # from the cache
    assert plain_sha256(folder / "model.safetensors") == expected
    cached = weights_hash(str(folder), "", None)
    assert weights_hash(str(folder), "", None) == cached
    monkeypatch.setenv("MER_CACHE_DIR", "off")
    assert weights_hash(str(folder), "", None) == cached  # same fingerprint with no cache
    assert (cache / "hashes.json").is_file()


def test_videos_are_not_put_in_the_weight_cache(tmp_path, cache):
    """prepare hashes every video through media.sha256_file, which keeps no cache of its own
    (prepare has its probe cache): the weight cache stays small."""
    f = tmp_path / "clip.mp4"
    f.write_bytes(os.urandom(100))
    plain_sha256(f)
    assert not (cache / "hashes.json").exists()


def test_damaged_cache_or_off_means_recompute(tmp_path, cache, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    compute, calls = _counting()
    hashcache.cached("k", [f], compute)
    (cache / "hashes.json").write_text("{not json")
    assert hashcache.cached("k", [f], compute) == "d2"
    monkeypatch.setenv("MER_CACHE_DIR", "off")
    hashcache.cached("k", [f], compute)
    hashcache.cached("k", [f], compute)
    assert len(calls) == 4
