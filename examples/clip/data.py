"""Image-text pairs from webdataset shards in the img2dataset layout, with a resumable position.

A shard is a tar (`00000.tar`) of samples that share a key: `KEY.jpg` (or png/webp) and
`KEY.txt`. Patterns use braces, `cc3m/{00000..00331}.tar`, and several patterns join with `::`.

The stream is deterministic: epoch `e` visits the shards in an order drawn from `seed + e`, rank
`r` of `W` reads every W-th of them, and a seeded buffer shuffles samples across shards. So the
number of raw samples a rank has consumed (`position`) is the whole data state of a run, and a
resumed run skips that many samples without decoding them, then sees exactly what the
uninterrupted run saw. Samples that fail to decode are skipped and counted, never fatal; a
damaged shard (cut short, or unreadable as a tar) is reported once by name, with what its
samples after the damage cost not knowable; a rank whose shards yield no decodable sample in a
whole epoch stops with an error instead of reading them forever.
"""

from __future__ import annotations

import collections
import io
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str | list[str]) -> list[str]:
    """Expand brace patterns (`a/{0000..0009}.tar`, `::`-joined) and check every shard exists.

    Raises:
        FileNotFoundError: naming the missing shards (local paths only; URLs are not checked).
    """
    urls = [u for p in ([pattern] if isinstance(pattern, str) else pattern) for u in expand_urls(p)]
    if not urls:
        raise FileNotFoundError(f"no shards in {pattern!r}")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of {pattern!r} are missing: "
            f"{', '.join(missing[:5])}{more}"
        )
    return urls


@dataclass
class Counts:
    """What the stream met: samples read, those skipped (bad image, no caption), and the damaged
    shards (url -> what is wrong), each named once however many epochs read it."""

    read: int = 0
    corrupt: int = 0
    errors: list[str] = field(default_factory=list)
    bad_shards: dict[str, str] = field(default_factory=dict)

    def note(self, what: str) -> None:
        self.corrupt += 1
        if len(self.errors) < 20:
            self.errors.append(what)

    def shard(self, url: str, why: str) -> None:
        self.bad_shards.setdefault(url, why)


def truncated(url: str) -> str | None:
    """Why a local tar is cut short, or None: a whole tar is a multiple of 512 bytes and ends
    with two zero blocks; a cut at a member boundary loses that ending, a cut inside a member
    the block size too. (URLs, pipes and compressed tars are not checked.)"""
    if "://" in url or url.startswith("pipe:") or not url.endswith(".tar") or not os.path.isfile(url):
        return None  # remote, piped or compressed shards are not checked
    size = os.path.getsize(url)
    with open(url, "rb") as f:
        if f.read(2) == b"\x1f\x8b":  # gzip under a .tar name: webdataset reads it; not checked
            return None
        if size % 512:
            return f"cut short inside a member ({size} bytes, not a multiple of 512)"
        f.seek(max(0, size - 1024))
        if size < 1024 or f.read(1024).strip(b"\0"):
            return "cut short at a member boundary (no end-of-archive blocks)"
    return None


class ShardStream:
    """Raw samples (dicts of bytes) of one rank, over epochs, from a given position on."""

    def __init__(self, urls: list[str], *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000, epochs: int | None = None) -> None:
        if len(urls) < world:
            raise ValueError(f"{len(urls)} shards cannot feed {world} ranks: need at least one each")
        self.urls, self.seed, self.rank, self.world = urls, seed, rank, world
        self.shuffle_buffer, self.epochs = shuffle_buffer, epochs
        self.counts = Counts()
        self.epoch = 0  # the epoch being read

    def _handler(self, exn: Exception) -> bool:
        """A tar-level error (the shard, not one sample): named once; reading goes on."""
        text = " ".join(map(str, getattr(exn, "args", ())))  # webdataset adds the url or file
        url = next((u for u in self.urls if u in text), "an unnamed shard")
        self.counts.shard(url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def _epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.urls), generator=g).tolist()
        mine = [self.urls[i] for i in order][self.rank :: self.world]
        for url in mine:
            why = truncated(url)
            if why:
                self.counts.shard(url, why)
        samples = tarfile_samples([{"url": u} for u in mine], handler=self._handler)
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        gs = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 4099 + self.rank)
        buf: list[dict[str, Any]] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                j = int(torch.randint(len(buf), (), generator=gs))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        while buf:
            j = int(torch.randint(len(buf), (), generator=gs))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch = 0
        while self.epochs is None or self.epoch < self.epochs:
            empty = True
            for s in self._epoch(self.epoch):
                empty = False
                yield s
            if empty:
                raise RuntimeError(f"no readable samples in rank {self.rank}'s shards: {self.urls}")
            self.epoch += 1


def decode(sample: dict[str, Any]) -> tuple[Image.Image, str]:
    """The image and caption of a raw sample; raises ValueError for anything unusable."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks an image or a caption")
    with Image.open(io.BytesIO(sample[ext])) as im:
        image = im.convert("RGB")
    caption = sample["txt"].decode("utf-8").strip()
    if not caption:
        raise ValueError(f"sample {sample.get('__key__')!r} has an empty caption")
    return image, caption


_WORKER_TRANSFORM: Callable | None = None


def _start_worker(transform: Callable) -> None:
    global _WORKER_TRANSFORM
    _WORKER_TRANSFORM = transform
    torch.set_num_threads(1)  # many processes: one thread each


def decode_transform(raw: dict[str, Any], transform: Callable, seed: int) -> tuple[bool, Any, str]:
    """(True, transformed image, caption), or (False, None, why) for an unusable sample. The
    transform's randomness (crops, flips) is drawn from `seed` and the caller's RNG is left as
    it was: a sample looks the same in any process and after a resume."""
    try:
        image, caption = decode(raw)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return True, transform(image), caption
    except Exception as exn:  # a bad sample costs one sample, not the run
        return False, None, f"{raw.get('__url__')}:{raw.get('__key__')}: {exn}"


def _decode_chunk(raws: list[tuple[dict[str, Any], int]]) -> list[tuple[bool, Any, str]]:
    """A worker's results, images as numpy arrays: pickled by value. (Tensors would travel as
    shared-memory file descriptors, one each: at a batch of 16384 with 16 workers the parent
    ran out of them, "received 0 items of ancdata".)"""
    out = []
    for raw, seed in raws:
        ok, image, caption = decode_transform(raw, _WORKER_TRANSFORM, seed)
        out.append((ok, image.numpy() if isinstance(image, torch.Tensor) else image, caption))
    return out


def _from_worker(result: tuple[bool, Any, str]) -> tuple[bool, Any, str]:
    ok, image, caption = result
    return ok, torch.from_numpy(image) if isinstance(image, np.ndarray) else image, caption


class PairLoader:
    """Batches `(images [b, 3, H, W], tokens [b, L])` of one rank; `position` resumes it.

    `position` counts raw samples taken from the stream, the skipped ones included, so a loader
    built with `start=loader.position` continues exactly where this one stopped.

    Each sample's random transform is seeded by its index in the stream, so the batches depend
    on the position alone. With `workers > 0`, decoding and the transform run in that many
    processes while this one reads the shards in order and keeps a bounded queue of samples in
    flight (`prefetch` batches): the batches are the same as with `workers=0`, and samples
    still in flight are not counted in `position` (a resumed loader reads them again).
    """

    CHUNK = 8
    """Raw samples per worker task."""

    def __init__(self, pattern: str | list[str], batch_size: int, transform: Callable,
                 tokenizer: Callable, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000, start: int = 0, epochs: int | None = None,
                 workers: int = 0, prefetch: int = 2) -> None:
        self.urls = expand_shards(pattern)
        self.stream = ShardStream(self.urls, seed=seed, rank=rank, world=world,
                                  shuffle_buffer=shuffle_buffer, epochs=epochs)
        self.batch_size, self.transform, self.tokenizer = batch_size, transform, tokenizer
        self.position = start
        self._it = iter(self.stream)
        for _ in range(start):  # skip without decoding
            next(self._it)
        self.stream.counts.read = start
        self._good_epoch = self.stream.epoch  # the last epoch that gave a decodable sample
        self._pool = None
        self._index = start  # the stream index of the next raw sample read (its transform seed)
        self._seed_base = (seed * 1_000_003 + rank) * 1_000_000_007
        self._pending: collections.deque = collections.deque()  # (epochs, async result) chunks
        self._ready: collections.deque = collections.deque()  # (epoch, result) of one chunk
        self._ended = False
        self._depth = max(1, prefetch * batch_size // self.CHUNK)
        if workers > 0:
            ctx = multiprocessing.get_context("fork")
            self._pool = ctx.Pool(workers, initializer=_start_worker, initargs=(transform,))

    def close(self) -> None:
        """Stop the worker processes (a no-op without workers)."""
        if getattr(self, "_pool", None) is not None:
            self._pool.terminate()
            self._pool = None

    def __del__(self) -> None:
        self.close()

    def _read(self) -> tuple[dict[str, Any], int]:
        """The next raw sample and its transform seed."""
        raw = next(self._it)
        self._index += 1
        return raw, (self._seed_base + self._index) % (1 << 63)

    def _raw_chunk(self) -> list[tuple[dict[str, Any], int]]:
        chunk = []
        for _ in range(self.CHUNK):
            try:
                chunk.append(self._read())
            except StopIteration:
                self._ended = True
                break
        return chunk

    def _next_result(self) -> tuple[int, tuple[bool, Any, str]]:
        """The next raw sample's (epoch it was read in, decode result), in stream order."""
        if self._pool is None:
            raw, seed = self._read()  # StopIteration ends a finite stream
            return self.stream.epoch, decode_transform(raw, self.transform, seed)
        while not self._ready:
            while len(self._pending) < self._depth and not self._ended:
                epoch, chunk = self.stream.epoch, self._raw_chunk()
                if chunk:
                    self._pending.append((epoch, self._pool.apply_async(_decode_chunk, (chunk,))))
            if not self._pending:
                raise StopIteration
            epoch, result = self._pending.popleft()
            self._ready.extend((epoch, _from_worker(r)) for r in result.get())
        return self._ready.popleft()

    @property
    def counts(self) -> Counts:
        return self.stream.counts

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = [], []
        while len(images) < self.batch_size:
            epoch, (ok, image, caption) = self._next_result()
            self.position += 1
            self.counts.read += 1
            if not ok:  # a bad sample costs one sample, not the run
                self.counts.note(caption)
                if epoch > self._good_epoch + 1:  # a whole epoch, nothing usable
                    raise RuntimeError(
                        f"no sample of rank {self.stream.rank}'s shards decodes ({self.counts.corrupt} "
                        f"tried; first errors: {self.counts.errors[:3]})")
                continue
            self._good_epoch = epoch
            images.append(image)
            captions.append(caption)
        return torch.stack(images), self.tokenizer(captions)


def read_pairs(pattern: str | list[str]) -> Iterator[tuple[Image.Image, str]]:
    """Every decodable (image, caption) of a shard set once, in shard order (for evaluation)."""
    stream = ShardStream(expand_shards(pattern), shuffle_buffer=0, epochs=1)
    for raw in stream:
        try:
            yield decode(raw)
        except Exception as exn:
            stream.counts.note(str(exn))


__all__ = ["expand_shards", "PairLoader", "ShardStream", "read_pairs", "decode", "Counts"]
