"""Host memory kept by kxkernels between calls: the output pool (csrc/common/output.h).

Large outputs that are zero but for a few entries per row (the sparse softmax probabilities and
the sparse softmax cross-entropy gradient, 4 MiB and up) come from a pool of mappings whose pages
are already resident, like the CUDA caching allocator does for device memory: re-zeroing a
resident buffer runs at memory bandwidth while a fresh one pays a page fault every 4 KiB. Big
dense outputs that the kernel writes whole (causal / non-causal linear attention's output and
gradients) come from the same pool without the re-zeroing: glibc maps every block past its 32 MiB
threshold afresh, so a training step would otherwise fault in each output again.

- Size classes: a request is rounded up to one of 4 classes per power of two (at most 25% more),
  and a cached mapping up to twice that class serves it as a view, so the many shapes of NLP
  batches share a few mappings.
- A cap bounds the bytes the pool keeps (freed mappings; outputs still alive are the caller's):
  the least recently freed mappings are unmapped first (LRU). The default cap is 1/16 of physical
  memory clamped to [256 MiB, 4 GiB]; the environment variable ``KX_ZERO_POOL_MAX_BYTES`` (read at
  the first pooled allocation) overrides it, ``0`` turns the pool off; :func:`set_cap_bytes`
  changes it at run time.

torch's memory accounting cannot see these mappings; these functions report them.
"""
from kxkernels._extension import _C


def cached_bytes() -> int:
    """Bytes the pool holds now (freed outputs kept for reuse), at most :func:`cap_bytes`."""
    return int(_C.cached_bytes())


def cap_bytes() -> int:
    """The most bytes the pool keeps."""
    return int(_C.pool_stats()["cap_bytes"])


def set_cap_bytes(nbytes: int) -> None:
    """Set the pool's cap (bytes, >= 0; 0 keeps nothing), unmapping least recently freed mappings
    down to it. Raises TypeError / ValueError for a non-int or negative value."""
    from kxkernels._checks import check_int_arg

    check_int_arg(nbytes, "nbytes")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _C.set_pool_cap(int(nbytes))


def stats() -> dict:
    """``cached_bytes``, ``cap_bytes``, ``live_bytes`` (pooled outputs alive now, as mapped),
    ``cached_mappings``, and the counters ``hits`` (requests served by a cached mapping),
    ``misses`` (fresh mappings) and ``evictions`` (mappings unmapped to stay under the cap)."""
    return {k: int(v) for k, v in _C.pool_stats().items()}


def reset_stats() -> None:
    """Zero the ``hits``, ``misses`` and ``evictions`` counters."""
    _C.reset_pool_counters()


def empty_cache() -> None:
    """Return every mapping the pool holds to the OS (outputs still alive are untouched)."""
    _C.empty_cache()
