"""Pieces shared by the Triton kernels of every op (imported only where Triton is installed)."""
