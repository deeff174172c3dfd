"""The per-clip loop every stage shares: progress bar, failure isolation, a summary line."""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

from features.errors import ClipError, MerError
from features.reliability.reports import FailureReport

log = logging.getLogger(__name__)
T = TypeVar("T")


# Seconds between resume points: a killed stage loses at most this much finished work.
CHECKPOINT_S = float(os.environ.get("MER_CHECKPOINT_S", "20"))


def check_not_all_failed(desc: str, seen: int, done: int, reused: int,
                         failures: FailureReport) -> None:
    """Fail the stage when it produced nothing at all: every clip it tried failed and no clip
    came from the cache. One permanently bad new clip next to cached ones is a bad clip, not a
    configuration problem, and must not stop the run."""
    if seen and not done and not reused:
        first = failures.items[0] if failures.items else None
        raise MerError(f"{desc}: every one of {seen} clips failed; first: "
                       f"{first.clip_id if first else '?'}: {first.message if first else '?'}")


def for_each_clip(items: Iterable[tuple[str, T]], work: Callable[[str, T], None],
                  failures: FailureReport, desc: str, total: int | None = None,
                  checkpoint: Callable[[], None] | None = None, reused: int = 0) -> int:
    """Call ``work(clip_id, item)`` for every item; one bad clip is recorded, never fatal.

    A ClipError is an expected data problem (its reason is recorded). Any other exception is
    recorded as ``error`` with its type, and its traceback logged, so a bug shows up in the report
    instead of stopping a run of thousands. If every clip fails and none was `reused` from the
    cache, the stage fails: that is a configuration problem, not a bad clip. `checkpoint`
    (persist finished work) is called every CHECKPOINT_S seconds. Returns the number of clips done.
    """
    done = seen = 0
    start = last_checkpoint = time.perf_counter()
    for clip_id, item in tqdm(items, desc=desc, unit="clip", total=total):
        seen += 1
        try:
            work(clip_id, item)
            done += 1
        except ClipError as err:
            failures.add_error(err)
        except MerError:
            raise  # configuration / model errors concern every clip: stop with the message
        except Exception as err:  # noqa: BLE001 - isolate one clip's unexpected failure
            log.debug("clip %s failed:\n%s", clip_id, traceback.format_exc())
            failures.add(clip_id, "error", f"{type(err).__name__}: {err}")
        if checkpoint is not None and time.perf_counter() - last_checkpoint >= CHECKPOINT_S:
            checkpoint()
            last_checkpoint = time.perf_counter()
    elapsed = time.perf_counter() - start
    print(f"[{desc}] {done}/{seen} clips done, {seen - done} failed, "
          f"{elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f} clips/s)")
    check_not_all_failed(desc, seen, done, reused, failures)
    return done
