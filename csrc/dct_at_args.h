// The invariants the dct_at_loss kernels rely on, one copy for the CPU and CUDA kernels (the Triton
// launchers in dctkd_ext/triton/dct_at_loss.py assert the same set): the level lists (counts, rank,
// floating dtype, at least one channel, matching B/H/W, one device, one weight per level), the option
// strings, and for the backward the shapes and device of grad_loss / grad_maps. The user-facing checks
// (types, layouts, hints) are the Python face's (dctkd_ext/ops/dct_at.py); these name the argument too.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "dctkd_math.h"

namespace dctkd {

struct LossOptions {
  Norm map_norm;
  Transform transform;
  Norm coef_norm;
  Distance distance;
};

inline Norm norm_arg(const std::string& s, const char* name) {
  Norm v;
  TORCH_CHECK(parse_norm(s, &v), name, ": expected one of \"minmax\", \"max\", \"l2\", \"none\", got \"", s, "\"");
  return v;
}

inline LossOptions parse_loss_options(double p, const std::string& map_norm, const std::string& transform,
                                      const std::string& coef_norm, const std::string& distance, double eps) {
  TORCH_CHECK(p > 0, "p: expected a positive exponent, got ", p);
  TORCH_CHECK(eps >= 0, "eps: expected a non-negative value, got ", eps);
  LossOptions o;
  TORCH_CHECK(parse_transform(transform, &o.transform),
              "transform: expected one of \"dct\", \"fft_real\", \"identity\", got \"", transform, "\"");
  TORCH_CHECK(parse_distance(distance, &o.distance), "distance: expected one of \"l2\", \"mse\", \"sse\", got \"",
              distance, "\"");
  o.map_norm = norm_arg(map_norm, "map_norm");
  o.coef_norm = norm_arg(coef_norm, "coef_norm");
  return o;
}

inline void check_level_tensor(const at::Tensor& x, const char* list, size_t l, const at::Device& dev) {
  TORCH_CHECK(x.dim() == 4, list, "[", l, "]: expected a 4-D (B, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), list, "[", l,
              "]: expected a float16/bfloat16/float32/float64 tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, list, "[", l, "]: expected at least one channel");
  TORCH_CHECK(x.device() == dev, list, "[", l, "]: expected a tensor on ", dev, ", got one on ", x.device());
}

inline void check_levels(const at::TensorList& student, const at::TensorList& teacher, at::ArrayRef<double> weights) {
  TORCH_CHECK(!student.empty(), "student_feats: expected a non-empty list of (B, C, H, W) tensors");
  TORCH_CHECK(student.size() == teacher.size(), "teacher_feats: expected ", student.size(),
              " levels to match student_feats, got ", teacher.size());
  TORCH_CHECK(weights.size() == student.size(), "weights: expected ", student.size(), " values, got ", weights.size());
  const at::Device dev = student[0].device();
  for (size_t l = 0; l < student.size(); ++l) {
    const at::Tensor& s = student[l];
    const at::Tensor& t = teacher[l];
    check_level_tensor(s, "student_feats", l, dev);
    check_level_tensor(t, "teacher_feats", l, dev);
    TORCH_CHECK(s.size(0) == student[0].size(0), "student_feats[", l, "]: expected batch ", student[0].size(0),
                ", got ", s.size(0));
    TORCH_CHECK(t.size(0) == s.size(0) && t.size(2) == s.size(2) && t.size(3) == s.size(3), "teacher_feats[", l,
                "]: expected B, H, W = ", s.size(0), ", ", s.size(2), ", ", s.size(3), " to match student_feats[", l,
                "], got ", t.sizes());
  }
}

// dct_at_loss_backward(grad_loss, grad_maps, student, p): one map gradient per level, grad_loss (B,)
// floating, each level a 4-D floating tensor with grad_maps[l] floating of shape (B, H, W), all on
// grad_loss's device.
inline void check_backward_levels(const at::Tensor& grad_loss, const at::TensorList& grad_maps,
                                  const at::TensorList& student) {
  TORCH_CHECK(grad_maps.size() == student.size(), "grad_maps: expected ", student.size(), " levels, got ",
              grad_maps.size());
  TORCH_CHECK(grad_loss.dim() == 1, "grad_loss: expected a 1-D (B,) tensor, got ", grad_loss.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()), "grad_loss: expected a floating tensor, got ",
              grad_loss.scalar_type());
  const at::Device dev = grad_loss.device();
  for (size_t l = 0; l < student.size(); ++l) {
    check_level_tensor(student[l], "student", l, dev);
    const int64_t B = student[l].size(0), H = student[l].size(2), W = student[l].size(3);
    TORCH_CHECK(grad_loss.size(0) == B, "grad_loss: expected ", B, " values, got ", grad_loss.size(0));
    const at::Tensor& g = grad_maps[l];
    TORCH_CHECK(g.dim() == 3 && g.size(0) == B && g.size(1) == H && g.size(2) == W, "grad_maps[", l,
                "]: expected shape (", B, ", ", H, ", ", W, ") to match student[", l, "], got ", g.sizes());
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "grad_maps[", l, "]: expected a floating tensor, got ",
                g.scalar_type());
    TORCH_CHECK(g.device() == dev, "grad_maps[", l, "]: expected a tensor on ", dev, " like grad_loss, got one on ",
                g.device());
  }
}

}  // namespace dctkd
