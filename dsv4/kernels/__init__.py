"""dsv4.kernels: hand-written kernels behind dsv4.ops' backend registry (docs/design.md §1).

One sub-package per tool: `triton/` (the sm_90 grouped GEMM). Importing this package imports no
kernel tool; each kernel module imports its own (Triton, CuTeDSL) when a backend first needs it.
"""
