"""Small JSON outputs written crash-safely: failure reports and transcripts."""
from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from features.reliability import faults
from features.errors import ClipError


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to a temporary file, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per write: two processes writing one file never share a temporary.
    _remove_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            text = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
            fh.write(text[: len(text) // 2])
            faults.point("json.mid_write", path.name)
            fh.write(text[len(text) // 2:])
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would differ from a plain open()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove_dead_temporaries(path: Path) -> None:
    """Temporaries of `path` left by killed writers (their pid is gone), never a live one's."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@dataclass
class Failure:
    clip_id: str  # the clip that was skipped
    stage: str    # the stage that skipped it
    reason: str   # machine-readable tag: no_audio, unreadable, zero_length, no_face, asr_failed ...
    message: str  # what happened and what to do


class FailureReport:
    """Clips a stage skipped, and why. Written as ``failures.json`` next to the stage's outputs."""

    def __init__(self, stage: str):
        self.stage = stage
        self.items: list[Failure] = []
        self.notes: list[Failure] = []  # handled by a fallback, not skipped (e.g. no face found)

    def add(self, clip_id: str, reason: str, message: str) -> None:
        self.items.append(Failure(clip_id, self.stage, reason, message))

    def note(self, clip_id: str, reason: str, message: str) -> None:
        self.notes.append(Failure(clip_id, self.stage, reason, message))

    def add_error(self, err: ClipError) -> None:
        self.add(err.clip_id, err.reason, err.detail)

    @property
    def clip_ids(self) -> set[str]:
        return {f.clip_id for f in self.items}

    def write(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, {"stage": self.stage, "count": len(self.items),
                                        "failures": [asdict(f) for f in self.items],
                                        "notes": [asdict(f) for f in self.notes]})

    @staticmethod
    def read(path: str | os.PathLike) -> list[Failure]:
        return [Failure(**f) for f in read_json(path)["failures"]]
