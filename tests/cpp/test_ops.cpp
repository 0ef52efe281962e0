// C++ checks of the ops through the dispatcher, with libtorch only (run by ctest): the DCT against
// its formula, the inverse, attention_map against a plain reduction, and dct_at_loss invariants
// plus a finite-difference check of its gradient. Exit code 0 = pass.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const char* what, double value) {
  std::printf("%s %s (%.3e)\n", ok ? "PASS" : "FAIL", what, value);
  if (!ok) ++failures;
}

template <typename Sig>
auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-300);
}

using LossSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::TensorList, at::ArrayRef<double>,
                                                                double, std::string, bool, std::string, bool,
                                                                std::string, std::string, double);

}  // namespace

int main() {
  at::manual_seed(1234);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);

  // dct2d against D[k,m] = s(k) cos(pi (2m+1) k / 2N) applied on both sides.
  auto dct2d = op<at::Tensor(const at::Tensor&)>("dctkd_ext::dct2d");
  auto idct2d = op<at::Tensor(const at::Tensor&)>("dctkd_ext::idct2d");
  for (auto hw : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {7, 7}, {5, 9}, {56, 56}}) {
    auto basis = [&](int64_t n) {
      auto d = at::empty({n, n}, f64);
      for (int64_t k = 0; k < n; ++k)
        for (int64_t m = 0; m < n; ++m)
          d[k][m] = (k == 0 ? std::sqrt(1.0 / n) : std::sqrt(2.0 / n)) * std::cos(M_PI * (2 * m + 1) * k / (2.0 * n));
      return d;
    };
    auto a = at::randn({3, hw.first, hw.second}, f64);
    auto expect = at::matmul(at::matmul(basis(hw.first), a), basis(hw.second).t());
    check(rel(dct2d.call(a), expect) < 1e-12, "dct2d matches the formula", rel(dct2d.call(a), expect));
    check(rel(idct2d.call(dct2d.call(a)), a) < 1e-12, "idct2d inverts dct2d", rel(idct2d.call(dct2d.call(a)), a));
  }

  // attention_map, NCHW and channels_last, against a plain reduction.
  auto amap = op<at::Tensor(const at::Tensor&, double, std::string)>("dctkd_ext::attention_map");
  auto x = at::randn({2, 5, 6, 7});
  auto expect = x.to(at::kDouble).pow(2).mean(1);
  check(rel(amap.call(x, 2.0, "mean"), expect) < 1e-6, "attention_map NCHW", rel(amap.call(x, 2.0, "mean"), expect));
  auto xcl = x.contiguous(at::MemoryFormat::ChannelsLast);
  check(rel(amap.call(xcl, 2.0, "mean"), expect) < 1e-6, "attention_map channels_last",
        rel(amap.call(xcl, 2.0, "mean"), expect));

  // dct_at_loss: zero for identical maps; its dL/dA agrees with a central finite difference.
  auto loss = op<LossSig>("dctkd_ext::dct_at_loss");
  auto s = at::randn({2, 3, 5, 4}, f64) + 0.1;
  auto t = at::randn({2, 6, 5, 4}, f64) + 0.1;
  auto same = std::get<0>(loss.call({s}, {s.clone()}, {1.0}, 2.0, "minmax", true, "dct", true, "minmax", "l2", 1e-8));
  check(same.abs().max().item<double>() == 0.0, "identical inputs give zero loss", same.abs().max().item<double>());
  auto out = loss.call({s}, {t}, {1.0}, 2.0, "minmax", true, "dct", true, "minmax", "l2", 1e-8);
  auto backward = op<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, double)>(
      "dctkd_ext::dct_at_loss_backward");
  auto ds = backward.call(at::ones({2}, f64), std::get<1>(out), {s}, 2.0)[0];
  double worst = 0;
  const double h = 1e-6;
  for (int64_t i = 0; i < s.numel(); i += 7) {
    auto sp = s.clone(), sm = s.clone();
    sp.view(-1)[i] += h;
    sm.view(-1)[i] -= h;
    double lp = std::get<0>(loss.call({sp}, {t}, {1.0}, 2.0, "minmax", true, "dct", true, "minmax", "l2", 1e-8))
                    .sum()
                    .item<double>();
    double lm = std::get<0>(loss.call({sm}, {t}, {1.0}, 2.0, "minmax", true, "dct", true, "minmax", "l2", 1e-8))
                    .sum()
                    .item<double>();
    double fd = (lp - lm) / (2 * h);
    worst = std::max(worst, std::abs(fd - ds.view(-1)[i].item<double>()) / std::max(1.0, std::abs(fd)));
  }
  check(worst < 1e-6, "dct_at_loss gradient matches finite differences", worst);

  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
