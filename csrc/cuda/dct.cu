// CUDA kernels of dct2d / idct2d (docs/DESIGN.md §3.2): orthonormal DCT-II over the last two dims,
// C = D_H A D_W^T, and its inverse A = D_H^T C D_W, computed in fp32 (fp64 for fp64 inputs).
//
// A block builds the two bases once (fp64 tables, rounded), then loops over maps: load a map into
// shared memory, two small matmuls (small_mm.cuh), store. Bytes: each map is read and written once
// (2 * 2 * H * W bytes for bf16); the work is ~2 H W (H + W) FMAs per map, done in shared memory.
// Maps too large for shared memory use a per-block global scratch instead (same code).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common.cuh"
#include "small_mm.cuh"

namespace dctkd {
namespace cuda {
namespace {

constexpr int kDctThreads = 256;

// Per-block memory: fp64 tables (4H + 4W), then in acc type the bases L_H (H x Hp) and L_W
// (W x Wp), the map X (H * W) and the transposed intermediate P (W rows of odd_ld(H)), each
// rounded up to 4 elements.
struct DctLayout {
  int64_t tab_bytes, lh, lw, x, p, bytes;
};

__host__ __device__ inline DctLayout dct_layout(int64_t H, int64_t W, int64_t tsize) {
  DctLayout L;
  L.tab_bytes = ((4 * H + 4 * W) * 8 + 15) / 16 * 16;
  const int64_t n4 = round_up4(H * W);
  L.lh = 0;
  L.lw = L.lh + H * round_up4(H);
  L.x = L.lw + W * round_up4(W);
  L.p = L.x + n4;
  L.bytes = L.tab_bytes + (L.p + round_up4(W * odd_ld(H))) * tsize;
  return L;
}

template <typename scalar_t, typename acc_t, bool kSmem>
__global__ void __launch_bounds__(kDctThreads)
    dct2d_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t maps, int H, int W, int inverse,
                 unsigned char* scratch, int64_t scratch_stride) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* base = kSmem ? smem : scratch + blockIdx.x * scratch_stride;
  const DctLayout lay = dct_layout(H, W, sizeof(acc_t));
  double* tab_h = reinterpret_cast<double*>(base);
  double* tab_w = tab_h + 4 * H;
  acc_t* tb = reinterpret_cast<acc_t*>(base + lay.tab_bytes);
  acc_t* LH = tb + lay.lh;
  acc_t* LW = tb + lay.lw;
  acc_t* X = tb + lay.x;
  acc_t* P = tb + lay.p;
  const int Hp = static_cast<int>(round_up4(H)), Wp = static_cast<int>(round_up4(W));
  const int Hq = static_cast<int>(odd_ld(H));
  const int n = H * W;

  dct_table(tab_h, H);
  dct_table(tab_w, W);
  __syncthreads();
  // forward: L = D_H then D_W (stored as D^T); inverse: L = D_H^T then D_W^T (stored as D)
  fill_basis(LH, H, Hp, inverse ? kDctN : kDctT, tab_h);
  fill_basis(LW, W, Wp, inverse ? kDctN : kDctT, tab_w);

  for (int64_t m = blockIdx.x; m < maps; m += gridDim.x) {
    const scalar_t* src = in + m * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) X[i] = static_cast<acc_t>(src[i]);
    __syncthreads();
    mm_t<acc_t, 0>(LH, nullptr, Hp, X, nullptr, W, P, nullptr, Hq, H, W, H);  // P = (L_H X)^T   (W x H)
    __syncthreads();
    mm_t<acc_t, 0>(LW, nullptr, Wp, P, nullptr, Hq, X, nullptr, W, W, H, W);  // X = L_H X L_W^T (H x W)
    __syncthreads();
    scalar_t* dst = out + m * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = static_cast<scalar_t>(X[i]);
    __syncthreads();  // X is reloaded by the next map
  }
}

at::Tensor dct2d_common(const at::Tensor& a_in, bool inverse) {
  const char* name = inverse ? "c" : "a";
  TORCH_CHECK(a_in.dim() >= 2, name, ": expected a tensor with at least 2 dims (..., H, W), got ", a_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(a_in.scalar_type()), name,
              ": expected a float16/bfloat16/float32/float64 tensor, got ", a_in.scalar_type());
  TORCH_CHECK(a_in.is_cuda(), name, ": expected a CUDA tensor, got one on ", a_in.device());
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const int64_t H = a.size(-2), W = a.size(-1);
  at::Tensor y = at::empty(a.sizes(), a.options());
  if (a.numel() == 0) return y;
  TORCH_CHECK(H <= 4096 && W <= 4096, name, ": maps of ", H, " x ", W,
              " are too large for the CUDA dct2d kernel (at most 4096 per side)");
  const int64_t maps = a.numel() / (H * W);
  const bool dbl = a.scalar_type() == at::kDouble;
  const DctLayout lay = dct_layout(H, W, dbl ? 8 : 4);
  const bool in_smem = lay.bytes <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  // Enough blocks to fill the GPU; each builds the bases once and then walks its maps.
  int64_t grid = capped_grid(maps, 8);
  at::Tensor scratch;
  int64_t stride = 0;
  if (!in_smem) {
    stride = (lay.bytes + 255) / 256 * 256;
    grid = std::max<int64_t>(1, std::min<int64_t>(grid, (int64_t(1) << 30) / stride));  // <= ~1 GiB of scratch
    scratch = at::empty({grid * stride}, a.options().dtype(at::kByte));
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dct2d_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* ip = a.const_data_ptr<scalar_t>();
    scalar_t* op = y.mutable_data_ptr<scalar_t>();
    if (in_smem) {
      auto kernel = dct2d_kernel<scalar_t, acc_t, true>;
      allow_dynamic_smem(kernel, lay.bytes);
      kernel<<<static_cast<unsigned>(grid), kDctThreads, lay.bytes, stream>>>(ip, op, maps, H, W, inverse ? 1 : 0,
                                                                              nullptr, 0);
    } else {
      dct2d_kernel<scalar_t, acc_t, false><<<static_cast<unsigned>(grid), kDctThreads, 0, stream>>>(
          ip, op, maps, H, W, inverse ? 1 : 0, scratch.mutable_data_ptr<unsigned char>(), stride);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor dct2d_cuda(const at::Tensor& a) { return dct2d_common(a, false); }
at::Tensor idct2d_cuda(const at::Tensor& c) { return dct2d_common(c, true); }

}  // namespace
}  // namespace cuda
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CUDA, m) {
  m.impl("dct2d", &dctkd::cuda::dct2d_cuda);
  m.impl("idct2d", &dctkd::cuda::idct2d_cuda);
}
