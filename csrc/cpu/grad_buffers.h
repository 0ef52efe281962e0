// Storage for the student-feature gradients the CPU kernels write (dS of the loss, dx of
// attention_map). Training frees them every step (`optimizer.zero_grad()` sets .grad to None) and
// asks for the same sizes again; from malloc, buffers this large (megabytes) come back as fresh
// pages each step, and the kernel's page faults and zeroing cost as much as writing the gradient.
// Buffers of 1 MiB and more go back to a per-process cache when their tensor dies (up to 256 MiB
// waiting in it; past that they are freed) and are handed out again for the same byte size.
#pragma once
#include <ATen/ATen.h>

namespace dctkd {
namespace cpu {

// An uninitialised tensor with x's sizes, strides (x dense: NCHW-contiguous or channels_last),
// dtype and device (CPU), whose storage is taken from / returned to the cache.
at::Tensor cached_empty_like(const at::Tensor& x);

}  // namespace cpu
}  // namespace dctkd
