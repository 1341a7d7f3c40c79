"""Benchmarks that print ratios against PyTorch measured in the same run."""

from __future__ import annotations


def table_header(columns: list[str]) -> str:
    """The first two lines of a markdown table with these column names."""
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
