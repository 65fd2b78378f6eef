"""Device kernels behind dsv4.ops (docs/design.md §1): `cutedsl/` (quantize, SwiGLU-requantize, any
arch) and `triton/` (the sm_90 grouped GEMM). Importing this package imports no kernel DSL and
touches no GPU; each subpackage says whether its DSL is importable through a cached probe (or
its backend's probe does), and dsv4.ops names the implementation that ran (never a silent
fallback)."""
