// SIMT emulation of the CUDA device code on the CPU: one std::thread per CUDA thread, blocks run one
// after another, __syncthreads and warp shuffles via std::barrier. For checking kernel logic only.
#pragma once
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef int cudaError_t;

namespace emu {
inline thread_local dim3 tidx, bidx;
inline thread_local int tlin;  // linear thread index in the block (x fastest): lane = tlin % 32
inline dim3 bdim, gdim;
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
inline uint64_t xbuf[32][32];
inline unsigned char* dyn_smem = nullptr;
inline int smem_optin = getenv("EMU_SMEM") ? atoi(getenv("EMU_SMEM")) : 232448;  // H100
inline int64_t launches = 0, blocks_run = 0;

inline void sync() { block_bar->arrive_and_wait(); }

template <class T>
T shfl_xor(T v, int o) {
  static_assert(sizeof(T) <= 8, "");
  const int t = tlin, w = t / 32, l = t % 32;
  memcpy(&xbuf[w][l], &v, sizeof(T));
  warp_bar[w]->arrive_and_wait();
  T r;
  memcpy(&r, &xbuf[w][l ^ o], sizeof(T));
  warp_bar[w]->arrive_and_wait();
  return r;
}

template <class F>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, F f) {
  ++launches;
  if (grid.x == 0) { fprintf(stderr, "emu: launch with an empty grid\n"); abort(); }
  if ((long)smem > smem_optin) { fprintf(stderr, "emu: %zu bytes of dynamic smem > opt-in\n", smem); abort(); }
  gdim = grid;
  bdim = block;
  const int nt = block.x * block.y * block.z;
  const unsigned nb = grid.x * grid.y * grid.z;
  for (unsigned b = 0; b < nb; ++b) {
    ++blocks_run;
    std::vector<unsigned char> dyn(smem ? smem : 1, 0xFF);  // 0xFF bytes: NaN in fp32 and fp64
    dyn_smem = dyn.data();
    block_bar = std::make_unique<std::barrier<>>(nt);
    warp_bar.clear();
    for (int w = 0; w < (nt + 31) / 32; ++w) warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
    std::vector<std::thread> ts;
    ts.reserve(nt);
    for (int t = 0; t < nt; ++t)
      ts.emplace_back([&, t, b] {
        tlin = t;
        tidx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        bidx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
        f();
        warp_bar[t / 32]->arrive_and_drop();
        block_bar->arrive_and_drop();
      });
    for (auto& th : ts) th.join();
  }
}
}  // namespace emu

#define threadIdx (emu::tidx)
#define blockIdx (emu::bidx)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __syncthreads() emu::sync()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor((v), (o))

template <class T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) { fprintf(stderr, "emu: misaligned __ldg\n"); abort(); }
  return *p;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::cos; using std::sin; using std::sqrt; using std::pow; using std::fabs;
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::smem_optin : 132;
  return 0;
}
template <class K> inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int v) {
  if (v > emu::smem_optin) { fprintf(stderr, "emu: smem attribute too large\n"); abort(); }
  return 0;
}
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
