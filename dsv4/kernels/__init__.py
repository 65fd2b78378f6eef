"""Device kernels behind dsv4.ops (docs/design.md §1): `cutedsl/` (quantize, SwiGLU-requantize, any
arch). Importing this package imports no kernel DSL and touches no GPU; each subpackage says
whether its DSL is importable through a cached probe, and dsv4.ops names the implementation
that ran (never a silent fallback)."""
