"""Reference-vs-kernel validation harness (docs/design.md §5).

cases (YAML) -> inputs -> run (reference, kernel through an adapter) -> compare (metrics,
verdicts) -> results (JSONL/Parquet) -> report. Reaches kernels only through the adapter
protocol (`harness.adapters`); the built-in adapters live in `harness.backends`, where the one
module that imports dsv4 (`harness.backends.dsv4`) uses only its public `dsv4.ops` and
`dsv4.layers`. Imports the oracle (`reference`) freely.
"""
