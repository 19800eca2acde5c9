// Helpers shared by the CUDA kernels: 16-byte vector access, row layout, launch sizing and the block sum.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dreambooth_fast::cuda {

constexpr int kThreads = 256;
// Resident blocks per SM that a grid-stride launch aims for (kThreads * 8 = 2048 threads, the SM maximum).
constexpr int kBlocksPerSM = 8;

// VEC elements of T moved as one 16-byte load or store (32 bytes, two accesses, for the float32 gradient of
// half pred).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T val[VEC];
};

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

inline bool aligned_to(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// True when every row t[i] is one contiguous block whatever the batch stride, e.g. the epsilon half
// pred[:, :3] of a 6-channel UNet output.
inline bool rows_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// Multiprocessors of each visible device, read once per process (a launch should not pay for the query).
inline int sm_count(int device) {
  static const std::vector<int> counts = [] {
    int devices = 0;
    C10_CUDA_CHECK(cudaGetDeviceCount(&devices));
    std::vector<int> result(devices);
    for (int d = 0; d < devices; ++d) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&result[d], cudaDevAttrMultiProcessorCount, d));
    }
    return result;
  }();
  return counts.at(device);
}

// Grid of a pass over `rows` rows of `items_per_row` work items: blockIdx.y walks the rows (grid-stride past
// 65535), blockIdx.x grid-strides within a row; about kBlocksPerSM blocks per SM in all, at least one per row.
inline dim3 row_grid(int64_t rows, int64_t items_per_row, int device) {
  const int64_t grid_y = std::min<int64_t>(rows, 65535);
  const int64_t wanted_x = (items_per_row + kThreads - 1) / kThreads;
  const int64_t budget_x = int64_t(sm_count(device)) * kBlocksPerSM / grid_y;
  const int64_t grid_x = std::max<int64_t>(1, std::min({wanted_x, budget_x, int64_t(65535)}));
  return dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
}

// Sum over a block of kThreads threads in a fixed order (a shuffle tree per warp, then the warp sums);
// the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // warp_sums is reused by the next call
  return value;
}

}  // namespace dreambooth_fast::cuda
