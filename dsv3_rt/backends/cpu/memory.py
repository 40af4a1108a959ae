"""Where the cpu backend keeps its weights: buffers on transparent huge pages (Linux), and the heap trimmed between
conversions.

With 4 KiB pages every 4 KiB of a weight stream costs a TLB miss (a page walk) and a restart of the hardware
prefetcher. A buffer of 2 MiB or more gets huge pages for its whole 2 MiB pages. A smaller one cannot get one of
its own, so small buffers are carved one after another from shared chunks that are aligned to 2 MiB and marked for
huge pages: the default model's 91 weight buffers are all under 0.75 MiB.
"""
from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_CHUNK = 16 << 20  # bytes of one chunk of small buffers: 8 huge pages
_ALIGN = 64  # each small buffer starts on a cache line, as torch's own allocations do


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`). Converting a weight frees its
    temporaries between long-lived weight buffers, and glibc keeps such holes: trimming after each weight took
    the bench preset's int8 load from a 1876 to a 1754 MiB peak (1638 MiB after it, against 1798)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only (musl has none)
        libc.malloc_trim(0)


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Mark t's whole 2 MiB pages for transparent huge pages, before they are first touched: advice only (an error,
    or THP off, leaves 4 KiB pages)."""
    libc = _libc()
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // HUGE_PAGE * HUGE_PAGE
    if libc is not None and end > start:
        libc.madvise(start, end - start, _MADV_HUGEPAGE)


class _SmallBuffers:
    """Buffers under a huge page each, carved in order from 2 MiB-aligned chunks on huge pages. Each buffer is a
    view of its chunk, so a chunk lives as long as one of its buffers does; space is never reused (weights live as
    long as their model). Resident waste: the unused end of each chunk's last huge page, under 2 MiB a chunk."""

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """nbytes (< HUGE_PAGE) uninitialised uint8, starting on a cache line."""
        with self._lock:
            if self._chunk is None or self._used + nbytes > _CHUNK:
                raw = torch.empty(_CHUNK + HUGE_PAGE, dtype=torch.uint8)  # untouched: only the aligned part is used
                start = -raw.data_ptr() % HUGE_PAGE
                self._chunk, self._used = raw[start:start + _CHUNK], 0
                _advise_huge_pages(self._chunk)
            out = self._chunk[self._used:self._used + nbytes]
            self._used += -(-nbytes // _ALIGN) * _ALIGN
            return out


_small = _SmallBuffers()


def weight_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor for weights that decoding streams, on huge pages where the OS gives them:
    the int8 kernel over 460 MB of weights ran at 22.4 GB/s on 4 KiB pages and 30.1 GB/s on huge pages here (medians
    of 6 interleaved runs); with its small buffers carved from shared huge pages, the default model's plain decoding
    ran 3-9 % faster (alternating invocations per host state, docs/performance-log.md)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if 0 < nbytes < HUGE_PAGE:
        return _small.take(nbytes).view(dtype).view(shape)
    t = torch.empty(shape, dtype=dtype)
    _advise_huge_pages(t)
    return t

