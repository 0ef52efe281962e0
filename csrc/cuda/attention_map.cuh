// The streaming channel reduction of csrc/cuda/attention_map.cu as a work list, so that one launch
// reduces every feature tensor of a call (S and T of all levels in dct_at_loss), and its
// elementwise backward (dS of all levels in one launch).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <vector>

#include "../layout.h"

namespace dctkd {
namespace cuda {

// One feature tensor x (B, C, H, W), NCHW- or channels_last-contiguous. Passed by value to the
// kernel inside a __grid_constant__ parameter block (no host->device copy, no sync).
struct MapJob {
  const void* x;   // features
  void* y;         // forward: the map, acc type, (B, H*W) contiguous; backward: dx (x's dtype and strides)
  const void* g;   // backward: dL/dmap, acc type, (B, H*W) contiguous
  const void* gl;  // backward: per-sample factor, acc type, (B,); nullptr for none
  int64_t C;
  int64_t HW;
  double scale_d;    // 1/C for reduce="mean" else 1, for fp64 accumulation
  float scale_f;     // the same as the CPU kernel rounds it: 1.0f / float(C)
  int B;
  int dtype;         // DType of x (and dx)
  int vec;           // elements per access: a 16- or 8-byte pack, or 1
  int nhwc;          // channels_last (or H*W == 1, where both layouts coincide)
  int log2;          // NCHW: log2 of the warps that split C; NHWC: log2 of the lanes per position
  int steps;         // NHWC: positions (steps) each warp walks
  int tiles_per_sample;
  int tile_begin;    // set by launch_map_jobs: first block of this job
};

// The job for x (already NCHW- or channels_last-contiguous). Packed accesses only with fp32
// accumulation and p == 2 (pow2); `bwd`: y is dx, whose alignment the packed stores need too.
MapJob make_map_job(const at::Tensor& x, bool channels_last, void* y, const void* g, const void* gl, bool mean,
                    bool acc_double, bool pow2, bool bwd);

// Runs the jobs (forward: maps; backward: dx) on `stream`: one launch per 32 jobs.
void launch_map_jobs(std::vector<MapJob> jobs, bool bwd, bool acc_double, double p, cudaStream_t stream);

// Shared argument checks (the same messages as the CPU kernels).
void check_features(const at::Tensor& x, const char* name);

}  // namespace cuda
}  // namespace dctkd
