// Op schemas of the spectral filters of FAM-KD / GFNet (docs/DESIGN.md §3.4). Complex tensors are complex64
// (complex128 for testing). Kernels register under CPU (csrc/cpu/spectral.cpp) and CUDA
// (csrc/cuda/spectral.cu); fake kernels, autograd and the Triton path live in dctkd_ext/ops/spectral.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dctkd_ext, m) {
  // Depthwise: y[b,c,h,k] = xf[b,c,h,k] * w[c,h,k] * mask[h,k]. xf (B, C, H, K), w (C, H, K), mask (H, K)
  // real or None. xf may be NCHW-contiguous or channels-last (a permuted (B, H, K, C)-contiguous
  // tensor, GFNet's layout); y has xf's layout.
  m.def("global_filter(Tensor xf, Tensor w, Tensor? mask) -> Tensor");
  // (dxf, dw) with PyTorch's conjugate convention: dxf = dy * conj(w) * mask, dw = sum_b dy * conj(xf) * mask.
  // need_xf / need_w false: that output is an empty tensor of shape (0,).
  m.def(
      "global_filter_backward(Tensor grad, Tensor xf, Tensor w, Tensor? mask, bool need_xf, bool need_w) "
      "-> (Tensor, Tensor)");
  // Channel mixing per frequency (a batched complex GEMM over the H*K frequencies):
  // y[b,o,h,k] = mask[h,k] * sum_i xf[b,i,h,k] * w[i,o,h,k]. xf (B, I, H, K), w (I, O, H, K).
  m.def("spectral_conv(Tensor xf, Tensor w, Tensor? mask) -> Tensor");
  // dxf[b,i] = mask * sum_o dy[b,o] conj(w[i,o]); dw[i,o] = mask * sum_b conj(xf[b,i]) dy[b,o].
  m.def(
      "spectral_conv_backward(Tensor grad, Tensor xf, Tensor w, Tensor? mask, bool need_xf, bool need_w) "
      "-> (Tensor, Tensor)");
  // The FAM filter on the rfft half plane (docs/DESIGN.md §3.4): w (..., H, W) complex ->
  // W'[..., m, k] = (M[m, k] w[..., m, k] + conj(M[-m, -k] w[..., -m, -k])) / 2 for k <= W/2, with M the
  // high-pass box of `cuton` (r = int(cuton * int(N / 2)) per dim, indices -r..r-1 zeroed in both dims).
  // For real x, Re(ifft2(M * w * fft2(x))) == irfft2(W' * rfft2(x)).
  m.def("fam_half_weight(Tensor w, float cuton) -> Tensor");
  // Its backward (PyTorch's convention), a gather: dw[p, q] = M[p, q] / 2 *
  // ([q < K] grad[p, q] + [-q mod W < K] conj(grad[-p, -q])), K = width // 2 + 1.
  m.def("fam_half_weight_backward(Tensor grad, float cuton, int width) -> Tensor");
}
