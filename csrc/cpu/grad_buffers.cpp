// The gradient-buffer cache of grad_buffers.h.
#include "grad_buffers.h"

#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#include <map>
#include <mutex>

namespace dctkd {
namespace cpu {
namespace {

// Below this a buffer comes from malloc's own free lists (no page faults): not worth caching.
constexpr size_t kMinCachedBytes = size_t(1) << 20;
// At most this much memory waits in the cache; a buffer that would exceed it is freed.
constexpr size_t kMaxCachedBytes = size_t(256) << 20;

class BufferCache {
 public:
  // `reported`: whether the profiler was told of this buffer (then it is told of its return too).
  void* take(size_t nbytes, bool& reported) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(nbytes);
      if (it != free_.end()) {
        p = it->second;
        free_.erase(it);
        cached_ -= nbytes;
      }
      in_use_ += nbytes;
    }
    if (p == nullptr) p = c10::alloc_cpu(nbytes);
    reported = c10::memoryProfilingEnabled();
    if (reported) report(p, static_cast<int64_t>(nbytes));
    return p;
  }
  void give(void* p, size_t nbytes, bool reported) {
    if (reported && c10::memoryProfilingEnabled()) report(p, -static_cast<int64_t>(nbytes));
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ -= nbytes;
      if (cached_ + nbytes <= kMaxCachedBytes) {
        free_.emplace(nbytes, p);
        cached_ += nbytes;
        return;
      }
    }
    c10::free_cpu(p);
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, in_use_ = 0;

  // A buffer handed out while torch.profiler records memory counts as allocated, and its return as
  // freed, as the default CPU allocator reports them; the cache itself is reserved, not allocated.
  void report(void* p, int64_t delta) {
    size_t in_use, reserved;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use = in_use_;
      reserved = in_use_ + cached_;
    }
    c10::reportMemoryUsageToProfiler(p, delta, in_use, reserved, c10::Device(c10::kCPU));
  }
};

// Never destroyed: tensors that outlive static destruction still return their buffer.
BufferCache& cache() {
  static BufferCache* c = new BufferCache();
  return *c;
}

}  // namespace

at::Tensor cached_empty_like(const at::Tensor& x) {
  const size_t nbytes = static_cast<size_t>(x.numel()) * x.element_size();
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "cached_empty_like: expected a dense tensor");
  if (nbytes < kMinCachedBytes) return at::empty_strided(x.sizes(), x.strides(), x.options());
  bool reported = false;
  void* p = cache().take(nbytes, reported);
  return at::from_blob(
      p, x.sizes(), x.strides(), [nbytes, reported](void* q) { cache().give(q, nbytes, reported); }, x.options());
}

}  // namespace cpu
}  // namespace dctkd
