"""FreshTensors: fresh tensors, faulted in on a helper thread, handed out in order."""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading

import pytest
import torch

from resumer.formats.native import prefault
from resumer.formats.native.prefault import MIN_BYTES, PAGE, FreshTensors

BIG = (MIN_BYTES // 4 + 1,)  # float32 elements: just over the threshold, so the helper thread runs
FRESH = (10 << 20,)  # 40 MiB of float32
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and MADV_POPULATE_WRITE are Linux's")


def untouched(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized tensor on new pages no one has touched: an anonymous mapping of its own (torch.empty may
    hand back memory the allocator recycled, already in memory)."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return torch.frombuffer(mmap.mmap(-1, n), dtype=torch.uint8).view(dtype).view(shape)


def resident(t: torch.Tensor) -> float:
    """The fraction of the whole pages inside ``t``'s bytes that are in memory (Linux ``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    start = t.data_ptr()
    lo, hi = -(-start // PAGE) * PAGE, (start + t.numel() * t.element_size()) // PAGE * PAGE
    vec = ctypes.create_string_buffer((hi - lo) // PAGE)
    assert libc.mincore(lo, hi - lo, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw) / len(vec.raw)


def test_hands_out_each_spec_in_order_with_its_shape_and_dtype():
    specs = [(BIG, torch.float32), ((3, 5), torch.bfloat16), ((), torch.int64), ((2, 0), torch.float16),
             ((MIN_BYTES,), torch.uint8)]
    with FreshTensors(specs) as fresh:
        got = [fresh.get(i) for i in range(len(specs))]
    assert [(tuple(t.shape), t.dtype) for t in got] == [(s, d) for s, d in specs]
    assert len({t.data_ptr() for t in got if t.numel()}) == 4  # distinct memory: nothing aliased
    for t in got:
        t.fill_(1)  # writable, and independent
    assert all(bool((t == 1).all()) for t in got)


@linux
def test_the_helper_thread_faults_in_big_tensors_ahead_of_the_reader(monkeypatch):
    monkeypatch.setattr(prefault.torch, "empty", lambda shape, dtype: untouched(shape, dtype))
    with FreshTensors([(FRESH, torch.float32)] * 3) as fresh:
        fresh._ready[2].wait(timeout=60)  # the helper got to the last one before anyone asked
        assert fresh._tensors[2] is not None
        assert resident(fresh._tensors[2]) == 1.0  # every page faulted in, not just reserved
        assert [tuple(fresh.get(i).shape) for i in range(3)] == [FRESH] * 3


@linux
def test_populate_faults_in_every_page_and_without_it_zero_does(monkeypatch):
    t = untouched(FRESH)
    assert resident(t) < 0.5  # new pages: reserved, not yet in memory
    assert prefault.populate(t)  # this kernel (5.14 or later) faults them in itself
    assert resident(t) == 1.0
    monkeypatch.setattr(prefault, "_populate_works", False)  # an older kernel
    u = untouched(FRESH)
    assert resident(u) < 0.5
    assert not prefault.populate(u)
    prefault.touch(u)
    assert resident(u) == 1.0 and bool((u == 0).all())


def test_small_tensors_need_no_thread():
    before = {t.name for t in threading.enumerate()}
    fresh = FreshTensors([((4,), torch.float32)] * 3)
    assert "resumer-prefault" not in {t.name for t in threading.enumerate()} - before
    assert [tuple(fresh.get(i).shape) for i in range(3)] == [(4,)] * 3
    fresh.close()


def test_out_of_order_is_refused():
    with FreshTensors([(BIG, torch.float32)] * 2) as fresh, pytest.raises(ValueError, match="out of order"):
        fresh.get(1)


def test_a_failure_on_the_helper_reaches_the_reader():
    bad = [(BIG, torch.float32), ((-1,), torch.float32)]  # torch.empty refuses a negative size
    with FreshTensors(bad) as fresh:
        assert tuple(fresh.get(0).shape) == BIG
        with pytest.raises(RuntimeError, match="negative"):
            fresh.get(1)


def test_close_stops_the_helper_and_drops_what_nobody_took():
    fresh = FreshTensors([(BIG, torch.float32)] * 50)
    fresh.get(0)
    fresh.close()
    assert fresh._thread is not None and not fresh._thread.is_alive()
    assert all(t is None for t in fresh._tensors)
