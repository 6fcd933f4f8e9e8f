"""The foundations under everything else: the one atomic writer and repository root (``files``) and the ranks of
a distributed run (``distributed``). Imports nothing of the project."""
