"""Benchmarks, each against PyTorch in the same run."""
