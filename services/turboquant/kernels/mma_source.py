"""CUDA source of the tensor-core decode kernel (v5) for ``mx.fast.cuda_kernel``.

One warp scores 16 positions x 8 query heads per ``mma.m16n8k16`` (f16 in, f32 out):
``S^T = K . Q^T`` with the keys as the A operand and the query as B, then ``O^T += V^T .
P^T`` with the values as A and the probabilities as B (moved from the score layout by
``movmatrix``). Codes are turned into fp16 in registers (``0x6400 | code`` is ``1024 +
code`` exactly; 4-bit pairs by one byte permute and one LOP3), never written back. With
``FOLD`` the A operand is the exact codes and a tile's scales multiply the B operand
instead (``q*s``, ``p*s``), the biases entering through one mma against ones; otherwise
the codes are dequantized in fp16 (HFMA2) first. The split kernel rotates the query
itself (``QROT``: signs, then Hadamard butterflies in shared memory).

A warp owns super-tiles of ``16 * STEPS`` positions (STEPS steps of 16) and keeps its own
online softmax; the block's warps merge in shared memory and write one partial ``(acc, m,
l)`` per split (base-2 exponentials). Key layouts (``KQ``): 0 affine per vector, 1 codebook
per vector, 2 affine per channel (transposed, groups of ``KGS >= 8 * STEPS`` positions:
step ``s`` row ``r < 8`` is position ``STEPS * r + s`` of the tile, row ``r >= 8`` the same in
its second half, so one lane reads a run of STEPS positions of a channel at once). Value
layouts (``VQ``): 0 affine, 1 codebook. Dims are permuted between lanes freely (the same
permutation on both operands); the output permutation is undone when the partials are written.
"""

from ..cache import JOIN_COUNTER_ROWS

# What every launch needs: includes, conversions, the split merge. The join and
# combine take only this (MLX copies the header into each launch's source, per call).
MMA_COMMON = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define TQM_NEG_INF (__int_as_float(0xff800000u))

namespace tqm {

__device__ __forceinline__ float tofloat(float x) { return x; }
__device__ __forceinline__ float tofloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float tofloat(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// Flash-decoding merge of one (batch, head) row's S split partials for coordinate d:
// returns the unnormalised sum, with the running max M and the sum of weights L. One
// pass, 8 splits' loads issued together: a load-use chain per split cost ~0.7 us each
// (bench/gpu_notes.md, session 5).
__device__ __forceinline__ float merge_splits(const float* o_part, const float* ml_part, int64_t row,
                                              int S, int D, int d, float& M, float& L) {
  const float* ml = ml_part + row * S * 2;
  const float* op = o_part + row * S * D + d;
  M = TQM_NEG_INF;
  L = 0.f;
  float acc = 0.f;
  for (int s0 = 0; s0 < S; s0 += 8) {
    float m[8], l[8], o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const bool ok = s0 + j < S;
      m[j] = ok ? ml[2 * (s0 + j)] : TQM_NEG_INF;
      l[j] = ok ? ml[2 * (s0 + j) + 1] : 0.f;
      o[j] = ok ? op[(s0 + j) * D] : 0.f;
    }
    float mb = M;
#pragma unroll
    for (int j = 0; j < 8; ++j) mb = fmaxf(mb, m[j]);
    if (mb == TQM_NEG_INF) continue;  // only empty splits so far
    const float r = exp2f(M - mb);  // 0 while M is -inf
    L *= r;
    acc *= r;
    M = mb;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float w = exp2f(m[j] - M);  // 0 for an empty split
      L = fmaf(l[j], w, L);
      acc = fmaf(o[j], w, acc);
    }
  }
  return acc;
}

// A join's last step for one query head: the weights of the body's partial (max mb, the key
// centre's shift in it) and of the full-precision one (mf) against the learned sink zk (all
// log2 units; -inf: none), and the softmax's denominator.
__device__ __forceinline__ void join_weights(float mb, float lb, float mf, float lf, float zk, bool sinks,
                                             float& wb, float& wf, float& den) {
  const float T = fmaxf(fmaxf(mb, mf), zk);
  wb = mb == TQM_NEG_INF ? 0.f : exp2f(mb - T);
  wf = mf == TQM_NEG_INF ? 0.f : exp2f(mf - T);
  den = lb * wb + lf * wf + (sinks ? exp2f(zk - T) : 0.f);
}

}  // namespace tqm
"""


def compact(source: str) -> str:
    """``source`` without comments, indentation or blank lines. MLX rebuilds a launch's
    source text (header included) and hashes it on every call, so its size is host time
    per decode step; the compiled code is the same."""
    out = []
    for line in source.splitlines():
        if not line.lstrip().startswith("#"):
            cut = line.find("//")
            while cut >= 0 and line.count('"', 0, cut) % 2:  # inside a string literal
                cut = line.find("//", cut + 2)
            line = line if cut < 0 else line[:cut]
        line = line.strip()
        if line:
            out.append(line)
    return "\n".join(out) + "\n"


MMA_FP_CHUNK = 16  # positions a fp_chunk block takes (the kernels read TQM_FP_CHUNK)
# The default layout's 4-bit codes to the tensor cores with their fp16 offset (RAWC): 2 the
# high nibbles, 1 all (past the error bound at 128K), 0 none.
MMA_RAW_CODES = 2
MMA_WORK_ALIGN = 32  # floats each part of the fused join's workspace is rounded up to

# The split kernel's device code, after MMA_COMMON.
MMA_HEADER = (
    MMA_COMMON
    + f"#define TQM_FP_CHUNK {MMA_FP_CHUNK}\n#define TQM_RAW_CODES {MMA_RAW_CODES}\n"
    + f"#define TQM_JOIN_ROWS {JOIN_COUNTER_ROWS}\n#define TQM_WORK_ALIGN {MMA_WORK_ALIGN}\n"
    + r"""
// TQM_TRACE (bench/kernel_trace.py only: mma_decode.TRACE_AT): each block of a fused launch
// records when it reaches each stage, in the workspace past TQM_TRACE floats; else nothing.
#ifdef TQM_TRACE
__shared__ unsigned long long tqm_trace_s[32];
__device__ __forceinline__ void tqm_mark(int i) {
  unsigned long long g;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g));
  tqm_trace_s[i] = g;
  tqm_trace_s[16 + i] = clock64();
}
#define TQM_MARK(i) do { if (threadIdx.x == 0) tqm_mark(i); } while (0)
#define TQM_MARK_WARP(i) do { if ((threadIdx.x & 31) == 0) tqm_mark((i) + (threadIdx.x >> 5)); } while (0)
// mark i once thread 0 holds the float v (its loads have landed: the asm takes it as input)
#define TQM_MARK_ON(i, v) do { if (threadIdx.x == 0) { const float tqm_v = (v); asm volatile("" :: "f"(tqm_v)); tqm_mark(i); } } while (0)
#else
#define TQM_MARK(i) do {} while (0)
#define TQM_MARK_WARP(i) do {} while (0)
#define TQM_MARK_ON(i, v) do {} while (0)
#endif
namespace tqm {

// The full-precision tail's length: TLEN, the first params[1] positions of the whole tail
// buffer (cache.BufferedTail); else the tail view's own length.
template <bool TLEN>
__device__ __forceinline__ int tail_len(const float* params, const int* kt_sh) {
  return TLEN ? (int)params[1] : kt_sh[2];
}

// RoPE as mx.fast.rope computes it (rope_fusion.RopeSpec): RD dims rotated in pairs
// (i, i + RD/2), or (2i, 2i + 1) when RT, pair f by pos * inv[f] radians. rope_pair: element
// d's partner p, frequency index f and whether d leads its pair; a dim past RD pairs with
// itself at f = -1 (frequency 0: unrotated), so callers load both without a branch.
template <int RD, bool RT>
__device__ __forceinline__ void rope_pair(int d, int& p, int& f, bool& lo) {
  constexpr int H = RD / 2;
  lo = d >= RD || (RT ? (d & 1) == 0 : d < H);
  f = d >= RD ? -1 : RT ? d >> 1 : (lo ? d : d - H);
  p = d >= RD ? d : RT ? d ^ 1 : (lo ? d + H : d - H);
}

// Element a of a pair (b its partner) rotated by pos * inv radians. The angle reaches ~1e5
// at long contexts: reduced in double first (sincosf's slow path there uses local memory).
__device__ __forceinline__ float rope_mix(float a, float b, float inv, bool lo, float pos) {
  const double th = (double)(pos * inv);
  float sn, cs;
  __sincosf((float)(th - rint(th * 0.15915494309189535) * 6.283185307179586), &sn, &cs);
  return lo ? a * cs - b * sn : a * cs + b * sn;
}

// The partner (x[at + p * st]) and frequency of element d, loaded beside the element itself
// so that no load waits on math; rope_apply rotates them where the element is stored.
template <int RD, bool RT, typename T>
__device__ __forceinline__ void rope_load(const T* x, int64_t at, int64_t st, int d, const float* inv,
                                          T& partner, float& freq) {
  int p, f;
  bool lo;
  rope_pair<RD, RT>(d, p, f, lo);
  partner = x[at + p * st];
  freq = f < 0 ? 0.f : inv[f];
}

// The frequency of element d alone (its partner read elsewhere: mma_decode.ROPE_SMEM).
template <int RD, bool RT>
__device__ __forceinline__ float rope_freq(int d, const float* inv) {
  int p, f;
  bool lo;
  rope_pair<RD, RT>(d, p, f, lo);
  return f < 0 ? 0.f : inv[f];
}

template <int RD, bool RT, typename T>
__device__ __forceinline__ float rope_apply(T a, T partner, float freq, int d, float pos) {
  int p, f;
  bool lo;
  rope_pair<RD, RT>(d, p, f, lo);
  return rope_mix(tofloat(a), tofloat(partner), freq, lo, pos);
}


// Floats a part of the fused join's workspace takes (mma_decode.work_floats): whole
// 128-byte lines, so every part keeps the float4 alignment of the join's loads.
__device__ __forceinline__ int64_t work_span(int64_t floats) {
  return (floats + TQM_WORK_ALIGN - 1) / TQM_WORK_ALIGN * TQM_WORK_ALIGN;
}

// c(16x8, f32) += a(16x16, f16, row) . b(16x8, f16, col)
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Transpose an 8x8 fp16 matrix held one half2 per lane (row lane/4, cols 2(lane%4)+{0,1}).
__device__ __forceinline__ uint32_t trans8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Two codes (< 1024) -> half2 exactly, without an int->float conversion.
__device__ __forceinline__ __half2 codes2h(uint32_t c0, uint32_t c1) {
  return __hsub2(u2h(c0 | (c1 << 16) | 0x64006400u), u2h(0x64006400u));
}

// Code e (a constant after unrolling) of a bit stream that starts at bit 0 of w.
template <int B, int N>
__device__ __forceinline__ uint32_t code_at(const uint32_t (&w)[N], int e) {
  const int bit = e * B;
  const int wi = bit >> 5, sh = bit & 31;
  uint32_t v = w[wi] >> sh;
  if (sh + B > 32) v |= w[wi + 1] << (32 - sh);
  return v & ((1u << B) - 1u);
}

// out[0..NA) = the bit stream of row (nw words) from bit `bit` on. UNAL: the start may not
// be word aligned (one more word read, funnel-shifted). Every word holding a code is in
// the row; only UNAL's extra word can lie past it, so only that read is guarded.
template <int NA, bool UNAL>
__device__ __forceinline__ void load_bits(const uint32_t* row, int bit, int nw, uint32_t (&out)[NA]) {
  const int w0 = bit >> 5;
  const uint32_t* w = row + w0;
  if constexpr (UNAL) {
    uint32_t raw[NA + 1];
#pragma unroll
    for (int i = 0; i < NA; ++i) raw[i] = w[i];
    raw[NA] = w0 + NA < nw ? w[NA] : 0u;
    const int sh = bit & 31;
#pragma unroll
    for (int i = 0; i < NA; ++i) out[i] = __funnelshift_r(raw[i], raw[i + 1], sh);
  } else {
#pragma unroll
    for (int i = 0; i < NA; ++i) out[i] = w[i];
  }
}

// Dequantized pair (x0 = s0*c0 + b0, x1 = s1*c1 + b1) as half2, affine or codebook.
template <bool CB>
__device__ __forceinline__ uint32_t deq_pair(uint32_t c0, uint32_t c1, __half2 s, __half2 b,
                                             const float* lut, int lane) {
  if constexpr (CB) {
    const float x0 = lut[c0 * 32 + lane] * __low2float(s);
    const float x1 = lut[c1 * 32 + lane] * __high2float(s);
    return h2u(__floats2half2_rn(x0, x1));
  } else {
    return h2u(__hfma2(codes2h(c0, c1), s, b));
  }
}

// (a & mask) | bits in one LOP3: with both constants as immediates ptxas emits two.
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t bits) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "n"(MASK), "r"(bits));
  return d;
}

// 4-bit codes j = 0..7 of two words a and b as eight exact half2 (code j of a, code j of b):
// a byte permute puts both codes of a pair 16 bits apart, one LOP3 masks them into fp16
// 1024 + c (or 1024 + 16c), one HADD2/HFMA2 removes the offset -- ~1.75 instructions an
// element against ~6 for code_at + codes2h (bench/gpu_notes.md, session 4). ``magic`` is
// 0x64006400 held in a register the compiler cannot see into (see mma_decode_split).
// RAW 2: out[2i + 1] without its HFMA2, 1024 + 16c; RAW 1: out[2i] without its HADD2 too,
// 1024 + c -- the caller takes the offsets out of the product in fp32 (RAWC).
template <int RAW = 0>
__device__ __forceinline__ void nibble_pairs(uint32_t a, uint32_t b, uint32_t magic, __half2 (&out)[8]) {
  const uint32_t lo = __byte_perm(a, b, 0x5410), hi = __byte_perm(a, b, 0x7632);
  const uint32_t src[4] = {lo, lo >> 8, hi, hi >> 8};
  const __half2 k1024 = u2h(0x64006400u), k16th = u2h(0x2c002c00u), km64 = u2h(0xd400d400u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 c_lo = u2h(and_or<0x000f000fu>(src[i], magic));
    const __half2 c_hi = u2h(and_or<0x00f000f0u>(src[i], magic));
    out[2 * i] = RAW == 1 ? c_lo : __hsub2(c_lo, k1024);
    out[2 * i + 1] = RAW ? c_hi : __hfma2(c_hi, k16th, km64);
  }
}

// cp.async of one 16-byte chunk (zero-filled when src_bytes is 0); AL16: the source is
// 16-byte aligned, else four 4-byte copies (any stride stays correct).
template <bool AL16>
__device__ __forceinline__ void cp_chunk(void* dst, const uint32_t* src, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (AL16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s + 4 * i), "l"(src + i), "r"(src_bytes >> 2));
  }
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Staged tiles: row r of CH 16-byte chunks puts chunk j in slot (CH * r + j) ^ (2 * ((r >>
// SH) & 3)) -- the 4 rows that lanes t = 0..3 read at once then fall on different banks
// (conflict-free 32- and 64-bit reads; bench/gpu_notes.md, session 5). A reader's slot is
// L | C, its lane's bits L and compile-time bits C with none in common, so the word
// address is swz_at(swz_lane(L, t, w), C), C constant after unrolling.
__device__ __forceinline__ int swz_lane(int L, int t, int w) { return ((L ^ (2 * t)) << 2) | w; }
__device__ __forceinline__ int swz_at(int lslot, int C) { return (lslot ^ ((C & 6) << 2)) + ((C & ~6) << 2); }

// A warp stages ROWS rows of CH chunks (row r: CH * 16 bytes from src + r * stride words)
// with cp.async; rows at or past n_valid are zero-filled (their scores are masked). Lane l
// copies chunk l % CH of rows l / CH + RPI * k, whose swizzle is a constant per k.
template <int ROWS, int CH, int SH, bool AL16>
__device__ __forceinline__ void stage_rows(uint32_t* buf, const uint32_t* src, int stride, int n_valid, int lane) {
  constexpr int RPI = 32 / CH;  // rows a pass; 2^SH is a multiple of it
  const int r0 = lane / CH;
  const uint32_t* s0 = src + r0 * stride + 4 * (lane % CH);
#pragma unroll
  for (int k = 0; k < ROWS / RPI; ++k) {
    const int sw = 2 * (((RPI * k) >> SH) & 3);
    const bool ok = r0 + RPI * k < n_valid;
    cp_chunk<AL16>(buf + (((lane ^ sw) + 32 * k) << 2), ok ? s0 + RPI * k * stride : src, ok ? 16 : 0);
  }
}

// An A-operand pair from exact codes: as they are when the scales are folded into the
// other operand, else dequantized (s * c + b).
template <bool FOLDED>
__device__ __forceinline__ uint32_t a_pair(__half2 c, __half2 s, __half2 b) {
  if constexpr (FOLDED) {
    return h2u(c);
  } else {
    return h2u(__hfma2(c, s, b));
  }
}

// A value row's NAV words staged at w (shared memory): one 8-byte load for two.
template <int NAV>
__device__ __forceinline__ void staged_words(const uint32_t* w, uint32_t (&vr)[NAV]) {
  if constexpr (NAV == 2) {
    const uint2 w2 = *reinterpret_cast<const uint2*>(w);
    vr[0] = w2.x;
    vr[1] = w2.y;
  } else {
    vr[0] = w[0];
  }
}

// B of the value product for step s: the probabilities sc (rows: step positions g, g + 8),
// times the positions' staged value scales under VFOLD, whose biases then enter vbsum
// through one mma against ones (vs: the staged scales, STEPS * 16 of them, then the biases).
template <bool VFOLD, int STEPS, typename ST>
__device__ __forceinline__ void value_b(const float (&sc)[4], const ST* vs, int s, int g, float vbsum[4],
                                        const uint32_t ones[4], uint32_t& b0, uint32_t& b1) {
  if constexpr (VFOLD) {
    const ST* vsp = vs + s * 16;
    const ST* vbp = vs + (STEPS + s) * 16;
    const float s_lo = tofloat(vsp[g]), s_hi = tofloat(vsp[g + 8]);
    const float b_lo = tofloat(vbp[g]), b_hi = tofloat(vbp[g + 8]);
    b0 = trans8x8(h2u(__floats2half2_rn(sc[0] * s_lo, sc[1] * s_lo)));
    b1 = trans8x8(h2u(__floats2half2_rn(sc[2] * s_hi, sc[3] * s_hi)));
    mma16816(vbsum, ones, trans8x8(h2u(__floats2half2_rn(sc[0] * b_lo, sc[1] * b_lo))),
             trans8x8(h2u(__floats2half2_rn(sc[2] * b_hi, sc[3] * b_hi))));
  } else {
    b0 = trans8x8(h2u(__floats2half2_rn(sc[0], sc[1])));
    b1 = trans8x8(h2u(__floats2half2_rn(sc[2], sc[3])));
  }
}

template <int KQ, int VQ, int KB, int VB, int KGS, int VGS, int D, int WARPS, int STEPS, bool QROT,
          bool FOLD, bool PIPE, bool CVAL, int RD, bool RT, typename QT, typename ST>
__device__ void mma_decode_split(
    const QT* q, const int64_t* q_st, const float* signs, const float* rope, float rpos,
    const uint32_t* kw, const int* kw_sh, const int64_t* kw_st,
    const ST* ks, const int* ks_sh, const int64_t* ks_st, const ST* kbias, const int64_t* kb_st,
    const uint32_t* vw, const int* vw_sh, const int64_t* vw_st,
    const ST* vs, const int64_t* vs_st, const ST* vbias, const int64_t* vb_st,
    const float* lut_k, const float* lut_v, const float* params,
    int n_kv, int G, int split, int S, int row, int b, float* o_part, float* ml_part) {
  constexpr bool KCB = KQ == 1, KCH = KQ == 2, VCB = VQ == 1;
  constexpr int NKB = D / 16;  // k-blocks of the score product
  constexpr int NMT = D / 16;  // m-tiles of the value product
  constexpr int KD = D / 4;    // key dims per lane (per-vector keys)
  constexpr int VD = D / 8;    // value dims per lane
  constexpr int TP = 16 * STEPS;  // positions per super-tile (STEPS steps of 16)
  constexpr int HALF = 8 * STEPS;  // channel keys: rows 0-7 and 8-15 cover one half each
  // Per-vector keys: a lane's KD dims; channel keys: a lane's STEPS positions of a channel.
  constexpr int KBITS = KCH ? STEPS * KB : KD * KB;
  constexpr int NAK = (KBITS + 31) / 32;
  constexpr bool UNAL_K = KBITS % 32 != 0;
  constexpr int NG = (!KCH && !KCB && KD >= KGS) ? KD / KGS : 1;  // key groups per lane
  constexpr int NAV = (VD * VB + 31) / 32;
  constexpr bool UNAL_V = (VD * VB) % 32 != 0;
  static_assert(!KCH || KGS >= HALF, "channel groups must hold a half super-tile");
  static_assert(VGS >= VD && (KCH || KGS >= 4), "group shapes");

  // Scales staged per tile in shared memory: one load per value instead of one per lane
  // that uses it (8 lanes share a key channel or a value position).
  constexpr bool KSTG = KCH && KGS >= TP;  // channel keys: one group of positions a tile
  constexpr bool VSTG = !VCB;               // affine values
  constexpr int NVG = D / VGS;               // value groups per vector
  constexpr int KST = KSTG ? 2 * D : 0;      // staged halves per warp: scales, then biases
  constexpr int VST = VSTG ? 2 * NVG * TP : 0;
  // FOLD: the tensor cores multiply exact codes; a tile's scales go into the other operand
  // (q*s for channel keys, p*s for values with one group a vector) and the biases into one
  // extra mma against a matrix of ones -- no scale/bias HFMA2 per element.
  constexpr bool KFOLD = FOLD && KSTG;
  constexpr bool VFOLD = FOLD && VSTG && NVG == 1;
  // RAWC (the default layout, folded): the tensor cores take the high nibbles as nibble_pairs
  // leaves them, 1024 + 16c (odd key steps, value rows g + 8), and under TQM_RAW_CODES 1 the
  // low ones too, 1024 + c (even steps, rows g); the offsets leave in fp32 through sums of
  // the B operands (qbsum, vssum: one mma against ones a k-block / step) -- 256 (512) fewer
  // HFMA2 (and HADD2) a tile for 16 mma. The low nibbles' offset is 1024 units, the high
  // ones' 64: raw, the low ones doubled the error at 33K and failed at 128K (session 21).
  constexpr int RAWC = PIPE && KFOLD && VFOLD ? TQM_RAW_CODES : 0;
  const uint32_t ones[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  // PIPE (the default layout at D <= 128): each warp stages its tiles' codes in shared
  // memory with cp.async -- the next tile's keys load during this tile's values and the
  // next values during the next keys -- and the next tile's scales into registers: the
  // math no longer waits on its own global loads (bench/gpu_notes.md, session 5).
  static_assert(!PIPE || (KCH && KB == 4 && STEPS == 8 && KSTG && VQ == 0 && VB == 4 && NVG == 1 && D <= 128),
                "PIPE reads the default layout only");
  constexpr int KCHK = TP * KB / 128;         // 16-byte chunks a key row (one channel)
  constexpr int VCHK = D * VB / 128;          // 16-byte chunks a value row (one position)
  constexpr int KSH = D == 128 ? 5 : 4;       // key row r belongs to lane t = r >> KSH
  constexpr int KBUF = PIPE ? D * KCHK * 4 : 0;  // words a warp
  constexpr int VBUF = PIPE ? TP * VCHK * 4 : 0;
  // One pool: the query (before the loop), the staged scales (in it), the warp merge
  // (after). PIPE: all three live in the dynamic shared memory instead (3 blocks an SM).
  // The warp merge's rows: RED_P floats, a lane's run of VD dims shifted 4 floats a group
  // (red_col), so a quarter-warp's 16-byte stores land in distinct banks (unpadded: 4-way).
  constexpr int RED_P = D + 36;
  constexpr int RED_BYTES = WARPS * 8 * RED_P * 4, STG_BYTES = WARPS * (KST + VST) * 2;
  constexpr int POOL = PIPE ? 16 : RED_BYTES > STG_BYTES ? RED_BYTES : STG_BYTES;
  __shared__ __align__(16) unsigned char pool[POOL];
  extern __shared__ __align__(16) uint32_t tq_dyn[];  // PIPE: rings, then staged scales
  __shared__ float lutk_s[KCB ? (1 << KB) * 32 : 1];
  __shared__ float lutv_s[VCB ? (1 << VB) * 32 : 1];
  __shared__ float red_m[WARPS][8], red_l[WARPS][8];
  __shared__ uint2 qfrag_s[PIPE ? NKB * 32 : 1];  // PIPE: the B fragments, read per k-block (16 registers)
  float* red_o = reinterpret_cast<float*>(PIPE ? static_cast<void*>(tq_dyn) : static_cast<void*>(pool));
  static_assert(!PIPE || RED_BYTES <= WARPS * (KBUF + VBUF) * 4, "PIPE: the merge fits in the rings");
  // 8 * D floats <= RED_BYTES; PIPE: the staged scales' area, before the first tile's are
  // stored -- the rings are already loading the first tile by then.
  auto q_s = reinterpret_cast<float (*)[D]>(PIPE ? static_cast<void*>(tq_dyn + WARPS * (KBUF + VBUF))
                                                 : static_cast<void*>(pool));
  static_assert(!PIPE || 8 * D * 4 <= STG_BYTES, "PIPE: the query fits where the scales go");

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_ht = (G + 7) / 8;
  const int hkv = row / n_ht, ht = row % n_ht;  // row: (KV head, head tile) of batch b
  const int N = KCH ? ks_sh[3] * KGS : kw_sh[2];  // body positions (channel: whole groups)
  const float qscale = params[0];  // softmax scale * log2(e)
  int chunk = (N + S - 1) / S;
  chunk = (chunk + TP - 1) / TP * TP;
  const int start = split * chunk;
  const int end = min(N, start + chunk);

  const int v_grp = (VD * g) / VGS;

  const uint32_t* kbase = kw + b * kw_st[0] + hkv * kw_st[1];
  const uint32_t* vbase = vw + b * vw_st[0] + hkv * vw_st[1];
  const ST* ksb = ks + b * ks_st[0] + hkv * ks_st[1];
  const ST* kbb = kbias + b * kb_st[0] + hkv * kb_st[1];
  const ST* vsb = vs + b * vs_st[0] + hkv * vs_st[1];
  const ST* vbb = vbias + b * vb_st[0] + hkv * vb_st[1];
  const int k_nw = kw_sh[3];  // words per stored row
  const int v_nw = vw_sh[3];
  // Strides inside one (batch, head) slice fit in 32 bits: cheaper address arithmetic.
  const int kst = (int)kw_st[2], vst = (int)vw_st[2];

  ST* stg = (PIPE ? reinterpret_cast<ST*>(tq_dyn + WARPS * (KBUF + VBUF)) : reinterpret_cast<ST*>(pool)) +
            warp * (KST + VST);
  uint32_t* kring = tq_dyn + warp * (KBUF + VBUF);
  uint32_t* vring = kring + KBUF;
  // This lane's part of the staged slots it reads: channel t * KD (+ 4kb + c) half g / 4;
  // value row 16t (+ the step's) chunk g * NAV / 4.
  const int kslot = swz_lane(4 * t * KD + (g >> 2), t, g & 3);
  const int vslot = swz_lane(VCHK * 16 * t + ((g * NAV) >> 2), t, (g * NAV) & 3);
  // Staged value scales: [scale|bias][group][step][row k of the step], as the A rows read them.
  auto vstg_slot = [](int o) {
    const int k = KCH ? 8 * (o / HALF) + (o % HALF) / STEPS : o % 16;
    const int s = KCH ? o % STEPS : o / 16;
    return s * 16 + k;
  };
  // PIPE: a tile's scales go global -> registers -> the warp's staging area, the next
  // tile's loaded while this one's math runs (else one load-store per value, at the tile).
  ST ksr[KSTG ? D / 32 : 1][2], vsr[VSTG ? NVG * TP / 32 : 1][2];
  auto load_scales = [&](int P) {
    if constexpr (KSTG) {
      const int grp = min(P / KGS, ks_sh[3] - 1);
#pragma unroll
      for (int e = 0; e < D / 32; ++e) {
        const int d = lane + 32 * e;
        ksr[e][0] = ksb[d * ks_st[2] + grp * ks_st[3]];
        ksr[e][1] = kbb[d * kb_st[2] + grp * kb_st[3]];
      }
    }
    if constexpr (VSTG) {
#pragma unroll
      for (int e = 0; e < NVG * TP / 32; ++e) {
        const int i = lane + 32 * e, grp = i / TP, p = min(P + i % TP, N - 1);
        vsr[e][0] = vsb[p * vs_st[2] + grp * vs_st[3]];
        vsr[e][1] = vbb[p * vb_st[2] + grp * vb_st[3]];
      }
    }
  };
  auto store_scales = [&]() {
    if constexpr (KSTG) {
#pragma unroll
      for (int e = 0; e < D / 32; ++e) {
        stg[lane + 32 * e] = ksr[e][0];
        stg[D + lane + 32 * e] = ksr[e][1];
      }
    }
    if constexpr (VSTG) {
#pragma unroll
      for (int e = 0; e < NVG * TP / 32; ++e) {
        const int i = lane + 32 * e, grp = i / TP, o = vstg_slot(i % TP);
        stg[KST + grp * TP + o] = vsr[e][0];
        stg[KST + (NVG + grp) * TP + o] = vsr[e][1];
      }
    }
  };
  // PIPE: the source is 16-byte aligned (else 4-byte copies; a uniform branch).
  const bool al16 = ((reinterpret_cast<uintptr_t>(kbase) | reinterpret_cast<uintptr_t>(vbase)) & 15) == 0 &&
                    (kst & 3) == 0 && (vst & 3) == 0;
  auto stage_keys = [&](int P) {  // rows: channels; a row's 64 bytes are the tile's 128 positions
    if constexpr (PIPE) {
      if (al16) stage_rows<D, KCHK, KSH, true>(kring, kbase + P * KB / 32, kst, D, lane);
      else stage_rows<D, KCHK, KSH, false>(kring, kbase + P * KB / 32, kst, D, lane);
    }
  };
  auto stage_values = [&](int P) {  // rows: positions (past the body: zero-filled)
    if constexpr (PIPE) {
      if (al16) stage_rows<TP, VCHK, 4, true>(vring, vbase + P * vst, vst, N - P, lane);
      else stage_rows<TP, VCHK, 4, false>(vring, vbase + P * vst, vst, N - P, lane);
    }
  };
  // The block's 8 query heads (x signs when QROT) load into registers first, all at once:
  // behind the first tile's loads, and one at a time, they took ~10 us at 32K (a load-use
  // chain queued behind a wave of tiles; bench/kernel_trace.py, session 13).
  constexpr int QE = 8 * D / (32 * WARPS);  // query elements a thread (blockDim = 32 WARPS)
  static_assert(QE * 32 * WARPS == 8 * D, "the query divides over the block");
  // RD: the query's RoPE here (rope_fusion): each element's partner and frequency load
  // with it, the rotation is done where the query is stored (no load waits on math).
  // RSM (mma_decode.ROPE_SMEM): the partners are read back from shared memory instead.
#ifdef TQM_ROPE_SMEM
  constexpr bool RSM = RD > 0;
#else
  constexpr bool RSM = false;
#endif
  QT qraw[QE], qpar[RD && !RSM ? QE : 1];
  float qsg[QE], qinv[RD ? QE : 1];
#pragma unroll
  for (int e = 0; e < QE; ++e) {
    const int i = threadIdx.x + e * 32 * WARPS, h = i / D, d = i % D, head = ht * 8 + h;
    const int64_t at = b * q_st[0] + (int64_t)(hkv * G + min(head, G - 1)) * q_st[1];
    qraw[e] = q[at + d * q_st[3]];
    if constexpr (RSM) qinv[e] = rope_freq<RD, RT>(d, rope);
    else if constexpr (RD > 0) rope_load<RD, RT>(q, at, q_st[3], d, rope, qpar[e], qinv[e]);
    qsg[e] = QROT ? signs[d] : 1.f;
  }
  // PIPE: the first tile's keys, values and scales start loading before the query is
  // rotated (its latency hides behind that; the rings do not hold the query).
  if constexpr (PIPE) {
    const bool first = start + warp * TP < end;
    if (first) stage_keys(start + warp * TP);
    cp_commit();
    if (first) stage_values(start + warp * TP);
    cp_commit();
    if (first) load_scales(start + warp * TP);
  }

  if constexpr (KCB) {
    for (int i = threadIdx.x; i < (1 << KB) * 32; i += blockDim.x) lutk_s[i] = lut_k[i >> 5];
  }
  if constexpr (VCB) {
    for (int i = threadIdx.x; i < (1 << VB) * 32; i += blockDim.x) lutv_s[i] = lut_v[i >> 5];
  }

  // The block's 8 query heads, rotated here when QROT (x M, M = diag(signs) H / sqrt(D):
  // the signs, then Sylvester-order butterflies) -- no MLX ops for the rotation per step.
  {
#ifdef TQM_TRACE
    float qin = 0.f;  // mark 12: thread 0's query, signs (and RoPE) loads have landed
#pragma unroll
    for (int e = 0; e < QE; ++e) {
      qin += tofloat(qraw[e]) + qsg[e];
      if constexpr (RSM) qin += qinv[e];
      else if constexpr (RD > 0) qin += tofloat(qpar[e]) + qinv[e];
    }
    TQM_MARK_ON(12, qin);
#endif
    if constexpr (RSM) {  // the raw query first; each element's partner read back from it
#pragma unroll
      for (int e = 0; e < QE; ++e) {
        const int i = threadIdx.x + e * 32 * WARPS, h = i / D, d = i % D;
        q_s[h][d] = ht * 8 + h < G ? tofloat(qraw[e]) : 0.f;
      }
      __syncthreads();
      float xr[QE];
#pragma unroll
      for (int e = 0; e < QE; ++e) {
        const int i = threadIdx.x + e * 32 * WARPS, h = i / D, d = i % D;
        int p, f;
        bool lo;
        rope_pair<RD, RT>(d, p, f, lo);
        xr[e] = rope_mix(q_s[h][d], q_s[h][p], qinv[e], lo, rpos) * qsg[e];
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < QE; ++e) {
        const int i = threadIdx.x + e * 32 * WARPS;
        q_s[i / D][i % D] = xr[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < QE; ++e) {
        const int i = threadIdx.x + e * 32 * WARPS, h = i / D, d = i % D;
        if constexpr (RD > 0) {
          const float x = rope_apply<RD, RT>(qraw[e], qpar[e], qinv[e], d, rpos);
          q_s[h][d] = ht * 8 + h < G ? x * qsg[e] : 0.f;
        } else {
          q_s[h][d] = ht * 8 + h < G ? tofloat(qraw[e]) * qsg[e] : 0.f;
        }
      }
    }
    __syncthreads();
    if constexpr (QROT) {
      constexpr int E = 8 * D / (32 * WARPS);
      float x[E];
      for (int hs = 1; hs < D; hs <<= 1) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int i = threadIdx.x + e * 32 * WARPS, h = i / D, d = i % D;
          const float a = q_s[h][d], c = q_s[h][d ^ hs];
          x[e] = (d & hs) ? (c - a) : (a + c);
        }
        __syncthreads();
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int i = threadIdx.x + e * 32 * WARPS;
          q_s[i / D][i % D] = x[e];
        }
        __syncthreads();
      }
    }
  }
  // B operand of the score product: lane (g, t) holds head g, dims t*KD + 4kb + {0,1},{2,3}.
  uint32_t qf[NKB][2];
  {
    const float qm = QROT ? qscale * rsqrtf((float)D) : qscale;
#pragma unroll
    for (int kb = 0; kb < NKB; ++kb) {
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2) {
        const int d = t * KD + 4 * kb + 2 * c2;
        qf[kb][c2] = h2u(__floats2half2_rn(q_s[g][d] * qm, q_s[g][d + 1] * qm));
      }
      if (PIPE && warp == 0) qfrag_s[kb * 32 + lane] = make_uint2(qf[kb][0], qf[kb][1]);
    }
  }

  float m_run[2] = {TQM_NEG_INF, TQM_NEG_INF};
  float l_run[2] = {0.f, 0.f};
  float o[NMT][4];
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
  float vbsum[4] = {0.f, 0.f, 0.f, 0.f};  // VFOLD: sum of p * bias per head (every row the same)
  float vssum[4] = {0.f, 0.f, 0.f, 0.f};  // RAWC: sum of p * scale per head (every row the same)

  uint32_t magic = 0x64006400u;  // fp16 1024 in both halves, kept in a register:
  asm volatile("" : "+r"(magic));  // opaque, so each and_or stays one LOP3
  __syncthreads();  // q_s is read: its space now holds the staged scales
  TQM_MARK(2);
  if constexpr (PIPE) {  // the first tile's scales (loaded before the query)
    if (start + warp * TP < end) store_scales();
  }

  for (int P0 = start + warp * TP; P0 < end; P0 += WARPS * TP) {
    const int P_next = P0 + WARPS * TP;
    if constexpr (PIPE) {
      cp_wait<1>();  // this tile's keys (its values may still be in flight)
      __syncwarp();
      if (P0 == start && warp == 0) TQM_MARK(3);
    } else if constexpr (KSTG || VSTG) {
      __syncwarp();  // the previous tile's reads are done
      if constexpr (KSTG) {
        const int grp = min(P0 / KGS, ks_sh[3] - 1);
        for (int d = lane; d < D; d += 32) {
          stg[d] = ksb[d * ks_st[2] + grp * ks_st[3]];
          stg[D + d] = kbb[d * kb_st[2] + grp * kb_st[3]];
        }
      }
      if constexpr (VSTG) {
        for (int i = lane; i < NVG * TP; i += 32) {
          const int grp = i / TP, o = vstg_slot(i % TP), p = min(P0 + i % TP, N - 1);
          stg[KST + grp * TP + o] = vsb[p * vs_st[2] + grp * vs_st[3]];
          stg[KST + (NVG + grp) * TP + o] = vbb[p * vb_st[2] + grp * vb_st[3]];
        }
      }
      __syncwarp();
    }
    // ---------------------------------------------------------------- scores S^T
    float sc[STEPS][4];
#pragma unroll
    for (int s = 0; s < STEPS; ++s) sc[s][0] = sc[s][1] = sc[s][2] = sc[s][3] = 0.f;

    float kbsum[4] = {0.f, 0.f, 0.f, 0.f};  // KFOLD: q . bias per head (every row the same)
    float qbsum[4] = {0.f, 0.f, 0.f, 0.f};  // RAWC: the sum of q * scale per head
    if constexpr (KCH) {
      // Row g of step s is position P0 + STEPS*g + s, row g+8 is P0 + HALF + STEPS*g + s.
      int grp[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) grp[r] = min((P0 + HALF * r) / KGS, ks_sh[3] - 1);
      // PIPE: k-blocks in a loop, not unrolled -- every operand of a k-block is read from
      // shared memory (the query's fragments too), and the loop body is 1/NKB of the code:
      // the warps of an SM then share ~25 KB of loop instead of ~48 KB (ncu session 8:
      // ~10 % of stalls "no instruction").
#pragma unroll (PIPE ? 1 : NKB)
      for (int kb = 0; kb < NKB; ++kb) {
        uint32_t cw[2][4][NAK];
        __half2 sc2[2][2], bi2[2][2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int d = t * KD + 4 * kb + c;
            if constexpr (PIPE) {  // word 8r + g of channel d's staged row (slot 4d + 2r + g/4)
              cw[r][c][0] = kring[swz_at(kslot, 4 * (4 * kb + c) + 2 * r)];
            } else {
              load_bits<NAK, UNAL_K>(kbase + d * kst, (P0 + HALF * r + STEPS * g) * KB, k_nw, cw[r][c]);
            }
          }
#pragma unroll
          for (int c2 = 0; c2 < 2; ++c2) {
            const int d = t * KD + 4 * kb + 2 * c2;
            if constexpr (KSTG) {
              sc2[r][c2] = *reinterpret_cast<const __half2*>(stg + d);
              bi2[r][c2] = *reinterpret_cast<const __half2*>(stg + D + d);
              continue;
            }
            const int64_t o0 = d * ks_st[2] + grp[r] * ks_st[3];
            const int64_t o1 = (d + 1) * ks_st[2] + grp[r] * ks_st[3];
            const int64_t p0 = d * kb_st[2] + grp[r] * kb_st[3];
            const int64_t p1 = (d + 1) * kb_st[2] + grp[r] * kb_st[3];
            sc2[r][c2] = __floats2half2_rn(tofloat(ksb[o0]), tofloat(ksb[o1]));
            bi2[r][c2] = __floats2half2_rn(tofloat(kbb[p0]), tofloat(kbb[p1]));
          }
        }
        uint32_t q0 = qf[kb][0], q1 = qf[kb][1];
        if constexpr (PIPE) {
          const uint2 qq = qfrag_s[kb * 32 + lane];
          q0 = qq.x;
          q1 = qq.y;
        }
        uint32_t qb0 = q0, qb1 = q1;  // B of the score product
        if constexpr (KFOLD) {  // one group a tile: sc2/bi2 are the same for both row halves
          qb0 = h2u(__hmul2(u2h(q0), sc2[0][0]));
          qb1 = h2u(__hmul2(u2h(q1), sc2[0][1]));
          mma16816(kbsum, ones, h2u(__hmul2(u2h(q0), bi2[0][0])), h2u(__hmul2(u2h(q1), bi2[0][1])));
          if constexpr (RAWC) mma16816(qbsum, ones, qb0, qb1);
        }
        if constexpr (KB == 4 && STEPS == 8) {  // one word = the 8 steps of a channel
          __half2 kp[2][2][8];  // [row half][channel pair][step]
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            nibble_pairs<RAWC>(cw[r][0][0], cw[r][1][0], magic, kp[r][0]);
            nibble_pairs<RAWC>(cw[r][2][0], cw[r][3][0], magic, kp[r][1]);
          }
#pragma unroll
          for (int s = 0; s < STEPS; ++s) {
            uint32_t a[4];
            a[0] = a_pair<KFOLD>(kp[0][0][s], sc2[0][0], bi2[0][0]);
            a[1] = a_pair<KFOLD>(kp[1][0][s], sc2[1][0], bi2[1][0]);
            a[2] = a_pair<KFOLD>(kp[0][1][s], sc2[0][1], bi2[0][1]);
            a[3] = a_pair<KFOLD>(kp[1][1][s], sc2[1][1], bi2[1][1]);
            mma16816(sc[s], a, qb0, qb1);
          }
        } else {
#pragma unroll
          for (int s = 0; s < STEPS; ++s) {
            uint32_t a[4];
            a[0] = a_pair<KFOLD>(codes2h(code_at<KB>(cw[0][0], s), code_at<KB>(cw[0][1], s)), sc2[0][0], bi2[0][0]);
            a[1] = a_pair<KFOLD>(codes2h(code_at<KB>(cw[1][0], s), code_at<KB>(cw[1][1], s)), sc2[1][0], bi2[1][0]);
            a[2] = a_pair<KFOLD>(codes2h(code_at<KB>(cw[0][2], s), code_at<KB>(cw[0][3], s)), sc2[0][1], bi2[0][1]);
            a[3] = a_pair<KFOLD>(codes2h(code_at<KB>(cw[1][2], s), code_at<KB>(cw[1][3], s)), sc2[1][1], bi2[1][1]);
            mma16816(sc[s], a, qb0, qb1);
          }
        }
      }
    } else {
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        uint32_t kr[2][NAK];
        float ksc[2][NG], kbi[2][NG];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int p = min(P0 + 16 * s + g + 8 * r, N - 1);
          load_bits<NAK, UNAL_K>(kbase + p * kst, t * KD * KB, k_nw, kr[r]);
#pragma unroll
          for (int j = 0; j < NG; ++j) {
            if constexpr (KCB) {
              ksc[r][j] = tofloat(ksb[p * ks_st[2]]);
              kbi[r][j] = 0.f;
            } else {
              const int gi = (t * KD + j * KGS) / KGS;
              ksc[r][j] = tofloat(ksb[p * ks_st[2] + gi * ks_st[3]]);
              kbi[r][j] = tofloat(kbb[p * kb_st[2] + gi * kb_st[3]]);
            }
          }
        }
#pragma unroll
        for (int kb = 0; kb < NKB; ++kb) {
          const int j = NG > 1 ? (4 * kb) / KGS : 0;
          uint32_t a[4];
#pragma unroll
          for (int c2 = 0; c2 < 2; ++c2) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const __half2 s2 = __float2half2_rn(ksc[r][j]);
              const __half2 b2 = __float2half2_rn(kbi[r][j]);
              a[2 * c2 + r] = deq_pair<KCB>(code_at<KB>(kr[r], 4 * kb + 2 * c2),
                                            code_at<KB>(kr[r], 4 * kb + 2 * c2 + 1), s2, b2, lutk_s, lane);
            }
          }
          mma16816(sc[s], a, qf[kb][0], qf[kb][1]);
        }
      }
    }

    if constexpr (RAWC) {  // odd steps: sum (1024 + 16c) qb; even: sum (1024 + c) qb (RAWC 1)
      float ce[4], co[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        ce[e] = RAWC == 1 ? fmaf(-1024.f, qbsum[e], kbsum[e]) : kbsum[e];
        co[e] = fmaf(-64.f, qbsum[e], kbsum[e]);
      }
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[s][e] = (s & 1) ? fmaf(sc[s][e], 0.0625f, co[e]) : sc[s][e] + ce[e];
      }
    } else if constexpr (KFOLD) {
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[s][e] += kbsum[e];
      }
    }
    if constexpr (PIPE) {
      __syncwarp();  // every lane has read this tile's keys: the ring takes the next tile's
      if (P_next < end) stage_keys(P_next);
      cp_commit();
      if (P_next < end) load_scales(P_next);
    }
    // ---------------------------------------------------------------- online softmax
    float mt2[2] = {TQM_NEG_INF, TQM_NEG_INF};
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int pos = KCH ? P0 + HALF * r + STEPS * g + s : P0 + 16 * s + g + 8 * r;
        if (pos >= end) sc[s][2 * r] = sc[s][2 * r + 1] = TQM_NEG_INF;
        mt2[0] = fmaxf(mt2[0], sc[s][2 * r]);
        mt2[1] = fmaxf(mt2[1], sc[s][2 * r + 1]);
      }
    }
    // Lazy rescaling: the running max moves only when a score of the tile passes it by more
    // than TAU (base 2), found by one warp vote -- most tiles skip the shuffle chain and the
    // accumulators' rescale (ncu, session 8: ~7 % of stalls wait on those shuffles). The
    // probabilities stay <= 2^TAU, safe in fp16 also times a value scale (VFOLD).
    constexpr float TAU = 4.f;
    const bool grow = mt2[0] > m_run[0] + TAU || mt2[1] > m_run[1] + TAU;  // first tile: -inf
    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) mt2[i] = fmaxf(mt2[i], __shfl_xor_sync(0xffffffffu, mt2[i], off));
        const float m_new = fmaxf(m_run[i], mt2[i]);  // finite: row 0 of step 0 is valid
        const float alpha = exp2f(m_run[i] - m_new);
        m_run[i] = m_new;
        l_run[i] *= alpha;
#pragma unroll
        for (int mt = 0; mt < NMT; ++mt) {
          o[mt][i] *= alpha;
          o[mt][2 + i] *= alpha;
        }
        vbsum[i] *= alpha;
        vbsum[2 + i] *= alpha;
        vssum[i] *= alpha;
        vssum[2 + i] *= alpha;
      }
    }
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[s][e] = exp2f(sc[s][e] - m_run[e & 1]);
        l_run[e & 1] += sc[s][e];
      }
    }

    // ---------------------------------------------------------------- values O^T += V^T P^T
    if constexpr (PIPE) {
      cp_wait<1>();  // this tile's values (the next tile's keys may still be in flight)
      __syncwarp();
    }
    if constexpr (PIPE && CVAL) {
      // CVAL: the value product's steps in a loop, not unrolled (the B fragments made first,
      // unrolled, then shifted down a step each pass): ~1/STEPS of its code, so the tile
      // loop's code fits closer to the instruction cache (ncu session 16: "no instruction"
      // the top stall). Else every step unrolled below.
      uint32_t pbr[STEPS][2];
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        value_b<VFOLD, STEPS>(sc[s], stg + KST, s, g, vbsum, ones, pbr[s][0], pbr[s][1]);
        if constexpr (RAWC) mma16816(vssum, ones, pbr[s][0], pbr[s][1]);
      }
#pragma unroll 1
      for (int s = 0; s < STEPS; ++s) {
        // swz_at(vslot, VCHK * (s + c)) for c a multiple of 8: c adds whole rows (no bits 1-2)
        const uint32_t* vrow = vring + swz_at(vslot, VCHK * s);
        uint32_t vr[4][NAV];
#pragma unroll
        for (int i = 0; i < 4; ++i) staged_words<NAV>(vrow + 4 * VCHK * (64 * (i >> 1) + 8 * (i & 1)), vr[i]);
        __half2 s01, s23, b01, b23;
        if constexpr (VFOLD) {
          s01 = s23 = b01 = b23 = __float2half2_rn(0.f);  // not read
        } else {
          const ST* vsp = stg + KST + s * 16 + 2 * t;
          const ST* vbp = stg + KST + (STEPS + s) * 16 + 2 * t;
          s01 = *reinterpret_cast<const __half2*>(vsp);
          s23 = *reinterpret_cast<const __half2*>(vsp + 8);
          b01 = *reinterpret_cast<const __half2*>(vbp);
          b23 = *reinterpret_cast<const __half2*>(vbp + 8);
        }
#pragma unroll
        for (int w = 0; w < NAV; ++w) {
          __half2 p01[8], p23[8];
          nibble_pairs<RAWC>(vr[0][w], vr[1][w], magic, p01);
          nibble_pairs<RAWC>(vr[2][w], vr[3][w], magic, p23);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t a[4];
            a[0] = a_pair<VFOLD>(p01[2 * j], s01, b01);
            a[1] = a_pair<VFOLD>(p01[2 * j + 1], s01, b01);
            a[2] = a_pair<VFOLD>(p23[2 * j], s23, b23);
            a[3] = a_pair<VFOLD>(p23[2 * j + 1], s23, b23);
            mma16816(o[4 * w + j], a, pbr[0][0], pbr[0][1]);
          }
        }
#pragma unroll
        for (int j = 0; j + 1 < STEPS; ++j) {
          pbr[j][0] = pbr[j + 1][0];
          pbr[j][1] = pbr[j + 1][1];
        }
      }
    }
#pragma unroll
    for (int s = 0; s < (PIPE && CVAL ? 0 : STEPS); ++s) {
      uint32_t pb0, pb1;
      value_b<VFOLD, STEPS>(sc[s], stg + KST, s, g, vbsum, ones, pb0, pb1);
      if constexpr (RAWC) mma16816(vssum, ones, pb0, pb1);
      // This lane's A rows use step positions k = 2t, 2t+1, 2t+8, 2t+9.
      uint32_t vr[4][NAV];
      float vsc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = 2 * t + (i & 1) + 8 * (i >> 1);
        const int pos = KCH ? P0 + HALF * (k >> 3) + STEPS * (k & 7) + s : P0 + 16 * s + k;
        const int p = min(pos, N - 1);
        if constexpr (PIPE) {  // words g * NAV.. of the position's staged row (t's part in vslot)
          staged_words<NAV>(vring + swz_at(vslot, VCHK * (64 * (i >> 1) + 8 * (i & 1) + s)), vr[i]);
        } else {
          load_bits<NAV, UNAL_V>(vbase + p * vst, VD * g * VB, v_nw, vr[i]);
        }
        if constexpr (VCB) vsc[i] = tofloat(vsb[p * vs_st[2]]);
      }
      __half2 s01, s23, b01, b23;
      if constexpr (VFOLD) {
        s01 = s23 = b01 = b23 = __float2half2_rn(0.f);  // not read
      } else if constexpr (VSTG) {
        const ST* vsp = stg + KST + (v_grp * STEPS + s) * 16 + 2 * t;
        const ST* vbp = stg + KST + ((NVG + v_grp) * STEPS + s) * 16 + 2 * t;
        s01 = *reinterpret_cast<const __half2*>(vsp);
        s23 = *reinterpret_cast<const __half2*>(vsp + 8);
        b01 = *reinterpret_cast<const __half2*>(vbp);
        b23 = *reinterpret_cast<const __half2*>(vbp + 8);
      } else {
        s01 = __floats2half2_rn(vsc[0], vsc[1]);
        s23 = __floats2half2_rn(vsc[2], vsc[3]);
        b01 = b23 = __float2half2_rn(0.f);
      }
      if constexpr (!VCB && VB == 4) {  // word w holds dims 8w..8w+7 of the lane's run
#pragma unroll
        for (int w = 0; w < NAV; ++w) {
          __half2 p01[8], p23[8];  // (position 2t, 2t+1) and (2t+8, 2t+9) of each dim
          nibble_pairs<RAWC>(vr[0][w], vr[1][w], magic, p01);
          nibble_pairs<RAWC>(vr[2][w], vr[3][w], magic, p23);
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // m-tile 4w + j: dims 8w + 2j (rows g), + 1 (rows g + 8)
            uint32_t a[4];
            a[0] = a_pair<VFOLD>(p01[2 * j], s01, b01);
            a[1] = a_pair<VFOLD>(p01[2 * j + 1], s01, b01);
            a[2] = a_pair<VFOLD>(p23[2 * j], s23, b23);
            a[3] = a_pair<VFOLD>(p23[2 * j + 1], s23, b23);
            mma16816(o[4 * w + j], a, pb0, pb1);
          }
        }
      } else {
#pragma unroll
        for (int mt = 0; mt < NMT; ++mt) {
          uint32_t a[4];
          if constexpr (VFOLD) {
            a[0] = h2u(codes2h(code_at<VB>(vr[0], 2 * mt), code_at<VB>(vr[1], 2 * mt)));
            a[1] = h2u(codes2h(code_at<VB>(vr[0], 2 * mt + 1), code_at<VB>(vr[1], 2 * mt + 1)));
            a[2] = h2u(codes2h(code_at<VB>(vr[2], 2 * mt), code_at<VB>(vr[3], 2 * mt)));
            a[3] = h2u(codes2h(code_at<VB>(vr[2], 2 * mt + 1), code_at<VB>(vr[3], 2 * mt + 1)));
          } else {
            a[0] = deq_pair<VCB>(code_at<VB>(vr[0], 2 * mt), code_at<VB>(vr[1], 2 * mt), s01, b01, lutv_s, lane);
            a[1] = deq_pair<VCB>(code_at<VB>(vr[0], 2 * mt + 1), code_at<VB>(vr[1], 2 * mt + 1), s01, b01, lutv_s, lane);
            a[2] = deq_pair<VCB>(code_at<VB>(vr[2], 2 * mt), code_at<VB>(vr[3], 2 * mt), s23, b23, lutv_s, lane);
            a[3] = deq_pair<VCB>(code_at<VB>(vr[2], 2 * mt + 1), code_at<VB>(vr[3], 2 * mt + 1), s23, b23, lutv_s, lane);
          }
          mma16816(o[mt], a, pb0, pb1);
        }
      }
    }
    if constexpr (PIPE) {
      __syncwarp();  // every lane has read this tile's values and scales
      if (P_next < end) {
        stage_values(P_next);
        store_scales();
      }
      cp_commit();
    }
  }

  // ---------------------------------------------------------------- merge the warps
  TQM_MARK_WARP(4);
  if constexpr (RAWC) {  // rows g + 8: sum (1024 + 16c) p s; rows g: sum (1024 + c) p s (RAWC 1)
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if constexpr (RAWC == 1) o[mt][e] = fmaf(-1024.f, vssum[e], o[mt][e]);
        o[mt][2 + e] = fmaf(-1024.f, vssum[2 + e], o[mt][2 + e]) * 0.0625f;
      }
    }
  }
  if constexpr (PIPE) cp_wait<0>();  // nothing may land in the ring once it holds red_o
  __syncthreads();  // every warp is done with its staged scales: the pool becomes red_o
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], off);
  }
  if (g == 0) {
    red_m[warp][2 * t] = m_run[0];
    red_m[warp][2 * t + 1] = m_run[1];
    red_l[warp][2 * t] = l_run[0];
    red_l[warp][2 * t + 1] = l_run[1];
  }
  // A lane's VD dims of heads 2t and 2t + 1, four at a time (m-tiles 2j and 2j + 1).
  auto red_col = [](int d) { return d + 4 * (d / VD); };
#pragma unroll
  for (int j = 0; j < NMT / 2; ++j) {
    float* r0 = red_o + (warp * 8 + 2 * t) * RED_P + red_col(VD * g + 4 * j);
    *reinterpret_cast<float4*>(r0) = make_float4(o[2 * j][0] + vbsum[0], o[2 * j][2] + vbsum[2],
                                                 o[2 * j + 1][0] + vbsum[0], o[2 * j + 1][2] + vbsum[2]);
    *reinterpret_cast<float4*>(r0 + RED_P) = make_float4(o[2 * j][1] + vbsum[1], o[2 * j][3] + vbsum[3],
                                                         o[2 * j + 1][1] + vbsum[1], o[2 * j + 1][3] + vbsum[3]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 8 * D; i += blockDim.x) {
    const int h = i / D, d = i % D;
    const int head = ht * 8 + h;
    if (head >= G) continue;
    float M = TQM_NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, red_m[w][h]);
    float L = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float mw = red_m[w][h];
      if (mw == TQM_NEG_INF) continue;  // a warp with no positions
      const float f = exp2f(mw - M);
      L = fmaf(red_l[w][h], f, L);
      acc = fmaf(red_o[(w * 8 + h) * RED_P + red_col(d)], f, acc);
    }
    const int64_t row = ((int64_t)(b * n_kv + hkv) * G + head) * S + split;
    o_part[row * D + d] = acc;
    if (d == 0) {
      ml_part[row * 2] = M;
      ml_part[row * 2 + 1] = L;
    }
  }
  TQM_MARK(8);
}


// One block of the split kernel's grid past its splits: chunk `chunk` (16 positions) of the
// full-precision sink (kh/vh, chunks first) and tail (kt/vt) for the block's <= 8 query
// heads. The chunk's keys and values are read once for all heads (GQA), staged in dynamic
// shared memory; thread (head, position) scores, 16-lane shuffles take the max and sum, and
// the unnormalised partial (o, m, l) goes to fp_o / fp_ml in model space, as the separate
// fp kernel of session 6 wrote it (one launch a layer fewer: bench/gpu_notes.md, session 7).
// APPEND: the tail's last kn_sh[2] positions are not in kt/vt yet: read from kn/vn and
// written there by the row's first head tile (cache.TailAppend; session 14).
// TLEN: kt/vt are the whole tail buffers, the tail their first params[1] positions (no
// slice op a decode step to cut them: cache.BufferedTail).
template <int D, int NT, bool HAS_HEAD, bool HAS_TAIL, bool APPEND, bool TLEN, int RD, bool RT, typename QT,
          typename FT>
__device__ void fp_chunk(
    const QT* q, const int64_t* q_st, const float* rope, float rpos,
    const FT* kh, const int* kh_sh, const int64_t* kh_st, const FT* vh, const int64_t* vh_st,
    const FT* kt, const int* kt_sh, const int64_t* kt_st, const FT* vt, const int64_t* vt_st,
    const FT* kn, const int* kn_sh, const int64_t* kn_st, const FT* vn, const int64_t* vn_st,
    const float* params, int n_kv, int G, int chunk, int n_chunks, int row, int b, float* fp_o,
    float* fp_ml) {
  constexpr int C = TQM_FP_CHUNK, KP = D + 1;  // keys and queries padded a float a row: no bank conflicts
  static_assert(C == 16, "a chunk's scores reduce over 16 lanes (the shuffles below)");
  // Dynamic shared memory (mma_decode.fp_chunk_smem): keys, values, queries, weights.
  extern __shared__ __align__(16) float fp_s[];
  float* k_s = fp_s;           // [C][KP]
  float* v_s = k_s + C * KP;   // [C][D]
  float* q_s = v_s + C * D;    // [8][KP]
  float* p_s = q_s + 8 * KP;   // [8][C]
  const int tid = threadIdx.x;  // NT: blockDim.x
  const int n_ht = (G + 7) / 8;
  const int hkv = row / n_ht, ht = row % n_ht;
  const int nh = min(8, G - ht * 8);  // query heads of this tile
  const int FH = HAS_HEAD ? kh_sh[2] : 0;
  const int FTL = HAS_TAIL ? tail_len<TLEN>(params, kt_sh) : 0;
  const int HC = (FH + C - 1) / C;
  const bool head = chunk < HC;
  const int f0 = (head ? chunk : chunk - HC) * C;
  const int n = min(C, (head ? FH : FTL) - f0);  // valid positions of this chunk
  const FT* kb = head ? kh + b * kh_st[0] + hkv * kh_st[1] : kt + b * kt_st[0] + hkv * kt_st[1];
  const FT* vb = head ? vh + b * vh_st[0] + hkv * vh_st[1] : vt + b * vt_st[0] + hkv * vt_st[1];
  const int64_t k2 = head ? kh_st[2] : kt_st[2], k3 = head ? kh_st[3] : kt_st[3];
  const int64_t v2 = head ? vh_st[2] : vt_st[2], v3 = head ? vh_st[3] : vt_st[3];
  const int hq0 = hkv * G + ht * 8;
  const int fresh = APPEND && !head ? FTL - kn_sh[2] - f0 : C;  // chunk rows from kn/vn on
  const FT* knb = APPEND ? kn + b * kn_st[0] + hkv * kn_st[1] : nullptr;
  const FT* vnb = APPEND ? vn + b * vn_st[0] + hkv * vn_st[1] : nullptr;
  // Every load of a thread in flight before any is stored (the stores to shared memory
  // would otherwise wait on each load in turn: ~16 round trips; session 13).
  // In batches of at most 8 a thread (D 256: fewer registers than the split path's).
  constexpr int KE = C * D / NT, QN = 8 * D / NT, KBT = KE < 8 ? KE : 8;
  static_assert(KE % KBT == 0 && KE * NT == C * D && QN * NT == 8 * D, "a chunk divides over the block");
  // RD: the query's and the new key's RoPE here (rope_fusion), the query's as the split
  // blocks do it (partners and frequencies loaded with it, rotated where it is stored).
  QT qr[QN], qp[RD ? QN : 1];
  float qinv[RD ? QN : 1];
#pragma unroll
  for (int e = 0; e < QN; ++e) {
    const int i = tid + e * NT, h = min(i / D, nh - 1), d = i % D;
    const int64_t at = b * q_st[0] + (int64_t)(hq0 + h) * q_st[1];
    qr[e] = q[at + d * q_st[3]];
    if constexpr (RD > 0) rope_load<RD, RT>(q, at, q_st[3], d, rope, qp[e], qinv[e]);
  }
#pragma unroll
  for (int e0 = 0; e0 < KE; e0 += KBT) {
    FT kr[KBT], vr[KBT], kp[RD ? KBT : 1];  // RD: a new key's partners and frequencies
    float kinv[RD ? KBT : 1];                // (loaded with it, rotated where it is stored)
#pragma unroll
    for (int e = 0; e < KBT; ++e) {
      const int i = tid + (e0 + e) * NT, j = min(i / D, n - 1), d = i % D;  // past n: zeroed below
      if (APPEND && j >= fresh) {
        kr[e] = knb[(j - fresh) * kn_st[2] + d * kn_st[3]];
        if constexpr (RD > 0)
          rope_load<RD, RT>(knb, (j - fresh) * kn_st[2], kn_st[3], d, rope, kp[e], kinv[e]);
        vr[e] = vnb[(j - fresh) * vn_st[2] + d * vn_st[3]];
      } else {
        kr[e] = kb[(f0 + j) * k2 + d * k3];
        vr[e] = vb[(f0 + j) * v2 + d * v3];
      }
    }
#pragma unroll
    for (int e = 0; e < KBT; ++e) {
      const int i = tid + (e0 + e) * NT, j = i / D, d = i % D;
      if constexpr (RD > 0) {
        if (APPEND && j >= fresh && j < n)  // (the new positions end at the query's)
          kr[e] = static_cast<FT>(
              rope_apply<RD, RT>(kr[e], kp[e], kinv[e], d, rpos - (kn_sh[2] - 1 - (j - fresh))));
      }
      k_s[j * KP + d] = j < n ? tofloat(kr[e]) : 0.f;
      v_s[j * D + d] = j < n ? tofloat(vr[e]) : 0.f;
      if (APPEND && ht == 0 && j >= fresh && j < n) {  // no other block of this launch reads them
        const_cast<FT*>(kb)[(f0 + j) * k2 + d * k3] = kr[e];
        const_cast<FT*>(vb)[(f0 + j) * v2 + d * v3] = vr[e];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < QN; ++e) {
    const int i = tid + e * NT, h = i / D, d = i % D;
    if constexpr (RD > 0) {
      q_s[h * KP + d] = h < nh ? rope_apply<RD, RT>(qr[e], qp[e], qinv[e], d, rpos) : 0.f;
    } else {
      q_s[h * KP + d] = h < nh ? tofloat(qr[e]) : 0.f;
    }
  }
  __syncthreads();
  const int64_t row0 = (int64_t)b * n_kv * G + hq0;  // b * Hq + first head
  for (int p = tid; p < 8 * C; p += NT) {  // whole warps: the shuffles stay in 16 lanes
    const int h = p / C, j = p % C;
    float s = 0.f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) s = fmaf(q_s[h * KP + d], k_s[j * KP + d], s);
    s = j < n ? s * params[0] : TQM_NEG_INF;  // params[0]: softmax scale * log2(e)
    float m = s;
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float e = exp2f(s - m);  // m is finite: position 0 of a chunk is valid
    float l = e;
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    p_s[h * C + j] = e;
    if (j == 0 && h < nh) {
      const int64_t part = (row0 + h) * n_chunks + chunk;
      fp_ml[part * 2] = m;
      fp_ml[part * 2 + 1] = l;
    }
  }
  __syncthreads();
  for (int i = tid; i < 8 * D; i += NT) {
    const int h = i / D, d = i % D;
    if (h >= nh) continue;
    float o = 0.f;
#pragma unroll
    for (int j = 0; j < C; ++j) o = fmaf(p_s[h * C + j], v_s[j * D + d], o);
    fp_o[((row0 + h) * n_chunks + chunk) * D + d] = o;
  }
}

// E floats of a lane from L2 (__ldcg: other blocks of this launch wrote them, L1 may hold
// stale lines), as float4 / float2 loads.
template <int E>
__device__ __forceinline__ void load_lane(const float* p, float (&v)[E]) {
  static_assert(E % 2 == 0, "head_dim 64, 128 or 256");
  if constexpr (E % 4 == 0) {
#pragma unroll
    for (int i = 0; i < E / 4; ++i) {
      const float4 x = __ldcg(reinterpret_cast<const float4*>(p) + i);
      v[4 * i] = x.x, v[4 * i + 1] = x.y, v[4 * i + 2] = x.z, v[4 * i + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
      const float2 x = __ldcg(reinterpret_cast<const float2*>(p) + i);
      v[2 * i] = x.x, v[2 * i + 1] = x.y;
    }
  }
}

// merge_splits for one warp and NH heads at once (rows ``row``): lane l merges
// coordinates l*E .. l*E+E-1 of each row's S partials, U splits' loads of every head in
// flight together (a round of loads costs ~0.5 us of latency, the tail of the fused
// join); M, L as merge_splits (the same in every lane).
template <int E, int NH>
__device__ __forceinline__ void merge_lanes(const float* o_part, const float* ml_part, const int64_t (&row)[NH],
                                            int S, int lane, float (&acc)[NH][E], float (&M)[NH],
                                            float (&L)[NH]) {
  // <= 64 floats a lane in flight, at most 16 splits (8 with two heads)
  constexpr int D = 32 * E, U = 64 / (NH * E) < 16 / NH ? 64 / (NH * E) : 16 / NH;
#pragma unroll
  for (int h = 0; h < NH; ++h) {
    M[h] = TQM_NEG_INF;
    L[h] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
  }
  for (int s0 = 0; s0 < S; s0 += U) {
    float m[NH][U], l[NH][U], o[NH][U][E];
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      const float2* ml = reinterpret_cast<const float2*>(ml_part + row[h] * S * 2);
      const float* op = o_part + row[h] * S * D + lane * E;
#pragma unroll
      for (int j = 0; j < U; ++j) {
        const bool ok = s0 + j < S;
        const float2 x = __ldcg(ml + (ok ? s0 + j : 0));  // same address in every lane
        m[h][j] = ok ? x.x : TQM_NEG_INF;
        l[h][j] = ok ? x.y : 0.f;
        load_lane<E>(op + (int64_t)(ok ? s0 + j : 0) * D, o[h][j]);
      }
    }
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      float mb = M[h];
#pragma unroll
      for (int j = 0; j < U; ++j) mb = fmaxf(mb, m[h][j]);
      if (mb == TQM_NEG_INF) continue;  // only empty splits so far
      const float r = exp2f(M[h] - mb);  // 0 while M is -inf
      L[h] *= r;
      M[h] = mb;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] *= r;
#pragma unroll
      for (int j = 0; j < U; ++j) {
        const float w = exp2f(m[h][j] - mb);  // 0 for an empty split (and one past S)
        L[h] = fmaf(l[h][j], w, L[h]);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = fmaf(o[h][j][e], w, acc[h][e]);
      }
    }
  }
}

// Sylvester-order Hadamard of a warp's 32 * E coordinates (lane l holds l*E ..): pairs
// within a lane in registers, across lanes by shuffles -- no shared memory, no barrier.
template <int E>
__device__ __forceinline__ void hadamard_lane(float (&x)[E], int lane) {
#pragma unroll
  for (int hs = 1; hs < E; hs <<= 1) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (e & hs) continue;
      const float a = x[e], b = x[e | hs];
      x[e] = a + b;
      x[e | hs] = a - b;
    }
  }
#pragma unroll
  for (int ls = 1; ls < 32; ls <<= 1) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float y = __shfl_xor_sync(0xffffffffu, x[e], ls);
      x[e] = (lane & ls) ? (y - x[e]) : (x[e] + y);
    }
  }
}

// One head's joined output ``o`` (its D values): the body's part rotated back -- y M^T with
// M = diag(signs) H / sqrt(D), ``sg`` the signs / sqrt(D) -- weighed against the fp part's
// and the learned sink (``mb``: the body's max with q.centre, which its scores left out).
template <int E, typename OT, bool HAS_ROT, bool HAS_SINKS>
__device__ __forceinline__ void write_head(float (&acc)[E], const float (&accf)[E], const float (&sg)[E],
                                           float mb, float lb, float mf, float lf, float zk, OT* o, int lane) {
  if (HAS_ROT) hadamard_lane<E>(acc, lane);
  float wb, wf, den;
  join_weights(mb, lb, mf, lf, zk, HAS_SINKS, wb, wf, den);
#pragma unroll
  for (int e = 0; e < E; ++e) o[lane * E + e] = static_cast<OT>((acc[e] * sg[e] * wb + accf[e] * wf) / den);
}

// The heads of one row of the fused join, NH a warp at once (join_last_block).
template <int D, int NH, typename OT, bool HAS_FP, bool HAS_ROT, bool HAS_CENTER, bool HAS_SINKS>
__device__ __forceinline__ void join_heads(const float* o_part, const float* ml_part, const float* fp_o,
                                           const float* fp_ml, const float (&sg)[D / 32], const float* cshift,
                                           const float* sinks, OT* out, int b, int hkv, int ht, int nh,
                                           int n_kv, int G, int S, int n_fp, int lane, int nw) {
  constexpr int E = D / 32;
  const int Hq = n_kv * G;
  for (int h0 = threadIdx.x >> 5; h0 < nh; h0 += NH * nw) {
    int64_t r[NH];
    float cs[NH], zk[NH];
#pragma unroll
    for (int i = 0; i < NH; ++i) {
      const int h = min(h0 + i * nw, nh - 1);  // a head past nh: a repeat, not written
      r[i] = (int64_t)b * Hq + hkv * G + ht * 8 + h;
      cs[i] = HAS_CENTER ? cshift[r[i]] : 0.f;
      zk[i] = HAS_SINKS ? sinks[hkv * G + ht * 8 + h] * 1.4426950408889634f : TQM_NEG_INF;
    }
    float acc[NH][E], accf[NH][E], Mb[NH], Lb[NH], mf[NH], lf[NH];
    if (h0 == 0) TQM_MARK(13);  // (TQM_TRACE) past the fence: the partials' loads start
    merge_lanes<E, NH>(o_part, ml_part, r, S, lane, acc, Mb, Lb);
    if (HAS_FP) {
      merge_lanes<E, NH>(fp_o, fp_ml, r, n_fp, lane, accf, mf, lf);
    } else {
#pragma unroll
      for (int i = 0; i < NH; ++i) {
        mf[i] = TQM_NEG_INF, lf[i] = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) accf[i][e] = 0.f;
      }
    }
    if (h0 == 0) TQM_MARK_ON(14, acc[0][0] + accf[0][0] + Lb[0] + lf[0]);  // partials merged
#pragma unroll
    for (int i = 0; i < NH; ++i) {
      if (h0 + i * nw >= nh) continue;
      write_head<E, OT, HAS_ROT, HAS_SINKS>(acc[i], accf[i], sg, Mb[i] + cs[i], Lb[i], mf[i], lf[i], zk[i],
                                            out + r[i] * D, lane);
    }
  }
}

// Whether this block is the last of its row's ``blocks`` to count itself done in
// counter[b * rows + row] (that one resets the count for the layer's next launch).
__device__ __forceinline__ bool counted_last(const int* counter, int b, int row, int rows, int blocks) {
  __shared__ int last;
  __threadfence();  // this block's partials are visible device-wide before it counts
  __syncthreads();
  if (threadIdx.x == 0) {
    int* c = const_cast<int*>(counter) + (int64_t)b * rows + row;
    last = atomicAdd(c, 1) == blocks - 1;
    if (last) atomicExch(c, 0);  // every block of the row has counted
  }
  __syncthreads();
  TQM_MARK(10);
  return last;
}

// FUSED: every block of the split kernel counts itself done in counter[b * rows + row];
// the last of a row's splits and fp chunks resets the count (so the next launch of this
// layer starts from 0) and joins the row's query heads -- what MMA_JOIN_SOURCE does in a
// second launch (merge the splits, rotate back, key centre, fp partials, learned sinks),
// a warp a head: a serial join of 8 heads by the whole block left the GPU idle ~20 us at
// 128K (bench/gpu_notes.md, session 10).
template <int D, typename OT, bool HAS_FP, bool HAS_ROT, bool HAS_CENTER, bool HAS_SINKS>
__device__ __noinline__ void join_last_block(const int* counter, const float* o_part, const float* ml_part,
                                const float* fp_o, const float* fp_ml, const float* signs,
                                const float* cshift, const float* sinks, OT* out, int b, int row,
                                int n_kv, int G, int S, int n_fp) {
  constexpr int E = D / 32;  // coordinates a lane
  const int n_ht = (G + 7) / 8;
  const int hkv = row / n_ht, ht = row % n_ht;
  const int nh = min(8, G - ht * 8);
  if (!counted_last(counter, b, row, n_kv * n_ht, S + n_fp)) return;
  __threadfence();  // then read the other blocks' partials (through L2: __ldcg)
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  float sg[E];  // the signs, cshift and sinks loads first: in flight with the merge's
#pragma unroll
  for (int e = 0; e < E; ++e) sg[e] = HAS_ROT ? signs[lane * E + e] * rsqrtf((float)D) : 1.f;
  // A warp a head where the row's heads fit the warps (GQA 4: 4 heads on 4 warps, 16 splits'
  // loads in flight: half the rounds of two heads a warp), else two heads a warp (h, h + warps).
  if (nh <= nw)
    join_heads<D, 1, OT, HAS_FP, HAS_ROT, HAS_CENTER, HAS_SINKS>(o_part, ml_part, fp_o, fp_ml, sg, cshift,
        sinks, out, b, hkv, ht, nh, n_kv, G, S, n_fp, lane, nw);
  else
    join_heads<D, 2, OT, HAS_FP, HAS_ROT, HAS_CENTER, HAS_SINKS>(o_part, ml_part, fp_o, fp_ml, sg, cshift,
        sinks, out, b, hkv, ht, nh, n_kv, G, S, n_fp, lane, nw);
}

}  // namespace tqm
"""
)


# The split body's query RoPE'd from shared memory (mma_decode.ROPE_SMEM), before the split
# header; the launch bounds after it hold the build at ``blocks`` an SM of ``threads``
# (MLX's kernels take no attribute: its ``__global__`` is redefined for the kernel after).
def rope_smem_header(header: str, threads: int, blocks: int) -> str:
    return (
        "#define TQM_ROPE_SMEM 1\n" + header + "\n#undef __global__\n"
        f"#define __global__ __attribute__((global)) __launch_bounds__({threads}, {blocks})\n"
    )


# The fused join with its row's partials staged in shared memory (mma_decode.JOIN_STAGE;
# appended to the split kernel's header only then): by the last block, the ring idle by
# then holds each warp's rows -- every split's and fp chunk's o in flight at once with
# cp.async, where join_heads loads rounds of 16 a lane into registers (inside a model each
# round waited ~3.5 us: bench/gpu_notes.md, session 24). Pipelined launches (D 64 / 128).
MMA_JOIN_STAGED = r"""
#define TQM_JOIN_STAGED 1
namespace tqm {

// a lane's E floats of row ``src`` into ``dst`` (both 4 * E bytes aligned)
template <int E>
__device__ __forceinline__ void cp_lane(float* dst, const float* src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (E == 2) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(src));
  } else {
#pragma unroll
    for (int i = 0; i < E / 4; ++i)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s + 16 * i), "l"(src + 4 * i));
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One head's rows (S splits, then n_fp chunks) merged by one warp through its ``region`` of
// ``cap`` rows (<= 64): a batch's copies, its m and l (lane j: rows j, j + 32), then the
// online softmax over the batch -- body and fp rows kept apart (the body is rotated back).
template <int E>
__device__ __forceinline__ void merge_staged(const float* o_part, const float* ml_part, const float* fp_o,
                                             const float* fp_ml, int64_t r, int S, int n_fp, float* region,
                                             int cap, int lane, float (&acc)[E], float& Mb, float& Lb,
                                             float (&accf)[E], float& Mf, float& Lf) {
  constexpr int D = 32 * E;
  const int rows = S + n_fp;
  float lb = 0.f, lf = 0.f;  // this lane's rows' share of L (summed over the warp at the end)
  for (int r0 = 0; r0 < rows; r0 += cap) {
    const int n = min(cap, rows - r0);
    for (int j = 0; j < n; ++j) {
      const int s = r0 + j;
      const float* src = s < S ? o_part + (r * S + s) * D : fp_o + (r * n_fp + (s - S)) * D;
      cp_lane<E>(region + j * D + lane * E, src + lane * E);
    }
    cp_commit();
    float m[2], l[2];
    bool body[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int s = r0 + lane + 32 * k;
      body[k] = s < S;
      const float2 x = lane + 32 * k >= n ? make_float2(TQM_NEG_INF, 0.f)
                       : __ldcg(reinterpret_cast<const float2*>(s < S ? ml_part + (r * S + s) * 2
                                                                      : fp_ml + (r * n_fp + (s - S)) * 2));
      m[k] = x.x, l[k] = x.y;
    }
    const float nb = fmaxf(Mb, warp_max(fmaxf(body[0] ? m[0] : TQM_NEG_INF, body[1] ? m[1] : TQM_NEG_INF)));
    const float nf = fmaxf(Mf, warp_max(fmaxf(body[0] ? TQM_NEG_INF : m[0], body[1] ? TQM_NEG_INF : m[1])));
    // rescale what is merged so far (0 while a max is -inf: nothing merged yet)
    const float cb = nb == TQM_NEG_INF ? 0.f : exp2f(Mb - nb);
    const float cf = nf == TQM_NEG_INF ? 0.f : exp2f(Mf - nf);
    Mb = nb, Mf = nf, lb *= cb, lf *= cf;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= cb, accf[e] *= cf;
    float w[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float t = body[k] ? nb : nf;
      w[k] = m[k] == TQM_NEG_INF ? 0.f : exp2f(m[k] - t);  // 0: an empty split, or past n
      if (body[k]) lb += w[k] * l[k];
      else lf += w[k] * l[k];
    }
    cp_wait<0>();
    __syncwarp();
    for (int j = 0; j < n; ++j) {
      const float wj = __shfl_sync(0xffffffffu, j < 32 ? w[0] : w[1], j & 31);
      const float* v = region + j * D + lane * E;
      if (r0 + j < S) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += wj * v[e];
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) accf[e] += wj * v[e];
      }
    }
    __syncwarp();  // the region is read before the next batch's copies land in it
  }
  Lb = warp_sum(lb), Lf = warp_sum(lf);
}

// join_last_block (the count, then the join), the row's partials staged: a warp a head.
template <int D, typename OT, bool HAS_FP, bool HAS_ROT, bool HAS_CENTER, bool HAS_SINKS>
__device__ __noinline__ void join_last_block_staged(const int* counter, const float* o_part, const float* ml_part,
                                const float* fp_o, const float* fp_ml, const float* signs,
                                const float* cshift, const float* sinks, OT* out, int b, int row,
                                int n_kv, int G, int S, int n_fp) {
  constexpr int E = D / 32;
  static_assert(E == 2 || E == 4, "staged: the pipelined head dims (64, 128)");
  extern __shared__ __align__(16) float tq_join_s[];  // the launch's dynamic shared memory
  const int n_ht = (G + 7) / 8;
  const int hkv = row / n_ht, ht = row % n_ht;
  const int nh = min(8, G - ht * 8);
  if (!counted_last(counter, b, row, n_kv * n_ht, S + n_fp)) return;
  __threadfence();  // then read the other blocks' partials (through L2)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  uint32_t smem;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem));
  const int cap = min(64, (int)(smem / 4) / nw / D);  // rows a warp's region holds
  float* region = tq_join_s + warp * cap * D;
  const int Hq = n_kv * G;
  float sg[E];
#pragma unroll
  for (int e = 0; e < E; ++e) sg[e] = HAS_ROT ? signs[lane * E + e] * rsqrtf((float)D) : 1.f;
  for (int h = warp; h < nh; h += nw) {
    const int64_t r = (int64_t)b * Hq + hkv * G + ht * 8 + h;
    const float cs = HAS_CENTER ? cshift[r] : 0.f;
    const float zk = HAS_SINKS ? sinks[hkv * G + ht * 8 + h] * 1.4426950408889634f : TQM_NEG_INF;
    float acc[E], accf[E], Mb = TQM_NEG_INF, Lb = 0.f, Mf = TQM_NEG_INF, Lf = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = accf[e] = 0.f;
    if (h == 0) TQM_MARK(13);
    merge_staged<E>(o_part, ml_part, fp_o, fp_ml, r, S, HAS_FP ? n_fp : 0, region, cap, lane, acc, Mb, Lb,
                    accf, Mf, Lf);
    if (h == 0) TQM_MARK_ON(14, acc[0] + accf[0] + Lb + Lf);
    write_head<E, OT, HAS_ROT, HAS_SINKS>(acc, accf, sg, Mb + cs, Lb, Mf, Lf, zk, out + r * D, lane);
  }
}

}  // namespace tqm
"""

# The blocks past the splits take the full-precision sink and tail (fp_chunk), the rest
# split the body.
MMA_SPLIT_SOURCE = r"""
  const int n_kv = kw_shape[1];
  const int G = q_shape[1] / n_kv;
  const int n_ht = (G + 7) / 8;
  constexpr int FC = TQM_FP_CHUNK;
  // TLEN: the tail is the first params[1] positions of the buffers kt/vt (tqm::tail_len;
  // written out here: through the helper this line compiled to other machine code)
  const int n_fp = (HAS_HEAD ? (kh_shape[2] + FC - 1) / FC : 0) + (HAS_TAIL ? ((TLEN ? (int)params[1] : kt_shape[2]) + FC - 1) / FC : 0);
  // LIN: a 1-D grid, the splits of every row first (rows fastest), the fp chunks last --
  // the hardware deals blocks out in this order, so the SMs get even shares of split work.
  // Else blocks (x: splits then chunks, y: row, z: batch).
  int idx, row, b, S;
  if (LIN) {
    const int R = q_shape[0] * n_kv * n_ht;
    S = gridDim.x / R - n_fp;
    idx = blockIdx.x / R;
    row = blockIdx.x % R;
    b = row / (n_kv * n_ht);
    row %= n_kv * n_ht;
  } else {
    S = gridDim.x - n_fp;
    idx = blockIdx.x;
    row = blockIdx.y;
    b = blockIdx.z;
  }
  if constexpr (FUSED) {  // the partials go to this layer's workspace, after its counters
    const int64_t n = (int64_t)q_shape[0] * q_shape[1];  // batch x query heads
    o_part = const_cast<float*>(work) + TQM_JOIN_ROWS;
    ml_part = o_part + tqm::work_span(n * S * D);
    fp_o = ml_part + tqm::work_span(n * S * 2);
    fp_ml = fp_o + tqm::work_span(n * n_fp * D);
  }
#ifdef TQM_TRACE
  if (threadIdx.x == 0) {
    for (int i = 0; i < 32; ++i) tqm_trace_s[i] = 0;
    tqm_mark(0);
  }
#endif
  // RDIMS: the query and the new key (APPEND) come unrotated by RoPE (rope_fusion); the
  // query's position is the context's last: sink + body + tail (which counts the new ones).
  static_assert(RDIMS == 0 || (APPEND && HAS_TAIL), "RoPE here only for the new positions");
  const float rpos = RDIMS == 0 ? 0.f
      : (float)((HAS_HEAD ? kh_shape[2] : 0) + (KQ == 2 ? ks_shape[3] * KGS : kw_shape[2]) +
                tqm::tail_len<TLEN>(params, kt_shape.data()) - 1);
  const bool fp_block = (HAS_HEAD || HAS_TAIL) && idx >= S;
  if (fp_block) {
    tqm::fp_chunk<D, 32 * WARPS, HAS_HEAD, HAS_TAIL, APPEND, TLEN, RDIMS, RTRAD>(
        q, q_strides.data(), rope, rpos, kh, kh_shape.data(), kh_strides.data(), vh, vh_strides.data(),
        kt, kt_shape.data(), kt_strides.data(), vt, vt_strides.data(),
        kn, kn_shape.data(), kn_strides.data(), vn, vn_strides.data(), params,
        n_kv, G, idx - S, n_fp, row, b, fp_o, fp_ml);
    TQM_MARK(9);
    if (!FUSED) return;
  }
  if (!fp_block) {  // (a fused fp block goes on to count itself below)
    tqm::mma_decode_split<KQ, VQ, KB, VB, KGS, VGS, D, WARPS, STEPS, QROT, FOLD, PIPE, CVAL, RDIMS, RTRAD, QT, ST>(
        q, q_strides.data(), signs, rope, rpos,
        kw, kw_shape.data(), kw_strides.data(),
        ks, ks_shape.data(), ks_strides.data(), kb, kb_strides.data(),
        vw, vw_shape.data(), vw_strides.data(),
        vs, vs_strides.data(), vb, vb_strides.data(),
        lut_k, lut_v, params,
        n_kv, G, idx, S, row, b, o_part, ml_part);
  }
  if constexpr (FUSED) {  // the join, by the row's last block (one launch a layer)
#ifdef TQM_JOIN_STAGED
    tqm::join_last_block_staged<D, OT, HAS_HEAD || HAS_TAIL, QROT, HAS_CENTER, HAS_SINKS>(
#else
    tqm::join_last_block<D, OT, HAS_HEAD || HAS_TAIL, QROT, HAS_CENTER, HAS_SINKS>(
#endif
        reinterpret_cast<const int*>(work), o_part, ml_part, fp_o, fp_ml, signs, cshift, sinks,
        out, b, row, n_kv, G, S, n_fp);
  }
#ifdef TQM_TRACE
  __syncthreads();
  if (FUSED && threadIdx.x == 0) {
    tqm_mark(11);
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    tqm_trace_s[1] = ((unsigned long long)sm << 32) | ((unsigned long long)idx << 16) | (unsigned)row;
    auto* tr = reinterpret_cast<unsigned long long*>(const_cast<float*>(work) + TQM_JOIN_ROWS + TQM_TRACE);
    for (int i = 0; i < 32; ++i) tr[(int64_t)blockIdx.x * 32 + i] = tqm_trace_s[i];
  }
#endif
"""

# Merges the splits of one (batch, query head): unnormalised partials -> the normalised
# output and its base-2 log-sum-exp (so the caller can join full-precision segments).
MMA_COMBINE_SOURCE = r"""
  const int row = blockIdx.x;
  const int d = threadIdx.x;
  float M, L;
  const float acc = tqm::merge_splits(o_part, ml_part, row, ml_part_shape[2], D, d, M, L);
  out[(int64_t)row * D + d] = L > 0.f ? acc / L : 0.f;
  if (d == 0) lse[row] = L > 0.f ? M + log2f(L) : TQM_NEG_INF;
"""

# One block per (batch, query head), one thread per coordinate: merges the body's splits,
# rotates the body back (Hadamard butterflies in shared memory, then the signs), and joins
# it with the full-precision partials (fp_chunk blocks, model space) and the learned sink:
# the rest of the decode layer after the split kernel, one launch.
MMA_JOIN_SOURCE = r"""
  const int row = blockIdx.x;  // b * Hq + hq
  const int d = threadIdx.x;
  const int hq = row % ml_part_shape[1];
  const int S = ml_part_shape[2];
  __shared__ float sh[D];

  float Mb, Lb;
  float acc = tqm::merge_splits(o_part, ml_part, row, S, D, d, Mb, Lb);
  if (HAS_ROT) {  // y M^T with M = diag(signs) H / sqrt(D): Sylvester-order H, then the signs
    sh[d] = acc;
    __syncthreads();
    for (int h = 1; h < D; h <<= 1) {
      const float x = sh[d], y = sh[d ^ h];
      __syncthreads();
      sh[d] = (d & h) ? (y - x) : (x + y);
      __syncthreads();
    }
    acc = sh[d] * rsqrtf((float)D) * signs[d];
  }
  if (HAS_CENTER) Mb += cshift[row];  // the body's scores left out q.centre

  float mf = TQM_NEG_INF, lf = 0.f, accf = 0.f;
  if (HAS_FP) accf = tqm::merge_splits(fp_o, fp_ml, row, fp_ml_shape[2], D, d, mf, lf);
  const float zk = HAS_SINKS ? sinks[hq] * 1.4426950408889634f : TQM_NEG_INF;
  float wb, wf, den;
  tqm::join_weights(Mb, Lb, mf, lf, zk, HAS_SINKS, wb, wf, den);
  out[(int64_t)row * D + d] = static_cast<OT>((acc * wb + accf * wf) / den);
"""
