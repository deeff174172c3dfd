"""The feature store: round trips, crash safety, clear errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from features.store import StoreError, StoreReader, StoreWriter


def _write(path, n=5, layers=3, dim=4, kind="embedding"):
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((n, layers, dim)).astype(np.float16)
    frames = [rng.standard_normal((1, t + 2, dim)).astype(np.float16) for t in range(n)]
    with StoreWriter(path, kind, meta={"encoder": "x", "layers": layers}) as w:
        for i in range(n):
            w.add(f"clip{i}", frames[i], attrs={"layers": [-1]}, pooled=pooled[i])
    return pooled, frames


def test_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    pooled, frames = _write(path)
    with StoreReader(path, kind="embedding") as s:
        assert s.ids == [f"clip{i}" for i in range(5)]
        assert s.meta == {"encoder": "x", "layers": 3}
        assert s.pooled_shape == (3, 5, 4)
        np.testing.assert_array_equal(s.pooled(layer=-1), pooled[:, -1])
        np.testing.assert_array_equal(s.pooled(layer=0, ids=["clip3", "clip1"]), pooled[[3, 1], 0])
        np.testing.assert_array_equal(s.pooled(), pooled)
        np.testing.assert_array_equal(s.get("clip2"), frames[2])
        assert s.attrs("clip2") == {"layers": [-1]}
        assert "clip4" in s and "nope" not in s
    assert not (tmp_path / "s.h5.tmp").exists()


def test_clear_errors(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    with pytest.raises(StoreError, match="does not exist"):
        StoreReader(tmp_path / "missing.h5")
    with pytest.raises(StoreError, match="expected 'audio'"):
        StoreReader(path, kind="audio")
    with StoreReader(path) as s:
        with pytest.raises(StoreError, match="'ghost' is not in store"):
            s.get("ghost")
        with pytest.raises(StoreError, match="layer 7 out of range"):
            s.pooled(layer=7)
        with pytest.raises(StoreError, match="not in store"):
            s.pooled(layer=0, ids=["clip0", "ghost"])


def test_rejects_bad_ids_and_duplicates(tmp_path):
    with pytest.raises(StoreError, match="no '/'"):
        with StoreWriter(tmp_path / "a.h5", "audio") as w:
            w.add("a/b", np.zeros(3))
    with pytest.raises(StoreError, match="written twice"):
        with StoreWriter(tmp_path / "a.h5", "audio") as w:
            w.add("a", np.zeros(3))
            w.add("a", np.zeros(3))
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "a.h5.tmp").exists()


def test_failed_write_keeps_previous_store(tmp_path):
    path = tmp_path / "s.h5"
    pooled, _ = _write(path)
    with pytest.raises(RuntimeError):
        with StoreWriter(path, "embedding") as w:
            w.add("other", np.zeros(2), pooled=np.zeros((3, 4)))
            raise RuntimeError("crash inside the stage")
    with StoreReader(path) as s:
        np.testing.assert_array_equal(s.pooled(), pooled)


def test_killed_writer_never_leaves_a_readable_partial_store(tmp_path):
    """SIGKILL a real writer mid-run: the target path is absent, and the temp file is refused."""
    path = tmp_path / "s.h5"
    code = (
        "import sys, numpy as np\n"
        "from features.store import StoreWriter\n"
        "w = StoreWriter(sys.argv[1], 'audio')\n"
        "for i in range(100000):\n"
        "    w.add(f'c{i}', np.zeros(1000, np.float32))\n"
        "    if i == 50: print('ready', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == b"ready"
    proc.kill()
    proc.wait()
    assert not path.exists()
    tmp = tmp_path / "s.h5.tmp"
    assert tmp.exists()
    with pytest.raises(StoreError, match="cannot be opened|not a complete"):
        StoreReader(tmp)


def test_summary_for_inspect(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    with StoreReader(path) as s:
        info = s.summary()
    assert info["clips"] == 5 and info["pooled"] == {"layers": 3, "dim": 4, "dtype": "float16"}
    assert info["per_clip"]["dtype"] == "float16"
