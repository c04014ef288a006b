"""The heap trimmer: when it trims, how often, and that stopping cancels a pending trim."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from qdash_mp.collector import heap
from qdash_mp.collector.heap import BIG, HeapTrimmer


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_malloc_trim_is_found_on_linux() -> None:
    assert heap.malloc_trim() is True


FRAGMENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from qdash_mp.collector.heap import malloc_trim

    def rss_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) >> 10

    big = bytearray(8 << 20)  # freed, it raises glibc's mmap threshold to 8 MiB
    big[:] = b"x" * len(big)
    del big
    bufs, keep = [], []
    for _ in range(64):  # 64 MiB of 1 MiB buffers, each with small objects above it
        buf = bytearray(1 << 20)
        buf[:] = b"y" * len(buf)
        bufs.append(buf)
        keep.append([object() for _ in range(50)])
    del bufs
    freed = rss_mib()
    if sys.argv[1] == "trim":
        malloc_trim()
    print(freed, rss_mib())
""")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
@pytest.mark.parametrize("mode", ["keep", "trim"])
def test_freed_buffers_stay_resident_until_trimmed(mode: str) -> None:
    """Why heap.py exists, shown in a fresh process: 64 MiB freed stay resident without it."""
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT, mode],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    freed, after = map(int, out.stdout.split())
    if mode == "keep":
        assert after > freed - 8  # glibc keeps the freed heap blocks resident
    else:
        assert after < freed - 48  # the trim gave (most of) the 64 MiB back


async def until_trimmed(t: HeapTrimmer) -> None:
    for _ in range(100):  # bounded: 5 s
        if t.trims:
            return
        await asyncio.sleep(0.05)


async def test_trims_once_enough_big_frames_were_released() -> None:
    t = HeapTrimmer(trim_after=2 * BIG, min_interval=0.0)
    t.released_bytes(BIG)
    await asyncio.sleep(0.1)
    assert (t.trims, t.released) == (0, BIG)
    t.released_bytes(BIG)
    await until_trimmed(t)
    assert (t.trims, t.released) == (1, 0)


async def test_small_partial_frames_are_not_counted() -> None:
    """A busy stream leaves a small partial frame at every read boundary: no trims for it."""
    t = HeapTrimmer(trim_after=BIG, min_interval=0.0)
    for _ in range(10_000):
        t.released_bytes(BIG - 1)
    await asyncio.sleep(0.1)
    assert (t.trims, t.released) == (0, 0)


async def test_a_stream_of_releases_trims_at_most_once_per_interval() -> None:
    t = HeapTrimmer(trim_after=BIG, min_interval=60.0)
    t.released_bytes(BIG)
    await until_trimmed(t)
    assert t.trims == 1
    for _ in range(50):
        t.released_bytes(BIG)
    await asyncio.sleep(0.2)
    assert (t.trims, t.released) == (1, 50 * BIG)  # the next one waits for the interval
    t.close()


async def test_close_cancels_a_pending_trim() -> None:
    t = HeapTrimmer(trim_after=1, min_interval=0.0)
    t.released_bytes(BIG)
    t.close()
    await asyncio.sleep(0.2)
    assert t.trims == 0
