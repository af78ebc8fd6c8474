"""The output pool (csrc/common/output.h, kxkernels.memory): size classes, LRU eviction under a
cap, the default cap, KX_ZERO_POOL_MAX_BYTES, counters, and that reused buffers come back zeroed.

Issue 6, item 6: before, the pool reused a mapping only at the exact same size and never evicted,
so 60 shapes (N = 256..492, V = 30,522) left about 2 GiB of mappings that torch cannot see."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kxkernels as kx
import kxkernels.memory as memory

REPO = Path(__file__).resolve().parents[1]
V_MINILM = 30522
SHAPES_N = list(range(256, 493, 4))   # 60 shapes, N = 256..492


@pytest.fixture
def pool():
    """A clean pool with the default cap, restored afterwards."""
    cap = memory.cap_bytes()
    memory.empty_cache()
    memory.reset_stats()
    yield memory
    memory.set_cap_bytes(cap)
    memory.empty_cache()


def _class_bytes(n):
    p = 1 << (n.bit_length() - 1)
    step = max(p // 4, 4096)
    return -(-n // step) * step


def test_sixty_shapes_stay_under_default_cap_and_reuse(pool):
    assert len(SHAPES_N) == 60
    x = torch.randn(SHAPES_N[-1], V_MINILM)
    cap = pool.cap_bytes()
    for i, n in enumerate(SHAPES_N):
        p = kx.sparse_softmax(x[:n], 10)
        if i % 10 == 0:
            assert int((p != 0).sum()) == n * 10
        del p
        assert pool.cached_bytes() <= cap
    st = pool.stats()
    assert st["hits"] > 0, st
    # the whole sweep needs the few size classes between 31 and 60 MB (32..64 MiB), not 60 mappings
    assert st["misses"] <= 8 and st["cached_mappings"] <= 8, st
    assert st["cached_bytes"] <= 8 * _class_bytes(SHAPES_N[-1] * V_MINILM * 4), st


def test_lru_eviction_under_a_small_cap(pool):
    """Shapes in random order, two pooled outputs alive at a time (probs and gradient), a cap of
    about three mappings: cached bytes never pass the cap, mappings are evicted and still reused."""
    v = 8000                                  # outputs of 8..16 MB: classes 8, 10, 12, 14, 16 MiB
    cap = 40 * 2**20
    pool.set_cap_bytes(cap)
    assert pool.cap_bytes() == cap
    x = torch.randn(SHAPES_N[-1], v)
    order = SHAPES_N[::2]
    random.Random(0).shuffle(order)
    for n in order:
        xs = x[:n].clone().requires_grad_()
        p = kx.sparse_softmax(xs, 5)
        p.backward(p)
        assert int((xs.grad != 0).sum()) <= n * 5
        del p, xs
        assert pool.cached_bytes() <= cap, pool.stats()
    st = pool.stats()
    assert st["hits"] > 0 and st["evictions"] > 0, st
    assert st["live_bytes"] == 0, st


def test_lru_evicts_the_least_recently_freed(pool):
    cap = 48 * 2**20
    pool.set_cap_bytes(cap)
    # size classes 5, 14 and 20 MiB (4 per power of two): no one serves another as a view
    a, b, c = (torch.randn(n, 1000) for n in (1100, 3300, 4500))
    pa, pb, pc = (kx.sparse_softmax(t, 3) for t in (a, b, c))
    del pa                      # freed first: the least recently freed
    del pb
    del pc
    assert pool.stats()["cached_mappings"] == 3 and pool.cached_bytes() == (5 + 14 + 20) * 2**20
    big = kx.sparse_softmax(torch.randn(6000, 1000), 3)   # 24 MiB class: a miss
    del big                     # 39 + 24 MiB > 48: the 5 and then the 14 MiB mappings go
    st = pool.stats()
    assert st["cached_bytes"] == (20 + 24) * 2**20 and st["evictions"] == 2, st
    misses = st["misses"]
    p = kx.sparse_softmax(a, 3)                           # its class was evicted: a miss
    assert pool.stats()["misses"] == misses + 1, pool.stats()
    del p
    p = kx.sparse_softmax(c, 3)                           # still cached: a hit
    assert pool.stats()["misses"] == misses + 1, pool.stats()
    del p


def test_bigger_mapping_served_as_zeroed_view(pool):
    x = torch.randn(2048, 1000, requires_grad=True)   # 8.2 MB
    t = torch.randint(1000, (2048,))
    kx.sparse_softmax_cross_entropy(x, t, 5).backward()
    x.grad.fill_(7.0)                                  # dirty the whole mapping, then free it
    x.grad = None
    hits = pool.stats()["hits"]
    y = torch.randn(1500, 1000, requires_grad=True)    # 6 MB: served by the 8 MiB mapping as a view
    ty = torch.randint(1000, (1500,))
    kx.sparse_softmax_cross_entropy(y, ty, 5).backward()
    assert pool.stats()["hits"] == hits + 1
    ref = torch.zeros_like(y)
    ref_y = y.detach().clone().requires_grad_()
    from kxkernels.ops.sparse_softmax import reference
    reference.sparse_softmax_cross_entropy(ref_y, ty, 5).backward()
    torch.testing.assert_close(y.grad, ref_y.grad)
    assert int((y.grad != 0).sum()) <= 1500 * 6 and not bool((y.grad == 7.0).any())
    del ref


@pytest.mark.skipif("KX_ZERO_POOL_MAX_BYTES" in os.environ, reason="KX_ZERO_POOL_MAX_BYTES overrides the default")
def test_default_cap_is_sized_to_the_machine():
    # the cap of this process as the pool was first built (the fixture restores it after each test)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory.cap_bytes() == min(4 << 30, max(256 << 20, ram // 16))


def test_env_variable_overrides_the_cap():
    code = ("import torch, kxkernels as kx, kxkernels.memory as m\n"
            "print(m.cap_bytes())\n"
            "p = kx.sparse_softmax(torch.randn(2048, 1000), 3); del p\n"
            "print(m.cached_bytes(), m.stats()['misses'])\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KX_ZERO_POOL_MAX_BYTES": "12345678"},
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert int(lines[0]) == 12345678
    assert lines[1].split() == [str(_class_bytes(2048 * 1000 * 4)), "1"]


def test_cap_zero_keeps_nothing(pool):
    pool.set_cap_bytes(0)
    p = kx.sparse_softmax(torch.randn(2048, 1000), 3)
    del p
    assert pool.cached_bytes() == 0 and pool.stats()["misses"] == 1


def test_set_cap_bad_values():
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        memory.set_cap_bytes(-1)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        memory.set_cap_bytes(1.5)
