"""Reference-vs-kernel validation harness (docs/design.md §5).

cases (YAML) -> inputs -> run (reference, kernel through an adapter) -> compare (metrics,
verdicts) -> results (JSONL/Parquet) -> report. Reaches kernels only through `harness.adapters`;
imports the oracle (`reference`) freely and never `dsv4` internals.
"""
