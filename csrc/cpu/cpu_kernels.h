// CPU entry points shared between the op families in csrc/cpu/.
#pragma once
#include <ATen/ATen.h>

namespace dctkd {
namespace cpu {

// fp64 accumulation for fp64 inputs, fp32 for everything else.
at::ScalarType acc_dtype_for(at::ScalarType t);

// (B, C, H, W) -> (B, H, W) in acc_type: (1/C if mean) * sum_c |x|^p. Reads x once.
at::Tensor attention_map_into(const at::Tensor& x, double p, bool mean, at::ScalarType acc_type);

// dx = grad[b,h,w] * (p/C if mean) * |x|^(p-1) sign(x), in x's dtype and memory format.
at::Tensor attention_map_backward_impl(const at::Tensor& grad, const at::Tensor& x, double p, bool mean);

}  // namespace cpu
}  // namespace dctkd
