// CUDA kernels of attention_map (docs/DESIGN.md §3.1) and of the streaming parts of dct_at_loss (§3.3):
// the channel reduction A[b,hw] = scale * sum_c |x|^p and its elementwise backward
// dx = g[b,hw] (* gl[b]) * scale * p|x|^(p-1) sign(x). Every tensor of a call is a job of one work
// list, so S and T of all levels are reduced by one launch and dS of all levels written by one.
//
// Blocks are 256 threads (8 warps); each block does one tile of one sample of one job:
//  - NCHW: a tile is 32 * sw slots of `vec` consecutive positions; lane <-> slot (each warp load is
//    32 packs = up to 512 contiguous bytes), the 8 warps split into sw slot groups x cw channel
//    groups; each thread keeps `vec` fp32 partial sums over its channels, the cw groups are summed
//    through shared memory in a fixed order (deterministic).
//  - NHWC: positions own a contiguous channel vector; gsz lanes share a position (a warp load reads
//    32 / gsz whole positions), partial sums are combined by warp shuffles.
// Bytes: forward reads x once and writes 4 (8) bytes per position; backward reads x and the small
// map gradient (L2-resident, C times reused) and writes dx once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <string>
#include <vector>

#include "attention_map.cuh"
#include "common.cuh"

namespace dctkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxJobs = 32;

struct MapParams {
  MapJob job[kMaxJobs];
  int njobs;
  int pow2;
  double p;
};

template <typename acc_t>
__device__ __forceinline__ acc_t job_scale(const MapJob& J) {
  if constexpr (sizeof(acc_t) == 8) return J.scale_d;
  else return J.scale_f;
}

template <typename acc_t, bool kPow2>
__device__ __forceinline__ acc_t fwd_term(acc_t v, acc_t p) {
  if constexpr (kPow2) return v * v;
  else return abs_pow_dev(v, p);
}
template <typename acc_t, bool kPow2>
__device__ __forceinline__ acc_t bwd_term(acc_t v, acc_t p) {
  if constexpr (kPow2) return acc_t(2) * v;
  else return abs_pow_grad_dev(v, p);
}

template <typename T>
__device__ __forceinline__ T segment_sum(T a, int gsz) {
  // xor partners stay inside aligned segments of gsz lanes; every lane of the warp takes part.
  for (int o = gsz >> 1; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  return a;
}

// ------------------------------------------------------------------------------------------ NCHW
template <typename scalar_t, typename acc_t, int V, bool kPow2, bool kBwd>
__device__ __forceinline__ void nchw_tile(const MapJob& J, int tile, acc_t p, acc_t* red) {
  // Independent loads in flight per thread; few for p != 2, whose pow calls would spill them.
  constexpr int U = !kPow2 ? 2 : (V * sizeof(scalar_t) >= 16 ? 4 : 8);
  const int cl2 = J.log2, cw = 1 << cl2, sw = kWarps >> cl2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sg = warp & (sw - 1), cg = warp >> (3 - cl2);  // warp = cg * sw + sg
  const int b = tile / J.tiles_per_sample;
  const int t = tile - b * J.tiles_per_sample;
  const int64_t C = J.C, HW = J.HW, nslots = HW / V;
  const int64_t slot = int64_t(t) * (32 * sw) + sg * 32 + lane;
  const bool ok = slot < nslots;
  const int64_t off = int64_t(b) * C * HW + slot * V;  // channel 0 of this slot
  const acc_t scale = job_scale<acc_t>(J);
  const scalar_t* x = static_cast<const scalar_t*>(J.x) + off;

  if constexpr (!kBwd) {
    acc_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = acc_t(0);
    if (ok) {
      int64_t c = cg;
      for (; c + int64_t(U - 1) * cw < C; c += int64_t(U) * cw) {
        Pack<scalar_t, V> pk[U];
#pragma unroll
        for (int u = 0; u < U; ++u) pk[u] = load_pack<scalar_t, V>(x + (c + int64_t(u) * cw) * HW);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += fwd_term<acc_t, kPow2>(static_cast<acc_t>(pk[u].v[v]), p);
      }
      for (; c < C; c += cw) {
        const Pack<scalar_t, V> pk = load_pack<scalar_t, V>(x + c * HW);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += fwd_term<acc_t, kPow2>(static_cast<acc_t>(pk.v[v]), p);
      }
    }
    acc_t* out = static_cast<acc_t*>(J.y) + int64_t(b) * HW;
    if (cw == 1) {
      if (ok) {
#pragma unroll
        for (int v = 0; v < V; ++v) out[slot * V + v] = acc[v] * scale;
      }
    } else {
      // cw partial sums per position -> shared memory -> summed in channel-group order.
      const int tp = 32 * sw * V;  // positions of the tile; red holds cw * tp = 256 * V values
#pragma unroll
      for (int v = 0; v < V; ++v) red[cg * tp + (sg * 32 + lane) * V + v] = acc[v];
      __syncthreads();  // cw is uniform over the block
      for (int q = threadIdx.x; q < tp; q += kThreads) {
        const int64_t pos = int64_t(t) * tp + q;
        if (pos < HW) {
          acc_t s = red[q];
          for (int g = 1; g < cw; ++g) s += red[g * tp + q];
          out[pos] = s * scale;
        }
      }
    }
  } else {
    if (!ok) return;
    const acc_t* g = static_cast<const acc_t*>(J.g) + int64_t(b) * HW + slot * V;
    const acc_t* gl = static_cast<const acc_t*>(J.gl);
    acc_t gs[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      acc_t gg = g[v];
      if (gl != nullptr) gg = gg * gl[b];  // the CPU folds grad_loss into the map first, then scales
      gs[v] = gg * scale;
    }
    scalar_t* dx = static_cast<scalar_t*>(J.y) + off;
    int64_t c = cg;
    for (; c + int64_t(U - 1) * cw < C; c += int64_t(U) * cw) {
      Pack<scalar_t, V> pk[U];
#pragma unroll
      for (int u = 0; u < U; ++u) pk[u] = load_pack<scalar_t, V>(x + (c + int64_t(u) * cw) * HW);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        Pack<scalar_t, V> o;
#pragma unroll
        for (int v = 0; v < V; ++v)
          o.v[v] = static_cast<scalar_t>(gs[v] * bwd_term<acc_t, kPow2>(static_cast<acc_t>(pk[u].v[v]), p));
        store_pack<scalar_t, V>(dx + (c + int64_t(u) * cw) * HW, o);
      }
    }
    for (; c < C; c += cw) {
      const Pack<scalar_t, V> pk = load_pack<scalar_t, V>(x + c * HW);
      Pack<scalar_t, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v)
        o.v[v] = static_cast<scalar_t>(gs[v] * bwd_term<acc_t, kPow2>(static_cast<acc_t>(pk.v[v]), p));
      store_pack<scalar_t, V>(dx + c * HW, o);
    }
  }
}

// ------------------------------------------------------------------------------------------ NHWC
template <typename scalar_t, typename acc_t, int V, bool kPow2, bool kBwd>
__device__ __forceinline__ void nhwc_tile(const MapJob& J, int tile, acc_t p) {
  const int gl2 = J.log2, gsz = 1 << gl2, pw = 32 >> gl2;  // gsz lanes per position, pw positions per warp step
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane >> gl2, q = lane & (gsz - 1);
  const int b = tile / J.tiles_per_sample;
  const int t = tile - b * J.tiles_per_sample;
  const int64_t C = J.C, HW = J.HW, nch = C / V;  // nch packs per position
  const int steps = J.steps;
  const int64_t wpos = (int64_t(t) * kWarps + warp) * pw * steps;  // this warp's first position in the sample
  const int64_t base = int64_t(b) * HW;                             // the sample's first position
  const acc_t scale = job_scale<acc_t>(J);
  const scalar_t* x = static_cast<const scalar_t*>(J.x);
  const acc_t* gmap = static_cast<const acc_t*>(J.g);
  const acc_t* gl = static_cast<const acc_t*>(J.gl);
  // Independent loads in flight per lane (steps is a multiple of 4); one for p != 2, whose pow
  // calls would spill them.
  constexpr int U = kPow2 ? 4 : 1;

  if (nch <= 32) {
    // At most one pack per lane and position (gsz >= nch): U steps' loads are issued before use.
    for (int s0 = 0; s0 < steps; s0 += U) {
      Pack<scalar_t, V> pk[U];
      int64_t pos[U];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pos[u] = wpos + int64_t(s0 + u) * pw + sub;
        ok[u] = pos[u] < HW && q < nch;
        if (ok[u]) pk[u] = load_pack<scalar_t, V>(x + (base + pos[u]) * C + int64_t(q) * V);
      }
      if constexpr (!kBwd) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          acc_t a = acc_t(0);
          if (ok[u]) {
#pragma unroll
            for (int v = 0; v < V; ++v) a += fwd_term<acc_t, kPow2>(static_cast<acc_t>(pk[u].v[v]), p);
          }
          a = segment_sum(a, gsz);
          if (q == 0 && pos[u] < HW) static_cast<acc_t*>(J.y)[base + pos[u]] = a * scale;
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!ok[u]) continue;
          acc_t gg = gmap[base + pos[u]];
          if (gl != nullptr) gg = gg * gl[b];
          const acc_t gs = gg * scale;
          Pack<scalar_t, V> o;
#pragma unroll
          for (int v = 0; v < V; ++v)
            o.v[v] = static_cast<scalar_t>(gs * bwd_term<acc_t, kPow2>(static_cast<acc_t>(pk[u].v[v]), p));
          store_pack<scalar_t, V>(static_cast<scalar_t*>(J.y) + (base + pos[u]) * C + int64_t(q) * V, o);
        }
      }
    }
  } else {
    // gsz == 32, pw == 1: the warp walks one position's channel vector at a time.
    for (int s = 0; s < steps; ++s) {
      const int64_t pos = wpos + s;
      if (pos >= HW) break;  // uniform over the warp
      const scalar_t* xp = x + (base + pos) * C;
      if constexpr (!kBwd) {
        acc_t a[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        int64_t j = q;
        for (; j + 32 * (U - 1) < nch; j += 32 * U) {
          Pack<scalar_t, V> pk[U];
#pragma unroll
          for (int u = 0; u < U; ++u) pk[u] = load_pack<scalar_t, V>(xp + (j + 32 * u) * V);
#pragma unroll
          for (int u = 0; u < U; ++u)
#pragma unroll
            for (int v = 0; v < V; ++v) a[u] += fwd_term<acc_t, kPow2>(static_cast<acc_t>(pk[u].v[v]), p);
        }
        for (; j < nch; j += 32) {
          const Pack<scalar_t, V> pk = load_pack<scalar_t, V>(xp + j * V);
#pragma unroll
          for (int v = 0; v < V; ++v) a[0] += fwd_term<acc_t, kPow2>(static_cast<acc_t>(pk.v[v]), p);
        }
        acc_t tot = (a[0] + a[1]) + (a[2] + a[3]);
        tot = segment_sum(tot, 32);
        if (q == 0) static_cast<acc_t*>(J.y)[base + pos] = tot * scale;
      } else {
        acc_t gg = gmap[base + pos];
        if (gl != nullptr) gg = gg * gl[b];
        const acc_t gs = gg * scale;
        scalar_t* dp = static_cast<scalar_t*>(J.y) + (base + pos) * C;
        int64_t j = q;
        for (; j + 32 * (U - 1) < nch; j += 32 * U) {
          Pack<scalar_t, V> pk[U];
#pragma unroll
          for (int u = 0; u < U; ++u) pk[u] = load_pack<scalar_t, V>(xp + (j + 32 * u) * V);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            Pack<scalar_t, V> o;
#pragma unroll
            for (int v = 0; v < V; ++v)
              o.v[v] = static_cast<scalar_t>(gs * bwd_term<acc_t, kPow2>(static_cast<acc_t>(pk[u].v[v]), p));
            store_pack<scalar_t, V>(dp + (j + 32 * u) * V, o);
          }
        }
        for (; j < nch; j += 32) {
          const Pack<scalar_t, V> pk = load_pack<scalar_t, V>(xp + j * V);
          Pack<scalar_t, V> o;
#pragma unroll
          for (int v = 0; v < V; ++v)
            o.v[v] = static_cast<scalar_t>(gs * bwd_term<acc_t, kPow2>(static_cast<acc_t>(pk.v[v]), p));
          store_pack<scalar_t, V>(dp + j * V, o);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int V, bool kPow2, bool kBwd>
__device__ __forceinline__ void run_tile(const MapJob& J, int tile, acc_t p, acc_t* red) {
  if (J.nhwc) nhwc_tile<scalar_t, acc_t, V, kPow2, kBwd>(J, tile, p);
  else nchw_tile<scalar_t, acc_t, V, kPow2, kBwd>(J, tile, p, red);
}

// The job's dtype and pack width pick the code path; all threads of a block take the same one.
// Packed accesses for p == 2 (the hot path); any other p, and fp64 accumulation (a float64 input
// somewhere in the call: the testing path), use scalar accesses (make_map_job sets vec = 1).
template <typename acc_t, bool kBwd>
__device__ __forceinline__ void dispatch_tile(const MapJob& J, int tile, acc_t p, bool pow2, acc_t* red) {
  if constexpr (sizeof(acc_t) == 8) {
    switch (J.dtype) {  // abs_pow_dev has the exact p == 2 case
      case kF32: run_tile<float, acc_t, 1, false, kBwd>(J, tile, p, red); break;
      case kF16: run_tile<c10::Half, acc_t, 1, false, kBwd>(J, tile, p, red); break;
      case kBF16: run_tile<c10::BFloat16, acc_t, 1, false, kBwd>(J, tile, p, red); break;
      default: run_tile<double, acc_t, 1, false, kBwd>(J, tile, p, red); break;
    }
  } else if (!pow2) {
    switch (J.dtype) {
      case kF32: run_tile<float, acc_t, 1, false, kBwd>(J, tile, p, red); break;
      case kF16: run_tile<c10::Half, acc_t, 1, false, kBwd>(J, tile, p, red); break;
      default: run_tile<c10::BFloat16, acc_t, 1, false, kBwd>(J, tile, p, red); break;
    }
  } else {
    switch (J.dtype) {
      case kF32:
        if (J.vec == 4) run_tile<float, acc_t, 4, true, kBwd>(J, tile, p, red);
        else if (J.vec == 2) run_tile<float, acc_t, 2, true, kBwd>(J, tile, p, red);
        else run_tile<float, acc_t, 1, true, kBwd>(J, tile, p, red);
        break;
      case kF16:
        if (J.vec == 8) run_tile<c10::Half, acc_t, 8, true, kBwd>(J, tile, p, red);
        else if (J.vec == 4) run_tile<c10::Half, acc_t, 4, true, kBwd>(J, tile, p, red);
        else run_tile<c10::Half, acc_t, 1, true, kBwd>(J, tile, p, red);
        break;
      default:
        if (J.vec == 8) run_tile<c10::BFloat16, acc_t, 8, true, kBwd>(J, tile, p, red);
        else if (J.vec == 4) run_tile<c10::BFloat16, acc_t, 4, true, kBwd>(J, tile, p, red);
        else run_tile<c10::BFloat16, acc_t, 1, true, kBwd>(J, tile, p, red);
        break;
    }
  }
}

// Grid: one block per tile of every job (jobs back to back). Forward reads each x once.
// fp32: at most 64 registers, 4 blocks (1024 threads, each with 4-8 loads in flight) per SM;
// fp64 (testing) gets 128 so that its pow calls do not spill.
template <typename acc_t, bool kBwd>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 8 ? 2 : 4)
    map_kernel(const __grid_constant__ MapParams P) {
  // NCHW forward cross-warp partial sums: 256 threads x up to 8 (fp32) or 1 (fp64) positions.
  __shared__ __align__(16) acc_t red[kBwd ? 1 : kThreads * (sizeof(acc_t) == 8 ? 1 : 8)];
  int j = 0;
  while (j + 1 < P.njobs && static_cast<int>(blockIdx.x) >= P.job[j + 1].tile_begin) ++j;
  const MapJob J = P.job[j];
  const int tile = static_cast<int>(blockIdx.x) - J.tile_begin;
  dispatch_tile<acc_t, kBwd>(J, tile, static_cast<acc_t>(P.p), P.pow2 != 0, red);
}

int64_t tile_bytes(const MapJob& J, int64_t esize) {
  if (J.nhwc) return int64_t(kWarps) * (32 >> J.log2) * J.steps * J.C * esize;
  return int64_t(32) * (kWarps >> J.log2) * J.vec * J.C * esize;
}

int64_t elem_size(int dtype) { return dtype == kF64 ? 8 : (dtype == kF32 ? 4 : 2); }

}  // namespace

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": expected a 4-D (B, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, ": expected a float16/bfloat16/float32/float64 tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, name, ": expected at least one channel");
}

MapJob make_map_job(const at::Tensor& x, bool channels_last, void* y, const void* g, const void* gl, bool mean,
                    bool acc_double, bool pow2, bool bwd) {
  MapJob J{};
  J.x = x.const_data_ptr();
  J.y = y;
  J.g = g;
  J.gl = gl;
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(B <= INT_MAX, "dctkd_ext CUDA: batch ", B, " is too large");
  J.B = static_cast<int>(B);
  J.C = C;
  J.HW = HW;
  J.scale_d = mean ? 1.0 / static_cast<double>(C) : 1.0;
  J.scale_f = mean ? 1.0f / static_cast<float>(C) : 1.0f;
  J.dtype = dtype_code(x.scalar_type());
  // With H*W == 1 an NCHW tensor is laid out like a channels_last one: reduce contiguous channels.
  J.nhwc = (channels_last || HW == 1) ? 1 : 0;
  const int64_t esize = x.element_size();
  // Widest pack (16, else 8 bytes) that keeps every access aligned: the run it walks (H*W for NCHW,
  // C for NHWC) must be a multiple of the pack and the base pointers aligned to it.
  J.vec = 1;
  if (!acc_double && pow2) {
    const int64_t run = J.nhwc ? C : HW;
    for (int64_t bytes : {int64_t(16), int64_t(8)}) {
      const int64_t v = bytes / esize;
      const bool aligned =
          reinterpret_cast<uintptr_t>(J.x) % bytes == 0 && (!bwd || reinterpret_cast<uintptr_t>(y) % bytes == 0);
      if (v > 1 && run % v == 0 && aligned) {
        J.vec = static_cast<int>(v);
        break;
      }
    }
  }
  if (!J.nhwc) {
    // Warps split the channels (cw groups) once each has >= 4 channels to walk; the rest split slots.
    int cl2 = 0;
    while (cl2 < 3 && (int64_t(4) << cl2) < C) ++cl2;
    J.log2 = cl2;
    J.steps = 1;
    const int64_t slots_per_tile = int64_t(32) * (kWarps >> cl2);
    J.tiles_per_sample = static_cast<int>(ceil_div(HW / J.vec, slots_per_tile));
  } else {
    const int64_t nch = C / J.vec;
    int gl2 = 0;
    while (gl2 < 5 && (int64_t(1) << gl2) < nch) ++gl2;
    J.log2 = gl2;
    const int64_t pw = 32 >> gl2;
    const int64_t step_bytes = pw * C * esize;  // bytes one warp step reads
    int64_t steps;
    if (nch <= 32) {
      // about 4 KB per warp, in groups of 4 steps, no more than the sample needs
      steps = std::min<int64_t>(64, std::max<int64_t>(4, ceil_div(4096, step_bytes)));
      steps = std::min(steps, ceil_div(HW, int64_t(kWarps) * pw));
      steps = std::max<int64_t>(4, ceil_div(steps, 4) * 4);
    } else {
      steps = std::min<int64_t>(16, std::max<int64_t>(1, ceil_div(8192, step_bytes)));
      steps = std::max<int64_t>(1, std::min(steps, ceil_div(HW, int64_t(kWarps))));
    }
    J.steps = static_cast<int>(steps);
    J.tiles_per_sample = static_cast<int>(ceil_div(HW, int64_t(kWarps) * pw * steps));
  }
  return J;
}

void launch_map_jobs(std::vector<MapJob> jobs, bool bwd, bool acc_double, double p, cudaStream_t stream) {
  // Empty jobs take no blocks.
  jobs.erase(std::remove_if(jobs.begin(), jobs.end(), [](const MapJob& J) { return J.B == 0 || J.HW == 0; }),
             jobs.end());
  for (size_t first = 0; first < jobs.size(); first += kMaxJobs) {
    const size_t last = std::min(jobs.size(), first + kMaxJobs);
    // Heaviest tiles first: they start in the first wave and the light ones fill the tail.
    std::stable_sort(jobs.begin() + first, jobs.begin() + last, [](const MapJob& a, const MapJob& b) {
      return tile_bytes(a, elem_size(a.dtype)) > tile_bytes(b, elem_size(b.dtype));
    });
    MapParams P;
    memset(&P, 0, sizeof(P));
    int64_t tiles = 0;
    int n = 0;
    for (size_t i = first; i < last; ++i) {
      P.job[n] = jobs[i];
      P.job[n].tile_begin = static_cast<int>(tiles);
      tiles += int64_t(jobs[i].B) * jobs[i].tiles_per_sample;
      TORCH_CHECK(tiles <= INT_MAX, "dctkd_ext CUDA: feature tensors too large for one launch (", tiles, " tiles)");
      ++n;
    }
    P.njobs = n;
    P.pow2 = p == 2.0 ? 1 : 0;
    P.p = p;
    const dim3 grid(static_cast<unsigned>(tiles));
    if (acc_double) {
      if (bwd) map_kernel<double, true><<<grid, kThreads, 0, stream>>>(P);
      else map_kernel<double, false><<<grid, kThreads, 0, stream>>>(P);
    } else {
      if (bwd) map_kernel<float, true><<<grid, kThreads, 0, stream>>>(P);
      else map_kernel<float, false><<<grid, kThreads, 0, stream>>>(P);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

namespace {

bool parse_reduce_arg(const std::string& reduce) {
  Reduce r;
  TORCH_CHECK(parse_reduce(reduce, &r), "reduce: expected \"mean\" or \"sum\", got \"", reduce, "\"");
  return r == Reduce::Mean;
}

at::Tensor attention_map_cuda(const at::Tensor& x_in, double p, std::string reduce) {
  TORCH_CHECK(p > 0, "p: expected a positive exponent, got ", p);
  const bool mean = parse_reduce_arg(reduce);
  check_features(x_in, "x");
  TORCH_CHECK(x_in.is_cuda(), "x: expected a CUDA tensor, got one on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = reads_channels_last(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  const bool acc_double = x.scalar_type() == at::kDouble;
  at::Tensor out =
      at::empty({x.size(0), x.size(2), x.size(3)}, x.options().dtype(acc_double ? at::kDouble : at::kFloat));
  if (out.numel() == 0) return out;
  launch_map_jobs({make_map_job(x, cl, out.data_ptr(), nullptr, nullptr, mean, acc_double, p == 2.0, false)}, false,
                  acc_double, p, c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor attention_map_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, double p,
                                       std::string reduce) {
  TORCH_CHECK(p > 0, "p: expected a positive exponent, got ", p);
  const bool mean = parse_reduce_arg(reduce);
  check_features(x_in, "x");
  const int64_t B = x_in.size(0), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == H && grad_in.size(2) == W,
              "grad: expected shape (", B, ", ", H, ", ", W, ") to match x, got ", grad_in.sizes());
  TORCH_CHECK(x_in.is_cuda(), "x: expected a CUDA tensor, got one on ", x_in.device());
  TORCH_CHECK(grad_in.device() == x_in.device(), "grad: expected a tensor on ", x_in.device(), " like x, got one on ",
              grad_in.device());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), "grad: expected a floating tensor, got ",
              grad_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = reads_channels_last(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  const bool acc_double = x.scalar_type() == at::kDouble;
  const at::Tensor g = grad_in.to(acc_double ? at::kDouble : at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(x);  // keeps x's memory format
  if (dx.numel() == 0) return dx;
  launch_map_jobs({make_map_job(x, cl, dx.data_ptr(), g.const_data_ptr(), nullptr, mean, acc_double, p == 2.0, true)},
                  true, acc_double, p, c10::cuda::getCurrentCUDAStream());
  return dx;
}

}  // namespace
}  // namespace cuda
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CUDA, m) {
  m.impl("attention_map", &dctkd::cuda::attention_map_cuda);
  m.impl("attention_map_backward", &dctkd::cuda::attention_map_backward_cuda);
}
