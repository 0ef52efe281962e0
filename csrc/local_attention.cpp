// Op schemas of FAM-KD's local self-attention (docs/DESIGN.md §3.5). Kernels register under CPU
// (csrc/cpu/local_attention.cpp) and CUDA (csrc/cuda/local_attention.cu); fake kernels, autograd and the
// Triton path live in dctkd_ext/ops/local_attention.py. Invariants: csrc/local_attention_common.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dctkd_ext, m) {
  // Per channel, pixel p and window offset j = (a, b) in [0, K)^2 (K odd, pad = K // 2), k and v zero-padded:
  //   logit[b,c,p,j] = q[b,c,p] * (k[b,c,p+j-pad] + rel[c,j]),  attn = softmax_j(logit),
  //   out[b,c,p] = sum_j attn[b,c,p,j] * v[b,c,p+j-pad].
  // q, k, v (B, C, H, W) of one dtype, any strides; rel (C, K*K). out in q's dtype and layout rule.
  m.def("local_attention(Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size) -> Tensor");
  // (dq, dk, dv, drel) from the output gradient and the forward's inputs (the softmax is recomputed):
  //   dlogit_j = attn_j * grad * (v_j - out);  dq = sum_j dlogit_j (k_j + rel_j);
  //   dk[p+j] += dlogit_j q[p], dv[p+j] += attn_j grad (in-image neighbours); drel[c,j] = sum_{b,p} dlogit_j q[p].
  // A gradient whose need_* is false is an empty tensor of shape (0,).
  m.def(
      "local_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size, "
      "bool need_q, bool need_k, bool need_v, bool need_rel) -> (Tensor, Tensor, Tensor, Tensor)");
}
