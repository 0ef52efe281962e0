// The op schemas of dctkd_ext's C++ kernels (those of the spectral filters in csrc/spectral.cpp, of the
// CPU FAM layer in csrc/fam_layer.cpp, of local_attention in csrc/local_attention.cpp); kernels register
// under CPU (csrc/cpu/) and CUDA (csrc/cuda/), fake kernels and autograd from Python (dctkd_ext/ops/).
// Two ops of the namespace, fam_global and fam_layer, are Python custom_ops built from these
// (dctkd_ext/ops/spectral.py, dctkd_ext/ops/fam_layer.py).
#include <torch/library.h>

#ifndef DCTKD_NO_PYTHON  // the CMake (libtorch) build has no Python module
#include <Python.h>
extern "C" {
// `import dctkd_ext._C` loads this library, which runs the TORCH_LIBRARY registrations below.
// The module itself is empty: every op is reached through torch.ops.dctkd_ext.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(dctkd_ext, m) {
  // (B, C, H, W) -> (B, H, W): mean (or sum) over channels of |x|^p, accumulated in fp32 (fp64 for fp64).
  m.def("attention_map(Tensor x, float p, str reduce) -> Tensor");
  m.def("attention_map_backward(Tensor grad, Tensor x, float p, str reduce) -> Tensor");
  // Orthonormal DCT-II over the last two dims, and its inverse (DCT-III); each is the other's backward.
  m.def("dct2d(Tensor a) -> Tensor");
  m.def("idct2d(Tensor c) -> Tensor");
  // The whole multi-level DCT-KD loss. Returns the per-sample loss sum_l w_l dist_l, shape (B,),
  // and per level dL_b/dA_l (B, H_l, W_l), the gradient w.r.t. the student's attention map.
  m.def(
      "dct_at_loss(Tensor[] student, Tensor[] teacher, float[] weights, float p, str map_norm, "
      "bool center, str transform, bool coef_abs, str coef_norm, str distance, float eps) "
      "-> (Tensor, Tensor[])");
  // The same loss in one pass that also returns the student's gradient dS_l for the objective
  // sum_b grad_scale[b] * loss[b], written while S[b] is in cache (empty list when grad_scale is None).
  m.def(
      "dct_at_loss_fused(Tensor[] student, Tensor[] teacher, float[] weights, float p, str map_norm, "
      "bool center, str transform, bool coef_abs, str coef_norm, str distance, float eps, Tensor? grad_scale) "
      "-> (Tensor, Tensor[], Tensor[])");
  // dS_l = grad_loss[b] * grad_maps_l[b,h,w] * (p/C_l) |S_l|^(p-1) sign(S_l), one pass per level.
  m.def("dct_at_loss_backward(Tensor grad_loss, Tensor[] grad_maps, Tensor[] student, float p) -> Tensor[]");
}
