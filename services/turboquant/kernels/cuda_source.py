"""CUDA source of the fused compressed decode-attention kernels (for ``mx.fast.cuda_kernel``).

Two kernels:

* ``tq_decode_split``: one block per (split of the context, KV head, head block, batch).
  It reads the packed rotated keys and values once, scores them against the rotated query
  of every query head that shares the KV head (GQA), runs an online softmax in base 2 and
  writes an unnormalised partial output plus its running max and sum.
* ``tq_decode_combine``: one block per (batch, query head); merges the partials of all
  splits (flash-decoding), adds the attention sink if any, normalises.

Packed layout (docs/turboquant.md): a row of ``D`` codes of ``b`` bits is a little-endian
bit stream in uint32 words. ``affine``: ``x = scale[g] * code + bias[g]`` per group of
``GS`` coordinates. ``codebook``: ``x = norm * centroid[code]``.

Affine codes are turned into floats without an int->float conversion (slow on Hopper):
``f = as_float(0x3F800000 | code << (23 - b)) = 1 + code / 2^b`` exactly, so
``scale * code + bias = (scale * 2^b) * f + (bias - scale * 2^b)``; the constant part is
folded per group (with the group's sum of the query for keys, per token for values).
"""

HEADER = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define TQ_NEG_INF (__int_as_float(0xff800000u))

namespace tq {

__device__ __forceinline__ float tofloat(float x) { return x; }
__device__ __forceinline__ float tofloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float tofloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// The 8 codes starting at bit `bit` of the word stream `p` (codes never straddle more
// than two words for b <= 4; for b == 8 an octet is two whole words).
template <int B>
__device__ __forceinline__ void load_octet(const uint32_t* p, int bit, uint32_t c[8]) {
  const uint32_t* w = p + (bit >> 5);
  if constexpr (B == 8) {
    uint32_t a = w[0], d = w[1];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      c[e] = (a >> (8 * e)) & 0xFFu;
      c[4 + e] = (d >> (8 * e)) & 0xFFu;
    }
  } else {
    int sh = bit & 31;
    uint32_t v = w[0] >> sh;
    if (sh + 8 * B > 32) v |= w[1] << (32 - sh);
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = (v >> (B * e)) & ((1u << B) - 1u);
  }
}

// Affine codes -> 1 + code / 2^B (exact), codebook codes -> centroid.
template <int B, bool CB>
__device__ __forceinline__ float decode(uint32_t c, const float* lut) {
  if constexpr (CB) {
    return lut[c];
  } else {
    return __uint_as_float(0x3F800000u | (c << (23 - B)));
  }
}

// Code `e` of a bit stream held in registers `w` (e is a constant after unrolling).
template <int B>
__device__ __forceinline__ uint32_t code_at(const uint32_t* w, int e) {
  const int bit = e * B;
  const int wi = bit >> 5, sh = bit & 31;
  uint32_t v = w[wi] >> sh;
  if (sh + B > 32) v |= w[wi + 1] << (32 - sh);
  return v & ((1u << B) - 1u);
}

template <bool CB, int KB, int VB, int GS, int D, int HB, int TPB, int TILE, typename ST>
__device__ void decode_split(
    const float* q, const int64_t* q_st,
    const uint32_t* kw, const int64_t* kw_st, const ST* ks, const int64_t* ks_st,
    const ST* kb, const int64_t* kb_st,
    const uint32_t* vw, const int64_t* vw_st, const ST* vs, const int64_t* vs_st,
    const ST* vb, const int64_t* vb_st,
    const float* lut_k, const float* lut_v, const float* params,
    int N, int n_kv, int n_hb,
    float* o_part, float* ml_part) {
  constexpr int NC = D / 32;         // 32-coordinate chunks per row (K phase)
  constexpr int NOC = D / 8;         // octets per row (V phase)
  constexpr int TL = TPB / NOC;      // token lanes in the V phase
  constexpr int KI = (TILE * NC + TPB - 1) / TPB;  // K items per thread per tile
  constexpr int VI = TILE / TL;                    // V tokens per thread per tile
  constexpr int VW = (VB == 8 || VB == 3) ? 2 : 1; // words holding one V octet
  static_assert(TPB % NOC == 0 && TILE % TL == 0 && (TILE * NC) % 32 == 0, "tile shape");

  // Each 32-coordinate chunk padded to 36 floats: the NC chunks read by one warp land in
  // different banks (v2 had them 128 B apart: a 4-way conflict on every query read).
  constexpr int QP = 36;
  __shared__ __align__(16) float qs[HB][NC * QP];
  __shared__ float qsum[HB][NC];
  __shared__ float sc[HB][TILE];
  __shared__ float m_run[HB], l_run[HB], alpha[HB];
  __shared__ float red[HB][D];
  __shared__ float lk[CB ? (1 << KB) : 1], lv[CB ? (1 << VB) : 1];

  const int tid = threadIdx.x;
  // Head blocks of one split are neighbours in x, so they run together and the second
  // read of the same K/V tile is served by L2.
  const int split = blockIdx.x / n_hb;
  const int hb = blockIdx.x % n_hb;
  const int S = gridDim.x / n_hb;
  const int hkv = blockIdx.y;
  const int b = blockIdx.z;
  const int G = n_hb * HB;                // query heads per KV head
  const int h0 = hkv * G + hb * HB;       // first query head of this block
  const float qscale = params[0];         // softmax scale * log2(e)

  int chunk = (N + S - 1) / S;
  chunk = (chunk + TILE - 1) / TILE * TILE;
  const int start = split * chunk;
  const int end = min(N, start + chunk);

  for (int i = tid; i < HB * D; i += TPB) {
    int g = i / D, d = i % D;
    qs[g][(d >> 5) * QP + (d & 31)] = q[b * q_st[0] + (h0 + g) * q_st[1] + d * q_st[3]] * qscale;
    red[g][d] = 0.f;
  }
  if constexpr (CB) {
    for (int i = tid; i < (1 << KB); i += TPB) lk[i] = lut_k[i];
    for (int i = tid; i < (1 << VB); i += TPB) lv[i] = lut_v[i];
  }
  if (tid < HB) {
    m_run[tid] = TQ_NEG_INF;
    l_run[tid] = 0.f;
  }
  __syncthreads();
  if constexpr (!CB) {
    for (int i = tid; i < HB * NC; i += TPB) {
      int g = i / NC, ch = i % NC;
      float s = 0.f;
      for (int e = 0; e < 32; ++e) s += qs[g][ch * QP + e];
      qsum[g][ch] = s;
    }
  }

  const uint32_t* kbase = kw + b * kw_st[0] + hkv * kw_st[1];
  const uint32_t* vbase = vw + b * vw_st[0] + hkv * vw_st[1];
  const ST* ksb = ks + b * ks_st[0] + hkv * ks_st[1];
  const ST* kbb = CB ? ks : kb + b * kb_st[0] + hkv * kb_st[1];
  const ST* vsb = vs + b * vs_st[0] + hkv * vs_st[1];
  const ST* vbb = CB ? vs : vb + b * vb_st[0] + hkv * vb_st[1];

  // K-phase ownership: a fixed 32-coordinate chunk (TPB is a multiple of NC).
  const int ch = tid % NC;
  // V-phase ownership: one octet column, every TL-th token of the tile.
  const int oc = tid % NOC;
  const int tl = tid / NOC;
  const int vbit = oc * 8 * VB;
  const int vsh = vbit & 31;
  const bool v2 = (VB == 8) || (vsh + 8 * VB > 32);
  const int vgrp = oc * 8 / GS;
  float acc[HB][8];
  float bacc[HB];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    bacc[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  __syncthreads();

  for (int t0 = start; t0 < end; t0 += TILE) {
    // ---- issue every load of this tile first (K chunks and V octets), then compute:
    // memory latency is paid once per tile instead of once per token.
    uint32_t kwr[KI][KB];
    float kx[KI], ky[KI];
#pragma unroll
    for (int k = 0; k < KI; ++k) {
      const int it = tid + k * TPB;
      const int t = t0 + it / NC;
      kx[k] = 0.f;
      ky[k] = 0.f;
#pragma unroll
      for (int j = 0; j < KB; ++j) kwr[k][j] = 0u;
      if (it < TILE * NC && t < end) {
        const uint32_t* row = kbase + (int64_t)t * kw_st[2] + ch * KB;
#pragma unroll
        for (int j = 0; j < KB; ++j) kwr[k][j] = row[j];
        if constexpr (CB) {
          kx[k] = tofloat(ksb[(int64_t)t * ks_st[2]]);
        } else {
          const int grp = ch * 32 / GS;
          kx[k] = tofloat(ksb[(int64_t)t * ks_st[2] + grp * ks_st[3]]);
          ky[k] = tofloat(kbb[(int64_t)t * kb_st[2] + grp * kb_st[3]]);
        }
      }
    }
    uint32_t vwr[VI][2];
    float vx[VI], vy[VI];
#pragma unroll
    for (int i = 0; i < VI; ++i) {
      const int t = t0 + tl + i * TL;
      vwr[i][0] = vwr[i][1] = 0u;
      vx[i] = vy[i] = 0.f;
      if (t < end) {
        const uint32_t* row = vbase + (int64_t)t * vw_st[2] + (vbit >> 5);
        vwr[i][0] = row[0];
        if (VW > 1 && v2) vwr[i][1] = row[1];
        if constexpr (CB) {
          vx[i] = tofloat(vsb[(int64_t)t * vs_st[2]]);
        } else {
          vx[i] = tofloat(vsb[(int64_t)t * vs_st[2] + vgrp * vs_st[3]]);
          vy[i] = tofloat(vbb[(int64_t)t * vb_st[2] + vgrp * vb_st[3]]);
        }
      }
    }

    // ---- K phase: scores of this thread's chunks, summed over the NC lanes of a token.
#pragma unroll
    for (int k = 0; k < KI; ++k) {
      const int it = tid + k * TPB;
      if (it < TILE * NC) {  // warp-uniform
        const int tok = it / NC;
        const int t = t0 + tok;
        float f[32];
#pragma unroll
        for (int e = 0; e < 32; ++e) f[e] = decode<KB, CB>(code_at<KB>(kwr[k], e), lk);
        float part[HB];
#pragma unroll
        for (int g = 0; g < HB; ++g) {
          const float4* qv = reinterpret_cast<const float4*>(&qs[g][ch * QP]);
          float a = 0.f;
#pragma unroll
          for (int e4 = 0; e4 < 8; ++e4) {
            const float4 qq = qv[e4];
            a = fmaf(qq.x, f[4 * e4], a);
            a = fmaf(qq.y, f[4 * e4 + 1], a);
            a = fmaf(qq.z, f[4 * e4 + 2], a);
            a = fmaf(qq.w, f[4 * e4 + 3], a);
          }
          if constexpr (CB) {
            part[g] = a;
          } else {
            const float s2 = kx[k] * (float)(1 << KB);
            part[g] = fmaf(s2, a, (ky[k] - s2) * qsum[g][ch]);
          }
        }
#pragma unroll
        for (int off = 1; off < NC; off <<= 1) {
#pragma unroll
          for (int g = 0; g < HB; ++g) part[g] += __shfl_xor_sync(0xffffffffu, part[g], off);
        }
        if (ch == 0) {
          const float nrm = CB ? kx[k] : 1.f;
#pragma unroll
          for (int g = 0; g < HB; ++g) sc[g][tok] = (t < end) ? part[g] * nrm : TQ_NEG_INF;
        }
      }
    }
    __syncthreads();

    // ---- online softmax (base 2): one warp per head.
    for (int g = tid / 32; g < HB; g += TPB / 32) {
      const int lane = tid % 32;
      float mx = TQ_NEG_INF;
      for (int i = lane; i < TILE; i += 32) mx = fmaxf(mx, sc[g][i]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_run[g];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int i = lane; i < TILE; i += 32) {
        float p = exp2f(sc[g][i] - m_new);
        sc[g][i] = p;
        sum += p;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      __syncwarp();
      if (lane == 0) {
        const float a = exp2f(m_old - m_new);
        alpha[g] = a;
        l_run[g] = l_run[g] * a + sum;
        m_run[g] = m_new;
      }
    }
    __syncthreads();

    // ---- V phase: acc += p * v for this thread's octet column, from registers.
#pragma unroll
    for (int g = 0; g < HB; ++g) {
      const float a = alpha[g];
      bacc[g] *= a;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= a;
    }
#pragma unroll
    for (int i = 0; i < VI; ++i) {
      const int tok = tl + i * TL;
      uint32_t c[8];
      if constexpr (VB == 8) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          c[e] = (vwr[i][0] >> (8 * e)) & 0xFFu;
          c[4 + e] = (vwr[i][1] >> (8 * e)) & 0xFFu;
        }
      } else {
        uint32_t v = vwr[i][0] >> vsh;
        if (VW > 1 && v2) v |= vwr[i][1] << (32 - vsh);
#pragma unroll
        for (int e = 0; e < 8; ++e) c[e] = (v >> (VB * e)) & ((1u << VB) - 1u);
      }
      float w[HB];
      // Tokens past `end` have p == 0 (their score was -inf) and zeroed registers.
      if constexpr (CB) {
#pragma unroll
        for (int g = 0; g < HB; ++g) w[g] = sc[g][tok] * vx[i];
      } else {
        const float s2 = vx[i] * (float)(1 << VB);
        const float bb = vy[i] - s2;
#pragma unroll
        for (int g = 0; g < HB; ++g) {
          const float p = sc[g][tok];
          w[g] = p * s2;
          bacc[g] = fmaf(p, bb, bacc[g]);
        }
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float f = decode<VB, CB>(c[e], lv);
#pragma unroll
        for (int g = 0; g < HB; ++g) acc[g][e] = fmaf(w[g], f, acc[g][e]);
      }
    }
    __syncthreads();
  }

  // ---- reduce the token lanes: first inside the warp, then across warps in shared memory.
#pragma unroll
  for (int g = 0; g < HB; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float v = acc[g][e] + bacc[g];
#pragma unroll
      for (int off = NOC; off < 32; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[g][e] = v;
    }
  }
  if ((tid % 32) < NOC) {
#pragma unroll
    for (int g = 0; g < HB; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) atomicAdd(&red[g][oc * 8 + e], acc[g][e]);
    }
  }
  __syncthreads();
  for (int i = tid; i < HB * D; i += TPB) {
    const int g = i / D, d = i % D;
    const int64_t row = ((int64_t)b * (n_kv * G) + h0 + g) * S + split;
    o_part[row * D + d] = red[g][d];
    if (d == 0) {
      ml_part[row * 2] = m_run[g];
      ml_part[row * 2 + 1] = l_run[g];
    }
  }
}

}  // namespace tq
"""

SPLIT_SOURCE = r"""
  tq::decode_split<CB, KB, VB, GS, D, HB, TPB, TILE, ST>(
      q, q_strides.data(),
      kw, kw_strides.data(), ks, ks_strides.data(), kb, kb_strides.data(),
      vw, vw_strides.data(), vs, vs_strides.data(), vb, vb_strides.data(),
      lut_k, lut_v, params,
      kw_shape[2], kw_shape[1], q_shape[1] / (kw_shape[1] * HB), o_part, ml_part);
"""

COMBINE_SOURCE = r"""
  // One block per (batch, query head); thread d owns coordinate d.
  const int row = blockIdx.x;
  const int d = threadIdx.x;
  const int S = ml_part_shape[2];
  const int hq = row % ml_part_shape[1];
  const float* ml = ml_part + (int64_t)row * S * 2;
  float M = TQ_NEG_INF;
  for (int s = 0; s < S; ++s) M = fmaxf(M, ml[2 * s]);
  float sink = TQ_NEG_INF;
  if (HAS_SINKS) {
    sink = sinks[hq] * 1.4426950408889634f;
    M = fmaxf(M, sink);
  }
  float L = 0.f, acc = 0.f;
  for (int s = 0; s < S; ++s) {
    const float m = ml[2 * s];
    if (m == TQ_NEG_INF) continue;  // an empty split
    const float w = exp2f(m - M);
    L = fmaf(ml[2 * s + 1], w, L);
    acc = fmaf(o_part[((int64_t)row * S + s) * D + d], w, acc);
  }
  if (HAS_SINKS) L += exp2f(sink - M);
  out[(int64_t)row * D + d] = L > 0.f ? acc / L : 0.f;
"""
