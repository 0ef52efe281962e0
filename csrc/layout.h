// The one rule, for every op, for the memory order in which the kernels read a 4-D (B, C, H, W)
// tensor (feature maps, attention inputs, spectra) and in which they write outputs that follow it.
#pragma once
#include <ATen/ATen.h>

namespace dctkd {

// Channels-last when x is channels_last-contiguous and not also NCHW-contiguous (where both hold,
// e.g. C == 1 or H == W == 1, the NCHW reading is taken); anything else is read NCHW-contiguous
// (a copy where x is neither).
inline bool reads_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace dctkd
