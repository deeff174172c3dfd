"""Run per-clip work in a child process, so a decoder that crashes or hangs fails one clip only.

A segfault or abort inside a C decoder (OpenCV's FFmpeg backend on a malformed file) would
otherwise end the whole stage, and its rerun would crash on the same clip again. `Isolated` keeps
one long-lived child (started with `spawn`: no inherited threads or locks), sends it one call at a
time, and turns a dead or silent child into a ClipError for that clip, then starts a fresh child
for the next one.
"""
from __future__ import annotations

import multiprocessing
import signal
from typing import Any, Callable

from features.errors import ClipError, ConfigError, MerError, ModelLoadError

_ERRORS = {"ConfigError": ConfigError, "ModelLoadError": ModelLoadError}


def _serve(conn, fn: Callable[..., Any]) -> None:
    """Child loop: call fn on each received argument tuple; errors travel back as plain tuples
    (ClipError's own __init__ does not survive pickling)."""
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args))
        except ClipError as err:
            reply = ("clip", err.reason, err.detail)
        except MerError as err:
            reply = ("mer", type(err).__name__, str(err))
        except Exception as err:  # noqa: BLE001 - reported as this clip's error by the parent
            reply = ("error", f"{type(err).__name__}: {err}")
        conn.send(reply)


class Isolated:
    """`Isolated(fn, timeout_s)(clip_id, *args)` returns fn(*args) computed in a child process.

    fn must be a module-level function (it is pickled by reference). A crash of the child raises
    ClipError(clip_id, 'decoder_crashed'), a call over timeout_s ClipError(clip_id, 'timeout');
    ClipErrors and configuration errors raised by fn arrive as themselves.
    """

    def __init__(self, fn: Callable[..., Any], timeout_s: float, what: str = "decoding"):
        self.fn, self.timeout_s, self.what = fn, timeout_s, what
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = self._conn = None

    def __enter__(self) -> "Isolated":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, clip_id: str, *args: Any) -> Any:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._conn.send(args)
        if not self._conn.poll(self.timeout_s):
            raise self._lost(clip_id, args, hung=True)
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):  # poll() is also true when the child died: end of file
            raise self._lost(clip_id, args, hung=False) from None
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "clip":
            raise ClipError(clip_id, reply[1], reply[2])
        if reply[0] == "mer":
            raise _ERRORS.get(reply[1], MerError)(reply[2])
        raise RuntimeError(reply[1])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._proc = self._conn = None

    # -- internals ---------------------------------------------------------------------------
    def _start(self) -> None:
        self.close()
        self._conn, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self.fn), daemon=True)
        self._proc.start()
        child.close()

    def _lost(self, clip_id: str, args: tuple, hung: bool) -> ClipError:
        """The child died or went silent on this call: make sure it is gone, say what happened."""
        self._proc.join(timeout=0 if hung else 5)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        code = self._proc.exitcode
        self._conn.close()
        self._proc = self._conn = None
        target = args[0] if args else clip_id
        if hung:
            return ClipError(clip_id, "timeout",
                             f"{self.what} {target} took over {self.timeout_s:g} s and was stopped; "
                             "check the file (raise MER_DECODE_TIMEOUT_S for very long clips).")
        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        return ClipError(clip_id, "decoder_crashed",
                         f"{self.what} {target} crashed the decoder process ({how}); the clip is "
                         "skipped. Re-encode it (e.g. `ffmpeg -i in.mp4 -c:v libx264 -c:a aac "
                         "out.mp4`) or drop it.")
