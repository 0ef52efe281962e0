// Host-side argument checks of dct_at_loss shared by the CPU and CUDA kernels: the level lists
// (rank, dtype, matching B/H/W, one device, weights) and the option strings. Every message names
// the argument, as the Python face does.
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
  TORCH_CHECK(x.device() == dev, list, "[", l, "]: expected a tensor on ", dev, " like student_feats[0], got one on ",
              x.device());
}

inline void check_levels(const at::TensorList& student, const at::TensorList& teacher, at::ArrayRef<double> weights) {
  TORCH_CHECK(!student.empty(), "student_feats: expected a non-empty list of (B, C, H, W) tensors");
  TORCH_CHECK(student.size() == teacher.size(), "teacher_feats: expected ", student.size(),
              " levels to match student_feats, got ", teacher.size());
  TORCH_CHECK(weights.size() == student.size(), "weights: expected ", student.size(), " values, got ",
              weights.size());
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

}  // namespace dctkd
