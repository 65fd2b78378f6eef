"""dsv4.layers: the NVFP4 runners a serving stack calls (docs/design.md §2).

`SharedExpertRunner`, `RoutedMoERunner` (top-k routing on one expert-parallel rank) and
`GroupedLinear` (wo_a). One life cycle for all three: set weights -> finalize() (quantize, lay
out, allocate every buffer for max_num_tokens) -> calibrate(warm-up sample) (static activation
global scales) -> run(). run() checks metadata only, allocates nothing (the ops' temporaries
live in a workspace made at finalize: profiler-counted on CPU, allocator-counted on CUDA),
makes no host sync (on CUDA the torch GEMM backend takes its sync-free form, E x the FLOPs,
rather than reading the expert offsets on the host; checked under CUDA's sync debug mode)
and can be captured in a CUDA graph; `run_op` is the same call through a torch.library
custom op (`dsv4::*_run`), opaque to torch.compile. `stages()` names the last run's
intermediates as reference.layers does, so the harness compares them stage by stage.
Importing this package initialises no GPU and reads no environment variable.
"""

from dsv4.layers.grouped_linear import GroupedLinear
from dsv4.layers.routed_moe import RoutedMoERunner
from dsv4.layers.shared_expert import SharedExpertRunner

__all__ = ["GroupedLinear", "RoutedMoERunner", "SharedExpertRunner"]
