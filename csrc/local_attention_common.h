// The host-side rules of local_attention (docs/DESIGN.md §3.5) that the CPU (csrc/cpu/local_attention.cpp)
// and CUDA (csrc/cuda/local_attention.cu) kernels share: the invariants they index by, the accumulation
// dtype and the outputs' allocation. The Python face (dctkd_ext/ops/local_attention.py) checks the same
// things first with friendlier messages; these checks guard direct torch.ops.dctkd_ext.* calls.
#pragma once
#include <ATen/ATen.h>

#include "layout.h"

namespace dctkd {
namespace local_attention {

inline bool is_feature_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_feature(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D (B, C, H, W) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), " like q, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), name, ": expected shape ", q.sizes(), " like q, got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), name, ": expected a tensor on ", q.device(), " like q, got one on ",
              t.device());
}

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                         int64_t kernel_size) {
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D (B, C, H, W) tensor, got shape ", q.sizes());
  TORCH_CHECK(is_feature_dtype(q.scalar_type()), "q: expected float32, float64, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(q.size(2) >= 1 && q.size(3) >= 1, "q: expected H, W >= 1, got shape ", q.sizes());
  check_feature(k, "k", q);
  check_feature(v, "v", q);
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "kernel_size: expected an odd integer >= 1, got ", kernel_size);
  TORCH_CHECK(
      rel.scalar_type() == at::kFloat || rel.scalar_type() == at::kDouble || rel.scalar_type() == q.scalar_type(),
      "rel: expected float32, float64 or q's dtype ", q.scalar_type(), ", got ", rel.scalar_type());
  TORCH_CHECK(rel.dim() == 2 && rel.size(0) == q.size(1) && rel.size(1) == kernel_size * kernel_size,
              "rel: expected shape (", q.size(1), ", ", kernel_size * kernel_size, ") = (C, kernel_size^2), got ",
              rel.sizes());
  TORCH_CHECK(rel.device() == q.device(), "rel: expected a tensor on ", q.device(), " like q, got one on ",
              rel.device());
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& q) {
  TORCH_CHECK(grad.scalar_type() == q.scalar_type(), "grad: expected dtype ", q.scalar_type(), " like q, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == q.sizes(), "grad: expected shape ", q.sizes(), " like q, got ", grad.sizes());
  TORCH_CHECK(grad.device() == q.device(), "grad: expected a tensor on ", q.device(), " like q, got one on ",
              grad.device());
}

// float64 when q or rel is float64, else float32 (dctkd_ext/_dtypes.py).
inline at::ScalarType acc_dtype(const at::Tensor& q, const at::Tensor& rel) {
  return q.scalar_type() == at::kDouble || rel.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// out, dq, dk and dv: channels_last when q is read channels-last (csrc/layout.h), else NCHW-contiguous.
inline at::Tensor new_feature(const at::Tensor& q, at::ScalarType dtype) {
  return at::empty(q.sizes(),
                   q.options().dtype(dtype).memory_format(reads_channels_last(q) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous));
}

inline at::Tensor new_feature(const at::Tensor& q) { return new_feature(q, q.scalar_type()); }

// The placeholder returned for a gradient that was not asked for.
inline at::Tensor not_needed(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace local_attention
}  // namespace dctkd
