"""The routed MoE's routing in three Triton launches: a stable counting sort of the T*k slots.

Slot r = token * k + s holds global expert id ids[token, s]; its key is id - first_expert, or E
(the dropped bin, last) for an id outside the rank's E local experts (other ranks, -1). The
staged order sorts the slots by key, stably (by slot inside a key), as the torch form in
dsv4/layers/routed_moe.py does with a one-hot cumsum over all rows (about 20 launches):

1. `_hist_kernel`, one program per BLOCK slots (a chunk): the chunk's count of each key.
2. `_scan_kernel`, one program: the keys' totals, each key's first staged row (an exclusive
   scan over the keys) and each chunk's first row of each key (over the chunks), into `base`;
   the E local experts' END offsets (int32) and their first scale rows in the 2-D-side layout
   (each expert's rows padded to 128 on their own: `padded_group_starts`).
3. `_place_kernel`, one program per chunk: a slot's staged row = base[chunk, key] + the number
   of earlier slots of its chunk with the same key; it writes that row's token (r // k) and
   fp32 routing weight, and the combine's inverse index (slot -> staged row, `zero_row` for a
   dropped slot).

Integers only: the result equals the torch form's bit for bit (tests/test_moe_route.py under the
Triton interpreter; tests/test_dsv4_layers.py compares the two runners on the GPU). Reads no
value on the host, allocates nothing (`hist` and `base` are the caller's, [chunks, E_PAD] int32):
graph-capturable. Layers (STYLE.md rule 1): the `_kernel`s, `launch_route` (validates, writes
the caller's buffers), `route` (allocates them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops._checks import need as _need

BLOCK = 256  # slots per program of the histogram and the placement
SCAN_CHUNKS = 64  # chunks the scan reads per step
ATOM_ROWS = 128  # scale rows of one 128x4 atom: each expert's padding unit


def e_pad(e: int) -> int:
    """Key bins rounded up to a power of two: E local experts and the dropped bin."""
    return triton.next_power_of_2(e + 1)


def chunks(rows: int) -> int:
    return triton.cdiv(rows, BLOCK)


@triton.jit
def _keys(ids_ptr, stride_t, stride_s, c, rows, first, K: tl.constexpr, E: tl.constexpr,
          BLOCK: tl.constexpr):  # fmt: skip
    """Slots c*BLOCK.. of the chunk, which of them exist, and their keys (E: dropped)."""
    r = c * BLOCK + tl.arange(0, BLOCK)
    valid = r < rows
    t, s = r // K, r % K
    ids = tl.load(ids_ptr + t.to(tl.int64) * stride_t + s * stride_s, mask=valid, other=0)
    key = ids.to(tl.int64) - first
    key = tl.where((key < 0) | (key >= E), E, key).to(tl.int32)
    return r, valid, key


@triton.jit
def _onehot(key, valid, E_PAD: tl.constexpr):
    """[E_PAD, BLOCK] int32: 1 where slot j (existing) has key b."""
    bins = tl.arange(0, E_PAD)
    return ((key[None, :] == bins[:, None]) & valid[None, :]).to(tl.int32)


# do_not_specialize: an int argument's value (a multiple of 16 or not, 1 or not) picks no other
# specialization, so a new T compiles nothing: one compile per (k, E, dtypes), none in a capture
@triton.jit(do_not_specialize=["rows", "first"])
def _hist_kernel(ids_ptr, stride_t, stride_s, hist_ptr, rows, first, K: tl.constexpr,
                 E: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    c = tl.program_id(0)
    _, valid, key = _keys(ids_ptr, stride_t, stride_s, c, rows, first, K, E, BLOCK)
    counts = tl.sum(_onehot(key, valid, E_PAD), axis=1)
    tl.store(hist_ptr + c * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit(do_not_specialize=["n_chunks"])
def _scan_kernel(hist_ptr, base_ptr, offsets_ptr, starts_ptr, n_chunks, E: tl.constexpr,
                 E_PAD: tl.constexpr, CB: tl.constexpr, ATOM: tl.constexpr):  # fmt: skip
    bins = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, n_chunks, CB):
        cs = c0 + tl.arange(0, CB)
        m = (cs < n_chunks)[:, None]
        total += tl.sum(tl.load(hist_ptr + cs[:, None] * E_PAD + bins[None, :], mask=m, other=0), 0)
    first_row = tl.cumsum(total, 0) - total  # each key's first staged row
    local = bins < E
    tl.store(offsets_ptr + bins, first_row + total, mask=local)  # END offsets of the experts
    padded = (total + (ATOM - 1)) // ATOM * ATOM
    tl.store(starts_ptr + bins, tl.cumsum(padded, 0) - padded, mask=local)
    run = first_row  # base[c, b] = first_row[b] + rows of key b in the chunks before c
    for c0 in range(0, n_chunks, CB):
        cs = c0 + tl.arange(0, CB)
        m = (cs < n_chunks)[:, None]
        at = cs[:, None] * E_PAD + bins[None, :]
        h = tl.load(hist_ptr + at, mask=m, other=0)
        tl.store(base_ptr + at, tl.cumsum(h, 0) - h + run[None, :], mask=m)
        run += tl.sum(h, 0)


@triton.jit(do_not_specialize=["rows", "first", "zero_row"])
def _place_kernel(ids_ptr, stride_t, stride_s, w_ptr, stride_wt, stride_ws, base_ptr, token_ptr,
                  weight_ptr, inv_ptr, rows, first, zero_row, K: tl.constexpr, E: tl.constexpr,
                  E_PAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    c = tl.program_id(0)
    r, valid, key = _keys(ids_ptr, stride_t, stride_s, c, rows, first, K, E, BLOCK)
    oh = _onehot(key, valid, E_PAD)
    rank = tl.sum(oh * (tl.cumsum(oh, 1) - oh), 0)  # earlier slots of the chunk, same key
    pos = tl.load(base_ptr + c * E_PAD + key, mask=valid, other=0) + rank
    t, s = r // K, r % K
    w = tl.load(w_ptr + t.to(tl.int64) * stride_wt + s * stride_ws, mask=valid, other=0)
    tl.store(token_ptr + pos, t.to(token_ptr.dtype.element_ty), mask=valid)
    tl.store(weight_ptr + pos, w.to(tl.float32), mask=valid)  # exact from bf16 / fp16 / fp32
    inv = tl.where(key == E, zero_row, pos).to(tl.int64)
    tl.store(inv_ptr + r, inv, mask=valid)


def launch_route(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    first_expert: int,
    n_experts: int,
    zero_row: int,
    token: torch.Tensor,
    weight: torch.Tensor,
    inv: torch.Tensor,
    offsets: torch.Tensor,
    starts: torch.Tensor,
    hist: torch.Tensor,
    base: torch.Tensor,
) -> None:
    """The staged order of topk_ids [T, k] (int32 / int64 global ids) over experts
    first_expert .. first_expert + n_experts - 1, into the caller's buffers (R = T*k):
    token [>= R] (int32 or int64: staged row -> token), weight [>= R] fp32 (its routing weight,
    from topk_weights [T, k]), inv [>= R] int64 (slot t*k+s -> staged row, zero_row where its
    expert is not local), offsets [E] int32 END offsets, starts [E] int32 first scale rows
    (padded to 128 per expert), hist / base int32 [>= chunks(R), e_pad(E)] scratch. Metadata
    checks only (nothing read on the host)."""
    t, k = topk_ids.shape
    rows, e, ep = t * k, n_experts, e_pad(n_experts)
    n_chunks = chunks(rows)
    _need(
        topk_ids.dtype in (torch.int32, torch.int64) and topk_ids.dim() == 2,
        lambda: (
            f"topk_ids must be int32 / int64 [T, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}"
        ),
    )
    _need(
        tuple(topk_weights.shape) == (t, k) and topk_weights.is_floating_point(),
        lambda: (
            f"topk_weights must be float [{t}, {k}], got {topk_weights.dtype} "
            f"{tuple(topk_weights.shape)}"
        ),
    )
    for name, x, dtypes, n in (
        ("token", token, (torch.int32, torch.int64), rows),
        ("weight", weight, (torch.float32,), rows),
        ("inv", inv, (torch.int64,), rows),
        ("offsets", offsets, (torch.int32,), e),
        ("starts", starts, (torch.int32,), e),
    ):
        _need(
            x.dtype in dtypes and x.dim() == 1 and x.is_contiguous() and x.numel() >= n,
            lambda name=name, x=x, dtypes=dtypes, n=n: (
                f"{name} must be contiguous 1-D "
                f"{' / '.join(map(str, dtypes))} of >= {n} elements, got {x.dtype} {tuple(x.shape)}"
            ),
        )
    for name, x in (("hist", hist), ("base", base)):
        _need(
            x.dtype == torch.int32 and x.is_contiguous() and x.numel() >= n_chunks * ep,
            lambda name=name, x=x: (
                f"{name} must be contiguous int32 of >= chunks(R={rows}) * "
                f"e_pad(E={e}) = {n_chunks * ep} elements, got {x.dtype} {tuple(x.shape)}"
            ),
        )
    tensors = (topk_ids, topk_weights, token, weight, inv, offsets, starts, hist, base)
    devs = {x.device for x in tensors}
    _need(len(devs) == 1, lambda: f"all tensors must be on one device, got {devs}")
    _need(0 <= zero_row < 2**31, lambda: f"zero_row must be in [0, 2^31), got {zero_row}")
    if rows == 0:
        return
    ids_strides = topk_ids.stride()
    _hist_kernel[(n_chunks,)](
        topk_ids, *ids_strides, hist, rows, first_expert, K=k, E=e, E_PAD=ep, BLOCK=BLOCK
    )
    _scan_kernel[(1,)](
        hist, base, offsets, starts, n_chunks, E=e, E_PAD=ep, CB=SCAN_CHUNKS, ATOM=ATOM_ROWS
    )
    _place_kernel[(n_chunks,)](
        topk_ids, *ids_strides, topk_weights, *topk_weights.stride(), base, token, weight, inv,
        rows, first_expert, zero_row, K=k, E=e, E_PAD=ep, BLOCK=BLOCK,
    )  # fmt: skip


def route(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    first_expert: int,
    n_experts: int,
    token_dtype: torch.dtype = torch.int64,
) -> dict[str, torch.Tensor]:
    """launch_route into fresh buffers: {"token", "weight", "inv", "offsets", "starts"}; a
    dropped slot's inv is R (one past the staged rows: the caller's zero row)."""
    t, k = topk_ids.shape
    rows, dev = t * k, topk_ids.device
    n = max(1, chunks(rows)) * e_pad(n_experts)
    out = {
        "token": torch.empty(rows, dtype=token_dtype, device=dev),
        "weight": torch.empty(rows, dtype=torch.float32, device=dev),
        "inv": torch.empty(rows, dtype=torch.int64, device=dev),
        "offsets": torch.zeros(n_experts, dtype=torch.int32, device=dev),
        "starts": torch.zeros(n_experts, dtype=torch.int32, device=dev),
    }
    hist = torch.empty(n, dtype=torch.int32, device=dev)
    base = torch.empty(n, dtype=torch.int32, device=dev)
    launch_route(topk_ids, topk_weights, first_expert, n_experts, rows, **out, hist=hist, base=base)
    return out
