"""reference/layouts.py: the 128x4 scale swizzle, its inverse, grouped assembly and offsets.

The swizzle is checked against a closed form written here independently of the module (a
vectorised scatter of every element to its offset), so a shared mistake would need two
different formulations to agree on it. Layout checks are bit-exact on uint8 views.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from reference.layouts import (
    assemble_scales_2d_side,
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    compute_blockscale_offsets,
    compute_expert_offsets,
    make_b_k_major,
    pad_scales,
    round_up,
    swizzle_offset,
    swizzle_scales,
    unswizzle_scales,
)

ROWS = (1, 31, 127, 128, 129, 300)
COLS = (1, 3, 4, 5, 448)


def _rand_scales(rows: int, cols: int, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    # bytes 1..255: a nonzero value everywhere, so a dropped or misplaced scale cannot hide behind
    # the zero padding (0x7F and 0xFF, the NaN bytes, are moved like any other byte)
    b = torch.randint(1, 256, (rows, cols), dtype=torch.uint8)
    return b if dtype == torch.uint8 else b.view(dtype)


def _closed_form_swizzle(s: torch.Tensor) -> torch.Tensor:
    """Independent oracle: scatter byte (r, c) to its docs/design.md §3 offset, padding stays 0."""
    b = s.view(torch.uint8)
    rows, cols = b.shape
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    n_cb = cp // 4
    r = torch.arange(rows).view(-1, 1)
    c = torch.arange(cols).view(1, -1)
    off = ((r // 128) * n_cb + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4
    out = torch.zeros(rp * cp, dtype=torch.uint8)
    out[off.reshape(-1)] = b.reshape(-1)
    return out


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.view(torch.uint8)


# --------------------------------------------------------------------------------------------
# single matrix


@pytest.mark.parametrize("rows,cols", list(itertools.product(ROWS, COLS)))
def test_swizzle_matches_closed_form_and_roundtrips(rows: int, cols: int) -> None:
    torch.manual_seed(rows * 1000 + cols)
    s = _rand_scales(rows, cols)
    sw = swizzle_scales(s)
    assert sw.dtype == torch.float8_e4m3fn
    assert sw.shape == (round_up(rows, 128) * round_up(cols, 4),)
    assert torch.equal(_bytes(sw), _closed_form_swizzle(s))
    back = unswizzle_scales(sw, rows, cols)
    assert back.dtype == s.dtype and back.shape == s.shape
    assert torch.equal(_bytes(back), _bytes(s))


@pytest.mark.parametrize("rows,cols", [(1, 1), (129, 5), (300, 448)])
def test_padding_bytes_are_zero(rows: int, cols: int) -> None:
    torch.manual_seed(1)
    s = _rand_scales(rows, cols)
    sw = _bytes(swizzle_scales(s))
    used = torch.zeros(sw.numel(), dtype=torch.bool)
    used[_closed_form_swizzle(s).nonzero()] = True  # every real byte is nonzero by construction
    assert int(used.sum()) == rows * cols
    assert torch.all(sw[~used] == 0)
    assert torch.all(sw[used] != 0)


def test_swizzle_accepts_uint8_and_keeps_dtype() -> None:
    torch.manual_seed(2)
    s = _rand_scales(129, 5, torch.uint8)
    sw = swizzle_scales(s)
    assert sw.dtype == torch.uint8
    assert torch.equal(sw, _closed_form_swizzle(s))
    assert torch.equal(unswizzle_scales(sw, 129, 5), s)


def test_swizzle_non_contiguous_input() -> None:
    torch.manual_seed(3)
    s = _rand_scales(5, 300).t()  # [300, 5], strides (1, 300)
    assert not s.is_contiguous()
    assert torch.equal(_bytes(swizzle_scales(s)), _closed_form_swizzle(s.contiguous()))


def test_swizzle_offset_closed_form() -> None:
    # hand-computed anchors: second sub-block of 32 rows, second row block, second column block
    assert swizzle_offset(0, 0, 5) == 0
    assert swizzle_offset(1, 0, 5) == 16
    assert swizzle_offset(32, 0, 5) == 4
    assert swizzle_offset(0, 3, 5) == 3
    assert swizzle_offset(0, 4, 5) == 512
    assert swizzle_offset(128, 0, 5) == 1024  # n_cb = 2 atoms per row block
    assert swizzle_offset(127, 7, 5) == 512 + 31 * 16 + 3 * 4 + 3
    torch.manual_seed(4)
    s = _rand_scales(129, 5)
    sw = _bytes(swizzle_scales(s))
    b = _bytes(s)
    for r, c in [(0, 0), (31, 4), (64, 2), (100, 3), (128, 4)]:
        assert sw[swizzle_offset(r, c, 5)] == b[r, c]


def test_pad_scales() -> None:
    torch.manual_seed(5)
    s = _rand_scales(129, 5)
    p = pad_scales(s)
    assert p.dtype == s.dtype and p.shape == (256, 8)
    pb = _bytes(p)
    assert torch.equal(pb[:129, :5], _bytes(s))
    assert torch.all(pb[129:] == 0) and torch.all(pb[:, 5:] == 0)


def test_round_up() -> None:
    assert [round_up(x, 128) for x in (0, 1, 127, 128, 129)] == [0, 128, 128, 128, 256]
    assert round_up(5, 4) == 8


# --------------------------------------------------------------------------------------------
# offsets


def test_compute_offsets() -> None:
    t = torch.tensor([0, 1, 127, 128, 129, 0, 300])
    ends = compute_expert_offsets(t)
    starts = compute_blockscale_offsets(t)
    assert ends.dtype == torch.int32 and starts.dtype == torch.int32
    assert ends.tolist() == [0, 1, 128, 256, 385, 385, 685]
    assert starts.tolist() == [0, 0, 128, 256, 384, 640, 640]
    empty = torch.zeros(0, dtype=torch.int32)
    assert compute_expert_offsets(empty).shape == (0,)
    assert compute_blockscale_offsets(empty).shape == (0,)


# --------------------------------------------------------------------------------------------
# grouped assembly


@pytest.mark.parametrize("sizes", [[0, 1, 127, 128, 129], [5], [0, 0, 3], [300, 0, 33]])
def test_assemble_2d_side(sizes: list[int]) -> None:
    torch.manual_seed(6)
    cols = 5
    groups = [_rand_scales(t, cols) for t in sizes]
    sw, starts = assemble_scales_2d_side(groups)
    assert sw.dtype == torch.float8_e4m3fn and starts.dtype == torch.int32
    expected_starts, acc = [], 0
    for t in sizes:
        expected_starts.append(acc)
        acc += -(-t // 128) * 128
    assert starts.tolist() == expected_starts
    row_bytes = round_up(cols, 4)
    assert sw.numel() == acc * row_bytes
    swb = _bytes(sw)
    for g, t in enumerate(sizes):
        a = expected_starts[g] * row_bytes
        block = swb[a : a + -(-t // 128) * 128 * row_bytes]
        assert torch.equal(block, _closed_form_swizzle(groups[g]))
        back = unswizzle_scales(block.view(sw.dtype), t, cols)
        assert torch.equal(_bytes(back), _bytes(groups[g]))


def test_assemble_2d_side_from_offsets_matches_list_form() -> None:
    torch.manual_seed(7)
    sizes = [0, 1, 127, 128, 129]
    scales = _rand_scales(sum(sizes), 3)
    ends = compute_expert_offsets(torch.tensor(sizes))
    sw, starts = assemble_scales_2d_side_from_offsets(scales, ends)
    ref_sw, ref_starts = assemble_scales_2d_side(list(torch.split(scales, sizes)))
    assert torch.equal(_bytes(sw), _bytes(ref_sw))
    assert torch.equal(starts, ref_starts)
    assert starts.tolist() == [0, 0, 128, 256, 384]


def test_assemble_3d_side() -> None:
    torch.manual_seed(8)
    k16, n = 7, 130  # neither a multiple of its atom size
    experts = [_rand_scales(k16, n) for _ in range(3)]
    out = assemble_scales_3d_side(experts)
    assert out.dtype == torch.float8_e4m3fn
    assert out.shape == (3, round_up(n, 128) * round_up(k16, 4))
    for e, s in enumerate(experts):
        assert torch.equal(_bytes(out[e]), _closed_form_swizzle(s.t().contiguous()))
        assert torch.equal(_bytes(unswizzle_scales(out[e], n, k16)), _bytes(s.t()))


def test_make_b_k_major() -> None:
    torch.manual_seed(9)
    e, k2, n = 3, 8, 5
    b = torch.randint(0, 256, (e, k2, n), dtype=torch.uint8)
    km = make_b_k_major(b)
    assert km.shape == b.shape and km.dtype == torch.uint8
    assert km.stride() == (n * k2, 1, k2)
    assert km.stride(-2) == 1
    assert torch.equal(km, b)
    assert km.transpose(-1, -2).is_contiguous()


# --------------------------------------------------------------------------------------------
# bad input names the argument


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: swizzle_scales(torch.zeros(4, dtype=torch.uint8)), "scales"),
        (lambda: swizzle_scales(torch.zeros(2, 2)), "scales.dtype"),
        (lambda: swizzle_scales([[1]]), "scales"),
        (lambda: pad_scales(torch.zeros(1, 2, 3, dtype=torch.uint8)), "scales.shape"),
        (lambda: unswizzle_scales(torch.zeros(512, dtype=torch.uint8), 129, 4), "rows=129"),
        (lambda: unswizzle_scales(torch.zeros(512, dtype=torch.uint8), -1, 4), "rows"),
        (lambda: unswizzle_scales(torch.zeros(4, 128, dtype=torch.uint8), 128, 4), "swizzled"),
        (lambda: swizzle_offset(0, 8, 5), "c="),
        (lambda: swizzle_offset(-1, 0, 5), "r="),
        (lambda: round_up(3, 0), "m="),
        (lambda: compute_expert_offsets(torch.tensor([1, -2])), "tokens_per_expert"),
        (lambda: compute_expert_offsets(torch.tensor([1.0])), "tokens_per_expert.dtype"),
        (
            lambda: compute_blockscale_offsets(torch.zeros(2, 2, dtype=torch.int32)),
            "tokens_per_expert.shape",
        ),
        (lambda: assemble_scales_2d_side([]), "scales_per_group"),
        (
            lambda: assemble_scales_2d_side(
                [torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)]
            ),
            "scales_per_group[1]",
        ),
        (
            lambda: assemble_scales_2d_side([torch.zeros(2, 3, dtype=torch.int32)]),
            "scales_per_group[0].dtype",
        ),
        (
            lambda: assemble_scales_2d_side_from_offsets(
                torch.zeros(10, 3, dtype=torch.uint8), torch.tensor([4, 9], dtype=torch.int32)
            ),
            "expert_offsets",
        ),
        (
            lambda: assemble_scales_2d_side_from_offsets(
                torch.zeros(10, 3, dtype=torch.uint8), torch.tensor([6, 4, 10], dtype=torch.int32)
            ),
            "expert_offsets",
        ),
        (
            lambda: assemble_scales_3d_side(
                [torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(3, 3, dtype=torch.uint8)]
            ),
            "scales_per_expert[1]",
        ),
        (lambda: make_b_k_major(torch.zeros(2, 3, dtype=torch.uint8)), "b.shape"),
        (lambda: make_b_k_major(torch.zeros(1, 2, 3)), "b.dtype"),
    ],
)
def test_bad_input_raises_naming_argument(call, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()
