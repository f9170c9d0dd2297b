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


def test_a_second_inner_loop_runs_once_a_step():
    """The value product's steps (mma_decode.COMPACT_VALUES) are the tile loop's second inner
    loop: it runs ``steps`` times, the first (the score k-blocks) ``k_blocks`` times."""
    sass = SASS.replace(
        "        /*0050*/                   FADD R3, R3, R2 ;\n",
        "        /*0050*/                   FADD R3, R3, R2 ;\n.L_x_4:\n"
        "        /*0054*/                   HMMA.16816.F32 R4, R8, R12, R4 ;\n"
        "        /*0058*/              @!P2 BRA `(.L_x_4) ;\n",
    )
    loops = sass_count.parse_loops(sass)
    t = sass_count.tile_counts(loops, k_blocks=4, steps=8)
    assert t["inner"] == [3, 2]
    assert (t["static"], t["executed"], t["mma"]) == (8, 8 + 3 * 3 + 7 * 2, 3 + 3 + 7)


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
        counts[fold] = sass_count.tile_counts(loops, 128 // 16, steps=8)
    on, off = counts[True], counts[False]
    assert len(on["inner"]) == 2 and on["executed"] > on["static"]
    assert on["executed"] < off["executed"] and on["mma"] > off["mma"]
    assert on["ops"]["HFMA2"] < off["ops"]["HFMA2"]


@pytest.mark.skipif(
    not (nvrtc.available() and sass_count.nvdisasm()),
    reason="needs NVRTC and nvdisasm 13 from PyPI (test extras, Linux x86-64)",
)
def test_looped_value_steps_shrink_the_tile_loops_code(monkeypatch):
    """mma_decode.COMPACT_VALUES at D 128: the value product's 8 steps in a loop of their own
    (8 HMMA a step: the 128 value dims in m-tiles of 16), so the tile loop's code is far
    smaller than with the steps unrolled, for a few more instructions executed and the same
    tensor-core work."""
    from services.turboquant.kernels import mma_decode

    counts = {}
    for compact in (True, False):
        monkeypatch.setattr(mma_decode, "COMPACT_VALUES", compact)
        loops = sass_count.parse_loops(sass_count.split_sass(128, 32, 8, 4000, aligned=True))
        counts[compact] = (sass_count.tile_counts(loops, 8, steps=8), loops)
    (on, loops_on), (off, _) = counts[True], counts[False]
    assert len(on["inner"]) == 2 and len(off["inner"]) == 1
    steps_loop = max((lp for lp in loops_on if lp.size == on["inner"][1]), key=lambda lp: lp.mma)
    assert steps_loop.mma == 8
    assert on["static"] < 0.8 * off["static"]
    assert off["executed"] < on["executed"] < 1.1 * off["executed"]
    assert on["mma"] == off["mma"]


@pytest.mark.skipif(
    not (nvrtc.available() and sass_count.nvdisasm()),
    reason="needs NVRTC and nvdisasm 13 from PyPI (test extras, Linux x86-64)",
)
def test_the_rope_from_shared_memory_gives_the_rope_build_the_plain_tile_loop(monkeypatch):
    """A model's step (new position, the query's RoPE in the kernel) builds a tile loop that
    re-loads constants (LDC) the build without RoPE keeps in registers; with
    mma_decode.ROPE_SMEM (partners read back from shared memory, launch bounds) the loop
    is the plain one's again, within a few instructions (session 26)."""
    from services.turboquant.kernels import mma_decode

    def tile(rope: bool) -> dict:
        loops = sass_count.parse_loops(sass_count.split_sass(128, 32, 8, 4000, False, rope))
        steps = mma_decode.steps_for(mma_decode.KEY_LAYOUTS["channel"], 128)
        return sass_count.tile_counts(loops, 128 // 16, steps)

    plain, rope = tile(False), tile(True)
    monkeypatch.setattr(mma_decode, "ROPE_SMEM", True)
    smem = tile(True)
    assert rope["ops"]["LDC"] > plain["ops"]["LDC"]
    assert smem["ops"]["LDC"] == plain["ops"]["LDC"]
    assert plain["executed"] <= smem["executed"] <= plain["executed"] + 10 < rope["executed"]
