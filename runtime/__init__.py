"""The foundations under everything else: the one atomic writer and repository root (``files``), the ranks of a
distributed run (``distributed``), glibc's malloc set up for training (``allocator``) and the float32 precision of
CUDA kernels (``precision``). Imports nothing of the project."""
