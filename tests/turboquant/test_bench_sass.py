"""bench/sass_count.py: loops and the instructions a tile executes, from the split kernel's
machine code (NVRTC and nvdisasm from PyPI; no GPU)."""

from __future__ import annotations

import pytest

from bench import sass_count

from . import nvrtc

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
.L_x_2:
        /*0020*/                   LOP3.LUT R2, R2, 0xf, RZ, 0xc0, !PT ;
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0040*/              @!P0 BRA `(.L_x_2) ;
        /*0050*/                   FADD R3, R3, R2 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   BRA `(.L_x_3) ;
.L_x_3:
        /*0080*/                   EXIT ;
"""


def test_loops_are_backward_branches_and_a_tile_runs_its_inner_loop_per_k_block():
    loops = sass_count.parse_loops(SASS)
    assert [(lp.start, lp.end, lp.size, lp.mma) for lp in loops] == [
        (0x20, 0x40, 3, 1),
        (0x10, 0x60, 6, 2),
    ]  # (the forward branch to .L_x_3 is no loop)
    t = sass_count.tile_counts(loops, k_blocks=4)
    assert (t["static"], t["inner"], t["executed"], t["mma"]) == (6, [3], 6 + 3 * 3, 2 + 3)


@pytest.mark.skipif(
    not (nvrtc.available() and sass_count.nvdisasm()),
    reason="needs NVRTC and nvdisasm 13 from PyPI (test extras, Linux x86-64)",
)
def test_folded_scales_cost_a_tile_fewer_instructions_than_scaled_codes(monkeypatch):
    """The default layout at D 128: the tile loop holds the tensor-core ops, its k-block loop
    runs D / 16 times; folding the scales into the other operand (mma_decode.FOLD) trades
    per-element HFMA2s for one extra mma a k-block -- fewer instructions, more HMMA."""
    from services.turboquant.kernels import mma_decode

    counts = {}
    for fold in (True, False):
        monkeypatch.setattr(mma_decode, "FOLD", fold)
        loops = sass_count.parse_loops(sass_count.split_sass(128, 32, 8, 4000, aligned=True))
        counts[fold] = sass_count.tile_counts(loops, 128 // 16)
    on, off = counts[True], counts[False]
    assert len(on["inner"]) == 1 and on["executed"] > on["static"]
    assert on["executed"] < off["executed"] and on["mma"] > off["mma"]
    assert on["ops"]["HFMA2"] < off["ops"]["HFMA2"]
