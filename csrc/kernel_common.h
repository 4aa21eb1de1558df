// What the CPU kernel files of gfnet._C share (one file per op: focus_crop.cpp, glance_resize.cpp,
// focus_crop_bilinear.cpp): the compute dtype, strides, the normalisation in the reference's order, the common
// argument checks and the nested dtype dispatch. Python (gfnet/ops/) validates the arguments and allocates the
// outputs; the kernels check what they rely on for memory safety and fill the outputs in place. Parallel with
// at::parallel_for on PyTorch's intra-op thread pool (so torch.set_num_threads governs them).
#pragma once
#include "gfnet.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace gfnet_cpu {


// Rows per parallel chunk: about 16k output values, so that small batches run inline on the calling thread
// (waking an OpenMP team costs more than cropping a few patches, and much more on a busy machine).
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
}

// Computations follow the reference's dtypes: float64 for float64 images, float32 otherwise.
template <typename in_t>
using opmath_for = std::conditional_t<std::is_same_v<in_t, double>, double, float>;

struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Per-channel normalisation in the reference's order: v / 255 (uint8), then (v - mean) / std, each rounded.
template <typename opmath>
struct Normaliser {
  bool uint8 = false;
  bool normalise = false;
  opmath mean[3] = {0, 0, 0};
  opmath std[3] = {1, 1, 1};

  Normaliser(bool is_uint8, const std::vector<double>& m, const std::vector<double>& s) : uint8(is_uint8) {
    normalise = !m.empty();
    for (size_t c = 0; c < m.size(); ++c) {
      mean[c] = static_cast<opmath>(m[c]);
      std[c] = static_cast<opmath>(s[c]);
    }
  }
  inline opmath operator()(opmath v, int64_t c) const {
    if (uint8) v = v / static_cast<opmath>(255);
    if (normalise) v = (v - mean[c]) / std[c];
    return v;
  }
};

inline void check_common(const at::Tensor& images, const at::Tensor& out, const std::vector<double>& mean,
                  const std::vector<double>& std) {
  TORCH_CHECK(images.device().is_cpu() && out.device().is_cpu(),
              "gfnet._C crop kernels run on CPU tensors; got images on ", images.device(), " and out on ",
              out.device());
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3,
              "images must be Tensor[N, 3, H, W] (an HWC batch passed as its permuted view); got shape ",
              images.sizes());
  TORCH_CHECK(out.dim() == 4 && out.size(0) == images.size(0) && out.size(1) == 3 && out.size(2) == out.size(3),
              "out must be Tensor[N, 3, P, P] with the images' N; got ", out.sizes(), " for images ",
              images.sizes());
  TORCH_CHECK(mean.size() == std.size() && (mean.empty() || mean.size() == 3),
              "mean and std must both be empty or both hold 3 values; got ", mean.size(), " and ", std.size());
  for (double s : std) TORCH_CHECK(s != 0.0, "std must not contain 0");
}

// Nested dtype dispatch: input uint8/float/double/half/bf16, output float/double/half/bf16.
#define GFNET_DISPATCH_IN_OUT(IN_TYPE, OUT_TYPE, NAME, ...)                                               \
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, IN_TYPE, NAME, [&] {               \
    using in_t = scalar_t;                                                                                \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, OUT_TYPE, NAME, [&] {                      \
      using out_t = scalar_t;                                                                             \
      __VA_ARGS__();                                                                                      \
    });                                                                                                   \
  })


inline std::vector<double> opt_vec(const std::optional<std::vector<double>>& v) {
  return v.has_value() ? *v : std::vector<double>{};
}

}  // namespace gfnet_cpu
