"""Parallelism techniques, one file each, applied by `apply_parallelism` in a fixed order."""
