"""The extraction engine: loading, device compute and store writes run at the same time.

    loader workers (processes)  ->  batcher thread      ->  main thread       ->  writer thread
    read a clip + prepare()         length buckets,         forward() on the      wait for the copy,
    (decode, normalise, tokenise)   collate() + pin         device, OOM halving   assemble, sink()

Each arrow is a bounded queue, so a slow stage holds the others back instead of filling memory.
The compute thread never waits for a device -> host copy: `HostBatch` carries a CUDA event and
only the writer thread waits on it (once per batch, never per clip). The writer thread is the
only caller of `sink`, so the store (`StoreUpdate.add/checkpoint`) is used from one thread.

Bucketing: prepared segments are gathered in a window of WINDOW_BATCHES batches, sorted by
length and cut into batches (`Encoder.segment_batches`: exact-length buckets for models that
cannot mask padding). An out-of-memory error halves the batch and retries it, and later batches
stay at the reduced size; a segment that fails alone fails its clip, never the run.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from features.encoders.base import EncodedClip, Encoder, Partial, Segment
from features.errors import ClipError, MerError

WINDOW_BATCHES = 16  # batches sorted together: larger wastes less padding, delays the first batch
QUEUE_BATCHES = 4  # collated batches waiting for the device / results waiting for the writer
_END = object()


def oom_errors() -> tuple[type[BaseException], ...]:
    # torch.OutOfMemoryError (torch >= 2.5) is what torch.cuda.OutOfMemoryError aliases.
    return tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                  torch.cuda.OutOfMemoryError})


@dataclass
class Summary:
    """What a run did; `line()` is the summary printed at the end."""

    desc: str
    clips: int = 0
    done: int = 0
    failed: int = 0
    amount: float = 0.0  # audio seconds / images / tokens encoded
    unit: str = "items"
    batches: int = 0
    oom_retries: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"[{self.desc}] {self.done}/{self.clips} clips done, {self.failed} failed, "
                f"{self.seconds:.1f} s ({self.done / s:.1f} clips/s, {self.amount / s:.1f} "
                f"{self.unit}/s), {self.batches} batches, {self.oom_retries} OOM retries")


def default_workers(encoder: Encoder) -> int:
    """Loader processes: on a GPU, keep the device fed; on CPU the model needs the cores."""
    env = os.environ.get("MER_EMBED_WORKERS")
    if env is not None:
        return int(env)
    return min(8, max((os.cpu_count() or 1) - 1, 1)) if encoder.device.type == "cuda" else 0


class _Prepared(torch.utils.data.Dataset):
    """Clip id -> (id, segments or ClipError); runs inside loader worker processes."""

    def __init__(self, ids: list[str], load: Callable[[str], Any], encoder: Encoder):
        self.ids, self.load, self.encoder = ids, load, encoder

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, Any]:
        """(id, segments) or (id, (reason, message)): exceptions with custom __init__ (ClipError)
        do not cross the process boundary, plain tuples do."""
        cid = self.ids[i]
        try:
            return cid, self.encoder.prepare(self.load(cid))
        except ClipError as err:
            return cid, (err.reason, err.detail)
        except MerError:
            raise
        except Exception as err:  # noqa: BLE001 - one unreadable clip must not stop the run
            return cid, ("prepare_failed", f"{type(err).__name__}: {err}")


def _identity(x: Any) -> Any:
    return x


@dataclass
class _State:
    limit: int  # current batch size; halved on out-of-memory
    parts: dict = field(default_factory=dict)  # clip id -> Partial list
    failed: set = field(default_factory=set)
    error: BaseException | None = None


class Engine:
    """Run `encoder` over clips: `Engine(enc).run(ids, load, sink, fail)`.

    `load(clip_id)` returns the raw item (picklable, as it runs in worker processes);
    `sink(clip_id, EncodedClip)` is called from the writer thread for every finished clip,
    `fail(ClipError)` for every failed one, `tick()` (e.g. a checkpoint) every `tick_s` seconds.
    """

    def __init__(self, encoder: Encoder, workers: int | None = None, desc: str = "embed"):
        self.encoder, self.desc = encoder, desc
        self.workers = default_workers(encoder) if workers is None else workers
        self.state = _State(limit=encoder.cfg.batch_size)

    def run(self, ids: list[str], load: Callable[[str], Any],
            sink: Callable[[str, EncodedClip], None], fail: Callable[[ClipError], None],
            tick: Callable[[], None] | None = None, tick_s: float = 20.0) -> Summary:
        summary = Summary(self.desc, clips=len(ids), unit=self.encoder.unit)
        start = time.perf_counter()
        batches: queue.Queue = queue.Queue(QUEUE_BATCHES)
        results: queue.Queue = queue.Queue(QUEUE_BATCHES)
        bar = tqdm(total=len(ids), desc=self.desc, unit="clip", smoothing=0.1)
        feeder = threading.Thread(target=self._feed, args=(ids, load, batches, results), daemon=True)
        writer = threading.Thread(target=self._write, daemon=True,
                                  args=(results, sink, fail, tick, tick_s, summary, bar))
        feeder.start()
        writer.start()
        try:
            with torch.inference_mode():
                self._compute(batches, results, summary, writer)
        finally:
            _put(results, _END, writer)
            writer.join()
            bar.close()
        if self.state.error is not None:
            raise self.state.error
        summary.seconds = time.perf_counter() - start
        print(summary.line())
        return summary

    # -- batcher thread --------------------------------------------------------------------
    def _feed(self, ids, load, batches: queue.Queue, results: queue.Queue) -> None:
        try:
            window: list[Segment] = []
            for cid, prepared in self._loader(ids, load):
                if isinstance(prepared, tuple):
                    results.put(("failed", ClipError(cid, *prepared)))
                    continue
                for part, seg in enumerate(prepared):
                    seg.clip, seg.part, seg.parts = cid, part, len(prepared)
                window.extend(prepared)
                if len(window) >= WINDOW_BATCHES * self.state.limit:
                    self._emit(window, batches)
                    window = []
            self._emit(window, batches)
            batches.put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            batches.put(err)

    def _loader(self, ids, load):
        data = _Prepared(ids, load, self.encoder)
        if self.workers == 0:
            return (data[i] for i in range(len(data)))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked tokenizers would warn
        return torch.utils.data.DataLoader(data, batch_size=None, num_workers=self.workers,
                                           collate_fn=_identity, prefetch_factor=8,
                                           persistent_workers=False)

    def _emit(self, window: list[Segment], batches: queue.Queue) -> None:
        lengths = [s.length for s in window]
        for index in self.encoder.segment_batches(lengths, self.state.limit):
            segs = [window[i] for i in index]
            batches.put((segs, self.encoder.collate(segs)))

    # -- main thread: the device -----------------------------------------------------------
    def _compute(self, batches: queue.Queue, results: queue.Queue, summary: Summary, writer) -> None:
        while True:
            item = batches.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            segs, collated = item
            for part_segs, host in self._forward(segs, collated, summary):
                summary.batches += 1
                _put(results, ("batch", part_segs, host), writer)
            if self.state.error is not None:
                return

    def _forward(self, segs: list[Segment], collated: dict | None, summary: Summary) -> list:
        """[(segments, HostBatch | ClipError)]: halves the batch on out-of-memory."""
        if len(segs) > self.state.limit:
            collated = None  # an earlier OOM lowered the limit: split before trying
            halves = [segs[: self.state.limit], segs[self.state.limit:]]
            return [r for h in halves for r in self._forward(h, None, summary)]
        try:
            return [(segs, self.encoder.forward(collated or self.encoder.collate(segs)))]
        except oom_errors() as err:
            summary.oom_retries += 1
            _free_device_memory()
            if len(segs) == 1:
                return [(segs, ClipError(segs[0].clip, "out_of_memory", f"{err}"[:300]))]
            self.state.limit = max(1, len(segs) // 2)
            return self._forward(segs, None, summary)
        except MerError:
            raise
        except Exception as err:  # noqa: BLE001 - find the failing segment below
            if len(segs) == 1:
                return [(segs, ClipError(segs[0].clip, "encode_failed", f"{type(err).__name__}: {err}"))]
            return [r for s in segs for r in self._forward([s], None, summary)]

    # -- writer thread ---------------------------------------------------------------------
    def _write(self, results, sink, fail, tick, tick_s, summary: Summary, bar) -> None:
        last = time.perf_counter()
        while True:
            item = results.get()
            if item is _END:
                return
            if self.state.error is not None:
                continue  # drain so the compute thread never blocks
            try:
                self._handle(item, sink, fail, summary, bar)
                if tick is not None and time.perf_counter() - last >= tick_s:
                    tick()
                    last = time.perf_counter()
            except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
                self.state.error = err

    def _handle(self, item, sink, fail, summary: Summary, bar) -> None:
        if item[0] == "failed":
            self._fail(item[1], fail, summary, bar)
            return
        _, segs, host = item
        if isinstance(host, ClipError):
            self._fail(host, fail, summary, bar)
            return
        for seg, partial in zip(segs, host.wait()):
            self._collect(seg, partial, sink, summary, bar)

    def _collect(self, seg: Segment, partial: Partial, sink, summary: Summary, bar) -> None:
        if seg.clip in self.state.failed:
            return
        partial.part = seg.part
        parts = self.state.parts.setdefault(seg.clip, [])
        parts.append(partial)
        summary.amount += seg.amount
        if len(parts) == seg.parts:
            del self.state.parts[seg.clip]
            sink(seg.clip, self.encoder.assemble(parts))
            summary.done += 1
            bar.update(1)

    def _fail(self, err: ClipError, fail, summary: Summary, bar) -> None:
        if err.clip_id in self.state.failed:
            return
        self.state.failed.add(err.clip_id)
        self.state.parts.pop(err.clip_id, None)
        fail(err)
        summary.failed += 1
        bar.update(1)


def _put(q: queue.Queue, item: Any, consumer: threading.Thread) -> None:
    """Put without hanging forever if the consumer thread died."""
    while True:
        try:
            q.put(item, timeout=1.0)
            return
        except queue.Full:
            if not consumer.is_alive():
                return


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
