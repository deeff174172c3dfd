"""A persistent cache of file digests, keyed by each file's path, size, mtime and inode.

Every stage fingerprints the weights it runs (a 7B LLM is ~15 GB: ~30 s of sha256 on every run,
even a run with one new clip). The digest is kept in ``$MER_CACHE_DIR/hashes.json`` (default
``$XDG_CACHE_HOME/mer`` or ``~/.cache/mer``) and reused while the files' (path, size, mtime_ns,
inode) are unchanged, the rule DVC and ccache use; any change to those is a miss and a rehash.
``MER_CACHE_DIR=off`` turns the cache off. The cache holds digests only, never results.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from features.media import ffmpeg as media

MIN_BYTES = 16 * 2**20  # smaller files hash faster than the cache lookup is worth
_FILE = "hashes.json"


def cache_dir() -> Path | None:
    value = os.environ.get("MER_CACHE_DIR")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mer"


def _state(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino]


def cached(kind: str, files: Sequence[Path], compute: Callable[[], str]) -> str:
    """`compute()` (the digest of `files`), or its cached value while no file changed."""
    folder = cache_dir()
    files = [Path(f) for f in files]
    if folder is None or sum(f.stat().st_size for f in files) < MIN_BYTES:
        return compute()
    key = json.dumps([kind, *(_state(f) for f in files)])
    table = _read(folder / _FILE)
    if key in table:
        return table[key]
    digest = compute()
    if [_state(f) for f in files] == json.loads(key)[1:]:  # not modified while hashing
        table = _read(folder / _FILE)  # another process may have added entries meanwhile
        table[key] = digest
        _write(folder, table)
    return digest


def sha256_file(path: str | os.PathLike) -> str:
    """`features.media.ffmpeg.sha256_file`, remembered while the file is unchanged: for weight files,
    which every run fingerprints (videos have prepare's own probe cache)."""
    return cached("sha256", [Path(path)], lambda: media.sha256_file(path))


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: start again (a miss, never a wrong hit)


def _write(folder: Path, table: dict) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hashes-")
        with os.fdopen(fd, "w") as fh:
            json.dump(table, fh)
        os.replace(tmp, folder / _FILE)
    except OSError:
        pass  # a read-only home costs a rehash next time, nothing more
