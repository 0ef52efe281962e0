# Turns csrc/cuda/* into C++ sources of a CPU-emulated extension: the same device and host code,
# with kernel launches run by emu.h and the ops registered as torch.ops.dctkd_emu.* (CPU key).
# usage: python prep.py OUT_DIR
import os, re, shutil, sys
here = os.path.dirname(os.path.abspath(__file__))
src, dst = os.path.dirname(here), sys.argv[1]
os.makedirs(dst, exist_ok=True)
for name in os.listdir(src):
    if not (name.endswith('.cu') or name.endswith('.cuh')):
        continue
    s = open(os.path.join(src, name)).read()
    s = re.sub(r'#include <(c10/cuda/[^>]*|cuda_runtime\.h|ATen/cuda/[^>]*)>\n', '', s)
    s = re.sub(r'#include "\.\./(\w+\.h)"', r'#include "\1"', s)  # csrc/*.h, copied beside below
    if name == 'common.cuh' or name == 'attention_map.cuh':
        s = s.replace('#pragma once\n', '#pragma once\n#include "emu.h"\n', 1)
    if name == 'spectral.cu':
        s = s.replace('#include <ATen/ATen.h>\n', '#include <ATen/ATen.h>\n#include "emu.h"\n', 1)
    s = s.replace('c10::cuda::getCurrentCUDAStream().stream()', 'cudaStream_t(nullptr)')
    s = re.sub(r'extern __shared__ __align__\(16\) unsigned char smem\[\];', 'unsigned char* smem = emu::dyn_smem;', s)
    s = re.sub(r'\s*const c10::cuda::CUDAGuard guard\([^;]*\);', '', s)
    s = s.replace('c10::cuda::getCurrentCUDAStream()', 'cudaStream_t(nullptr)')
    s = s.replace('.is_cuda()', '.is_cpu()')
    s = re.sub(r'([\w:]+(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);', lambda m: 'emu::launch(%s, [=]() { %s(%s); });' % (m.group(2), m.group(1), m.group(3)), s, flags=re.S)
    s = s.replace('TORCH_LIBRARY_IMPL(dctkd_ext, CUDA, m)', 'TORCH_LIBRARY_IMPL(dctkd_emu, CPU, m)')
    out = name.replace('.cu', '.cpp') if name.endswith('.cu') else name
    open(os.path.join(dst, out), 'w').write(s)
open(os.path.join(dst, 'lib.cpp'), 'w').write('''#include <torch/library.h>
#include "emu.h"
TORCH_LIBRARY(dctkd_emu, m) {
  m.def("attention_map(Tensor x, float p, str reduce) -> Tensor");
  m.def("attention_map_backward(Tensor grad, Tensor x, float p, str reduce) -> Tensor");
  m.def("dct2d(Tensor a) -> Tensor");
  m.def("idct2d(Tensor c) -> Tensor");
  m.def("dct_at_loss(Tensor[] student, Tensor[] teacher, float[] weights, float p, str map_norm, bool center, str transform, bool coef_abs, str coef_norm, str distance, float eps) -> (Tensor, Tensor[])");
  m.def("dct_at_loss_backward(Tensor grad_loss, Tensor[] grad_maps, Tensor[] student, float p) -> Tensor[]");
  m.def("global_filter(Tensor xf, Tensor w, Tensor? mask) -> Tensor");
  m.def("global_filter_backward(Tensor grad, Tensor xf, Tensor w, Tensor? mask, bool need_xf, bool need_w) -> (Tensor, Tensor)");
  m.def("spectral_conv(Tensor xf, Tensor w, Tensor? mask) -> Tensor");
  m.def("spectral_conv_backward(Tensor grad, Tensor xf, Tensor w, Tensor? mask, bool need_xf, bool need_w) -> (Tensor, Tensor)");
  m.def("fam_half_weight(Tensor w, float cuton) -> Tensor");
  m.def("fam_half_weight_backward(Tensor grad, float cuton, int width) -> Tensor");
  m.def("stats() -> int[]");
}
static std::vector<int64_t> stats() { return {emu::launches, emu::blocks_run}; }
TORCH_LIBRARY_IMPL(dctkd_emu, CompositeExplicitAutograd, m) { m.impl("stats", &stats); }
''')
shutil.copy(os.path.join(here, 'emu.h'), dst)
for h in os.listdir(os.path.dirname(src)):
    if h.endswith('.h'):
        shutil.copy(os.path.join(os.path.dirname(src), h), dst)
