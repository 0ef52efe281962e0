// The host side of the local_attention ops that both C++ backends share: the invariants the kernels
// index by and the outputs' layout rule. The Python face checks the same things first with friendlier
// messages; these checks guard direct torch.ops.dctkd_ext.* calls.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace dctkd {

inline bool local_attention_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// q, k, v: (B, C, H, W) of one floating dtype on one device; rel: (C, K*K) in float32, float64 or q's
// dtype; K odd >= 1.
inline void check_local_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& rel, int64_t kernel_size) {
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D (B, C, H, W) tensor, got shape ", q.sizes());
  TORCH_CHECK(local_attention_dtype_ok(q.scalar_type()), "q: expected a float16/bfloat16/float32/float64 tensor, got ",
              q.scalar_type());
  const at::Tensor* kv[2] = {&k, &v};
  const char* names[2] = {"k", "v"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *kv[i];
    TORCH_CHECK(t.sizes() == q.sizes(), names[i], ": expected shape ", q.sizes(), " like q, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), names[i], ": expected dtype ", q.scalar_type(), " like q, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), names[i], ": expected a tensor on ", q.device(), " like q, got one on ",
                t.device());
  }
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "kernel_size: expected an odd integer >= 1, got ", kernel_size);
  const int64_t C = q.size(1);
  TORCH_CHECK(rel.dim() == 2 && rel.size(0) == C && rel.size(1) == kernel_size * kernel_size, "rel: expected shape (",
              C, ", ", kernel_size * kernel_size, ") = (C, kernel_size**2), got ", rel.sizes());
  TORCH_CHECK(
      rel.scalar_type() == at::kFloat || rel.scalar_type() == at::kDouble || rel.scalar_type() == q.scalar_type(),
      "rel: expected a float32/float64 tensor (or q's dtype ", q.scalar_type(), "), got ", rel.scalar_type());
  TORCH_CHECK(rel.device() == q.device(), "rel: expected a tensor on ", q.device(), " like q, got one on ",
              rel.device());
}

// grad of the backward: q's shape, dtype and device.
inline void check_local_attention_grad(const at::Tensor& grad, const at::Tensor& q) {
  TORCH_CHECK(grad.sizes() == q.sizes(), "grad: expected shape ", q.sizes(), " like q, got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == q.scalar_type(), "grad: expected dtype ", q.scalar_type(), " like q, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.device() == q.device(), "grad: expected a tensor on ", q.device(), " like q, got one on ",
              grad.device());
}

// The outputs (out, dq, dk, dv) are channels_last when q is (and not also NCHW-contiguous), else
// NCHW-contiguous.
inline bool local_attention_channels_last(const at::Tensor& q) {
  return q.dim() == 4 && !q.is_contiguous() && q.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::Tensor local_attention_output_like(const at::Tensor& q, at::ScalarType dtype) {
  return at::empty(q.sizes(), q.options().dtype(dtype),
                   local_attention_channels_last(q) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

inline at::Tensor local_attention_output_like(const at::Tensor& q) {
  return local_attention_output_like(q, q.scalar_type());
}

// The accumulation type: float64 for float64 inputs, else float32.
inline at::ScalarType local_attention_acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace dctkd
