"""The built-in adapters, by name: a static table of `module:attr` import paths, loaded lazily.

Each name maps to the import path of a class or factory in this package (docs/cases.md
"Adapters"); `harness.adapters.load(name)` imports the module only when that name is asked for,
so listing adapters imports nothing and a missing optional package (dsv4, triton, CuTeDSL)
fails only the adapter that needs it, naming the module. The modules here are the bridges:
`reference` (the oracle through the protocol), `dsv4` (the production runners, through dsv4's
public API only: dsv4 imports nothing of the harness), `peers` (other NVFP4 GEMMs judged by the
same cases: torch's scaled matmul, flashinfer) and `baselines` (timing baselines).
Installed packages add names of their own through the entry-point group `ENTRY_POINT_GROUP`
(`name = "module:attr"`), the same import-path form a user gives as `-b module:attr`.
This module imports nothing: the table is data.
"""

from __future__ import annotations

BUILTIN: dict[str, str] = {
    "reference": "harness.backends.reference:ReferenceAdapter",
    "dsv4-torch": "harness.backends.dsv4:dsv4_torch",  # the portable backend, torch quantize
    "dsv4-cutedsl": "harness.backends.dsv4:dsv4_cutedsl",  # CuTeDSL quantize kernels
    "dsv4-sm90": "harness.backends.dsv4:dsv4_sm90",
    "dsv4-sm100": "harness.backends.dsv4:dsv4_sm100",  # CuTeDSL tcgen05, unverified on hardware
    "torch-scaled-mm": "harness.backends.peers:TorchScaledMm",  # peer: torch NVFP4, sm_100
    "flashinfer": "harness.backends.peers:FlashinferFp4",  # peer: flashinfer.mm_fp4, sm_100
    "bf16": "harness.backends.baselines:Bf16Baseline",  # timing baseline only
    "reference-compiled": "harness.backends.baselines:CompiledReference",
}

ENTRY_POINT_GROUP = "dsv4_nvfp4.adapters"

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP"]
