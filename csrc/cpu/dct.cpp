// CPU kernels of dct2d / idct2d (docs/DESIGN.md §3.2): orthonormal DCT-II over the last two dims as
// C = D_H A D_W^T, and its exact inverse A = D_H^T C D_W, parallel over the leading dims; each map
// through dct2_map (map_transforms.h: each product split into its even and odd halves).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "map_transforms.h"

namespace dctkd {
namespace cpu {
namespace {

template <typename in_t, typename acc_t>
void dct2d_maps(const in_t* x, in_t* y, int64_t N, int64_t H, int64_t W, bool inverse) {
  const DctHalves<acc_t>& qh = dct_halves<acc_t>(H);
  const DctHalves<acc_t>& qw = dct_halves<acc_t>(W);
  constexpr bool same = std::is_same_v<in_t, acc_t>;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(same ? 0 : H * W), out(same ? 0 : H * W);
    MapScratch<acc_t> scratch(std::max(H, W));
    for (int64_t i = begin; i < end; ++i) {
      const in_t* xi = x + i * H * W;
      in_t* yi = y + i * H * W;
      if constexpr (same) {
        dct2_map(xi, yi, qh, qw, inverse, scratch);
      } else {
        for (int64_t j = 0; j < H * W; ++j) a[j] = static_cast<acc_t>(xi[j]);
        dct2_map(a.data(), out.data(), qh, qw, inverse, scratch);
        for (int64_t j = 0; j < H * W; ++j) yi[j] = static_cast<in_t>(out[j]);
      }
    }
  });
}

at::Tensor dct2d_common(const at::Tensor& a_in, bool inverse) {
  const char* name = inverse ? "c" : "a";
  TORCH_CHECK(a_in.dim() >= 2, name, ": expected a tensor with at least 2 dims (..., H, W), got ", a_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(a_in.scalar_type()), name,
              ": expected a float16/bfloat16/float32/float64 tensor, got ", a_in.scalar_type());
  const at::Tensor a = a_in.contiguous();
  const int64_t H = a.size(-2), W = a.size(-1);
  at::Tensor y = at::empty(a.sizes(), a.options());
  if (a.numel() == 0) return y;
  const int64_t N = a.numel() / (H * W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dct2d_cpu", [&] {
    if (a.scalar_type() == at::kDouble)
      dct2d_maps<scalar_t, double>(a.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, H, W, inverse);
    else dct2d_maps<scalar_t, float>(a.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, H, W, inverse);
  });
  return y;
}

at::Tensor dct2d_cpu(const at::Tensor& a) { return dct2d_common(a, false); }
at::Tensor idct2d_cpu(const at::Tensor& c) { return dct2d_common(c, true); }

}  // namespace
}  // namespace cpu
}  // namespace dctkd

TORCH_LIBRARY_IMPL(dctkd_ext, CPU, m) {
  m.impl("dct2d", &dctkd::cpu::dct2d_cpu);
  m.impl("idct2d", &dctkd::cpu::idct2d_cpu);
}
