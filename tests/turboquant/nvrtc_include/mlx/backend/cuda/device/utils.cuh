// Stand-in for the header MLX's CUDA JIT puts first in every custom kernel: only what
// tqstack's kernels use (Shape / Strides arguments, indexed and .data(); the fixed-width
// integer types), so tests/turboquant/nvrtc.py can compile them where MLX has no CUDA.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/cstdint>

namespace mlx::core::cu {

constexpr int MAX_NDIM = 10;

template <typename T>
struct Dims {
  T v[MAX_NDIM];
  __device__ const T& operator[](int i) const { return v[i]; }
  __device__ const T* data() const { return v; }
};
using Shape = Dims<int32_t>;
using Strides = Dims<int64_t>;

}  // namespace mlx::core::cu
