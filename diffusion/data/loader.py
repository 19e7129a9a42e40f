"""``ShardLoader``: batches of a Parquet-shard dataset for one DDP rank, streamed shard by
shard, shuffled deterministically by (seed, epoch), resumable exactly.

The order of an epoch (the same on every rank, whatever the world size):
  1. the shards are permuted by a generator keyed (seed, epoch);
  2. the rows of each shard are permuted by a generator keyed (seed, epoch, shard), which
     also draws each row's horizontal-flip bit (used when ``flip=True``);
  3. the permuted shards, concatenated, form the epoch's stream of N examples.
Rank r takes the contiguous block [r * L, r * L + E) of that stream, where L = N //
world_size and E = L rounded down to a multiple of ``batch_size`` if ``drop_last`` (else E =
L). So each example goes to at most one rank, every rank yields the same number of batches
(DDP needs that), and the dropped examples — the last N mod world_size of the stream plus,
with ``drop_last``, each rank's last L mod batch_size — change from epoch to epoch because the
stream is reshuffled. A rank reads only the shards its block overlaps, one at a time.

State: {"epoch", "offset"}, offset = examples of the epoch this rank has yielded; it always
names the next batch (after an epoch's last batch it already reads (epoch + 1, 0)). All ranks
share it, so rank 0's copy can be checkpointed for everyone; it is valid for the same
dataset, world size, batch size, seed and ``drop_last``.

Prefetch (``prefetch=N``): a background thread reads, permutes and converts up to N batches
ahead (into pinned memory with ``pin_memory``, for asynchronous copies to a GPU). The
batches and their order are exactly those without prefetch, and the state still names the
next batch the caller will receive, not the next one the thread will read.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from diffusion.data.shards import ShardDataset, open_dataset, take_rows
from diffusion.images import to_model_range

__all__ = ["ShardLoader"]

log = logging.getLogger(__name__)

# Fixed-length generator keys: numpy's SeedSequence gives [a, b] and [a, b, 0] the same stream.
_SHARD_ORDER, _SHARD_ROWS = 0, 1

_Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # images [n, C, H, W], labels [n], flips [n]
_Batch = tuple[torch.Tensor, torch.Tensor]
_State = tuple[int, int]  # (epoch, offset) after a batch: the position of the next one
_END = object()  # the producer thread's last item


class ShardLoader:
    """Float32 images in [-1, 1] ([B, C, H, W]) and int64 labels ([B]) for one rank.

    Iterating yields the rest of the current epoch, then moves to the next; ``batches()``
    runs on across epochs forever. ``prefetch`` batches are prepared ahead in a background
    thread (0: none), into pinned memory when ``pin_memory`` (needs CUDA).
    """

    def __init__(
        self,
        uri: str | ShardDataset,
        split: str,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        flip: bool = False,
        drop_last: bool = True,
        endpoint_url: str | None = None,
        prefetch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = (
            uri if isinstance(uri, ShardDataset) else open_dataset(uri, endpoint_url=endpoint_url)
        )
        info = self.dataset.split(split)
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}; expected >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank/world_size: got {rank}/{world_size}; need 0 <= rank < world_size"
            )
        if seed < 0:
            raise ValueError(f"seed: got {seed}; expected a non-negative integer")
        if prefetch < 0:
            raise ValueError(f"prefetch: got {prefetch}; expected batches >= 0")
        per_rank = info.count // world_size
        self.examples_per_epoch = (per_rank // batch_size) * batch_size if drop_last else per_rank
        if self.examples_per_epoch == 0:
            raise ValueError(
                f"batch_size/world_size: {info.count} examples of split {split!r} give no "
                f"batch of {batch_size} on each of {world_size} ranks"
                + (" (drop_last=True)" if drop_last else "")
            )
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.flip, self.drop_last = flip, drop_last
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.shape = info.shape
        self._counts = [s.count for s in info.shards]
        self._start = rank * per_rank  # this rank's block in the epoch stream
        self._epoch, self._offset = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return -(-self.examples_per_epoch // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: {"epoch", "offset"}."""
        return {"epoch": self._epoch, "offset": self._offset}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a ``state_dict()``: the next batches are exactly those the saving
        loader would have yielded."""
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.examples_per_epoch:
            raise ValueError(
                f"state: epoch {epoch}, offset {offset}; need epoch >= 0 and "
                f"0 <= offset < {self.examples_per_epoch} (examples per epoch on this rank)"
            )
        self._epoch, self._offset = epoch, offset

    def _rng(self, epoch: int, kind: int, index: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, kind, index])

    def _segments(self, epoch: int, begin: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(shard, lo, hi): rows lo..hi of the permuted shard hold this rank's examples
        ``begin``..``end`` (positions within its block) of ``epoch``, in order."""
        order = self._rng(epoch, _SHARD_ORDER).permutation(len(self._counts))
        lo_rank, hi_rank = self._start + begin, self._start + end
        pos = 0
        for shard in order:
            count = self._counts[shard]
            lo, hi = max(lo_rank - pos, 0), min(hi_rank - pos, count)
            if lo < hi:
                yield int(shard), lo, hi
            pos += count
            if pos >= hi_rank:
                break

    def _chunks(self, epoch: int, begin: int) -> Iterator[_Chunk]:
        """(images uint8 [n, C, H, W], labels [n], flip bits [n]) from ``begin`` to the end of
        the epoch's block, one shard piece at a time."""
        for shard, lo, hi in self._segments(epoch, begin, self.examples_per_epoch):
            rng = self._rng(epoch, _SHARD_ROWS, shard)
            perm = rng.permutation(self._counts[shard])
            flips = rng.random(self._counts[shard]) < 0.5
            images, labels = self.dataset.read_shard(self.split, shard)
            rows = perm[lo:hi]
            yield images[rows], labels[rows], flips[lo:hi]

    def _to_batch(self, images: np.ndarray, labels: np.ndarray, flips: np.ndarray) -> _Batch:
        x = torch.from_numpy(images)  # [B, C, H, W] uint8
        if self.flip and flips.any():
            mask = torch.from_numpy(flips)
            x[mask] = x[mask].flip(-1)
        x, y = to_model_range(x), torch.from_numpy(labels)
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _epoch_batches(self, epoch: int, offset: int) -> Iterator[tuple[_Batch, _State]]:
        """The batches of ``epoch`` from ``offset`` on, each with the state after it; reads
        no attribute that iteration changes, so it can run ahead in a thread."""
        end = self.examples_per_epoch
        pending: list[_Chunk] = []  # views into shard pieces, oldest first
        pending_rows = 0
        for chunk in self._chunks(epoch, offset):
            pending.append(chunk)
            pending_rows += len(chunk[0])
            while pending_rows >= self.batch_size or (
                pending_rows and offset + pending_rows == end
            ):
                n = min(self.batch_size, pending_rows)
                batch = take_rows(pending, n)
                pending_rows -= n
                offset += n
                after = (epoch + 1, 0) if offset == end else (epoch, offset)
                yield self._to_batch(*batch), after

    def _stream(self, epochs: int | None) -> Iterator[tuple[_Batch, _State]]:
        """From the current state: the rest of this epoch, then ``epochs - 1`` more (None:
        without end)."""
        epoch, offset = self._epoch, self._offset
        last = None if epochs is None else epoch + epochs - 1
        while last is None or epoch <= last:
            yield from self._epoch_batches(epoch, offset)
            epoch, offset = epoch + 1, 0

    def _iterate(self, epochs: int | None) -> Iterator[_Batch]:
        source = self._stream(epochs)
        if self.prefetch:
            source = _prefetched(source, self.prefetch)
        try:
            for batch, (epoch, offset) in source:
                # Advance the state before handing the batch out: it names the next batch.
                self._epoch, self._offset = epoch, offset
                yield batch
        finally:
            source.close()  # stops a prefetch thread

    def __iter__(self) -> Iterator[_Batch]:
        return self._iterate(epochs=1)

    def batches(self) -> Iterator[_Batch]:
        """Batches across epochs, without end (for step-counted training loops)."""
        return self._iterate(epochs=None)


def _prefetched(source: Iterator, depth: int) -> Iterator:
    """The items of ``source``, produced up to ``depth`` ahead by a daemon thread; an error
    in the thread is raised here; closing this generator stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=produce, name="ShardLoader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
