// Op schemas of the whole FAM layer as one spectral GEMM (docs/DESIGN.md §3.4). The 1x1 conv is the same real
// matrix at every frequency, so it folds into the frequency weight:
//   out = irfft2((rate1 W'(k) + rate2 w0^T) rfft2(x)) + rate2 b
// with W' the symmetrised, masked half-plane weight of fam_half_weight. Kernels: CPU in
// csrc/cpu/fam_layer.cpp; fake kernels, autograd and the GPU composite in dctkd_ext/ops/fam_layer.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dctkd_ext, m) {
  // x (B, I, H, W) float32/float64; weights1 (I, O, H, W) complex of x's precision; w0_weight (O, I, 1, 1)
  // and w0_bias (O,) (or None), rate1 and rate2 (1,) of x's dtype. Returns (B, O, H, W).
  m.def(
      "fam_layer_forward(Tensor x, Tensor weights1, Tensor w0_weight, Tensor? w0_bias, Tensor rate1, "
      "Tensor rate2, float cuton) -> Tensor");
  // Gradients (dx, dweights1, dw0_weight, dw0_bias, drate1, drate2) in PyTorch's conventions from the
  // output gradient and the forward's inputs (nothing else is saved). An output not asked for in
  // `needs` is an empty tensor of shape (0,).
  m.def(
      "fam_layer_backward(Tensor grad, Tensor x, Tensor weights1, Tensor w0_weight, Tensor? w0_bias, "
      "Tensor rate1, Tensor rate2, float cuton, bool[6] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
