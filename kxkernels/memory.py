"""Host memory kept by kxkernels between calls.

Large outputs that are zero but for a few entries per row (the sparse softmax probabilities and
the sparse softmax cross-entropy gradient) come from a pool of mappings whose pages are already
resident, like the CUDA caching allocator does for device memory: re-zeroing a resident buffer
runs at memory bandwidth while a fresh one pays a page fault every 4 KiB. A freed output goes back
to the pool (at most ``KX_ZERO_POOL_MAX_BYTES``, default 2 GiB; ``0`` turns the pool off).
"""
from kxkernels._extension import _C


def cached_bytes() -> int:
    """Bytes the pool holds now (freed outputs kept for reuse)."""
    return int(_C.cached_bytes())


def empty_cache() -> None:
    """Return every mapping the pool holds to the OS (outputs still alive are untouched)."""
    _C.empty_cache()
