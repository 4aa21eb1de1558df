// CPU kernels of gfnet.ops: focus crop (integer corners), glance resize (align_corners=True bilinear or
// bicubic) and the bilinear crop with its backward pass, each fused with uint8 -> float, (x - mean) / std,
// any input strides (NCHW, channels-last, an HWC batch seen through its permuted view) and the output
// dtype. Python (gfnet/ops.py) validates the arguments and allocates the outputs; these functions check what
// they rely on for memory safety and fill the outputs in place. Parallel with at::parallel_for (OpenMP).
#include "gfnet.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

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

Strides4 strides_of(const at::Tensor& t) {
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

void check_common(const at::Tensor& images, const at::Tensor& out, const std::vector<double>& mean,
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

// ---------------------------------------------------------------------------------------------------------
// focus crop

template <typename in_t, typename out_t, bool NORMALISE>
inline void convert_row(const in_t* __restrict__ src, int64_t sw, out_t* __restrict__ dst, int64_t dw, int64_t len,
                        const Normaliser<opmath_for<in_t>>& norm, int64_t c) {
  using opmath = opmath_for<in_t>;
  constexpr bool uint8 = std::is_same_v<in_t, uint8_t>;
  const opmath m = norm.mean[c], s = norm.std[c];
  auto conv = [&](in_t x) {
    opmath v = static_cast<opmath>(x);
    if constexpr (uint8) v = v / static_cast<opmath>(255);
    if constexpr (NORMALISE) v = (v - m) / s;
    return static_cast<out_t>(v);
  };
  if (sw == 1 && dw == 1) {  // the common dense rows: a loop the compiler vectorises
    for (int64_t j = 0; j < len; ++j) dst[j] = conv(src[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) dst[j * dw] = conv(src[j * sw]);
  }
}

void focus_crop_cpu(const at::Tensor& images, const at::Tensor& corners, at::Tensor& out,
                    const std::vector<double>& mean, const std::vector<double>& std) {
  check_common(images, out, mean, std);
  const int64_t N = images.size(0), H = images.size(2), W = images.size(3), P = out.size(2);
  TORCH_CHECK(P <= H && P <= W, "patch_size ", P, " exceeds the image size ", H, "x", W);
  TORCH_CHECK(corners.device().is_cpu() && corners.scalar_type() == at::kInt && corners.dim() == 2 &&
                  corners.size(0) == N && corners.size(1) == 2,
              "corners must be an int32 CPU Tensor[N, 2]; got ", corners.scalar_type(), " ", corners.sizes());
  const at::Tensor corners_c = corners.contiguous();
  const int32_t* corner = corners_c.data_ptr<int32_t>();
  const Strides4 si = strides_of(images), so = strides_of(out);
  GFNET_DISPATCH_IN_OUT(images.scalar_type(), out.scalar_type(), "gfnet focus_crop", [&] {
    const Normaliser<opmath_for<in_t>> norm(images.scalar_type() == at::kByte, mean, std);
    const in_t* in = images.const_data_ptr<in_t>();
    out_t* o = out.data_ptr<out_t>();
    // uint8 input: every output value is one of 3 x 256, so a table computed with the very same operations
    // (hence bit-identical) replaces two divisions per pixel by one L1 load, whatever the input strides.
    std::vector<out_t> lut;
    if constexpr (std::is_same_v<in_t, uint8_t>) {
      lut.resize(3 * 256);
      for (int64_t c = 0; c < 3; ++c)
        for (int v = 0; v < 256; ++v) lut[c * 256 + v] = static_cast<out_t>(norm(static_cast<float>(v), c));
    }
    if constexpr (std::is_same_v<in_t, uint8_t>) {
      if (si.c == 1 && si.w == 3) {
        // HWC (DALI's layout): one pass over each row's interleaved pixels feeds the three output planes,
        // instead of three stride-3 passes.
        at::parallel_for(0, N, row_grain(3 * P * P), [&](int64_t begin, int64_t end) {
          const out_t *l0 = lut.data(), *l1 = lut.data() + 256, *l2 = lut.data() + 512;
          for (int64_t n = begin; n < end; ++n) {
            const int64_t y0 = std::clamp<int64_t>(corner[2 * n], 0, H - P);
            const int64_t x0 = std::clamp<int64_t>(corner[2 * n + 1], 0, W - P);
            const in_t* src = in + n * si.n + y0 * si.h + x0 * 3;
            out_t* d0 = o + n * so.n;
            for (int64_t i = 0; i < P; ++i, src += si.h, d0 += so.h) {
              out_t* d1 = d0 + so.c;
              out_t* d2 = d0 + 2 * so.c;
              for (int64_t j = 0; j < P; ++j) {
                // (the casts only let the discarded non-uint8 instantiations compile)
                d0[j * so.w] = l0[static_cast<uint8_t>(src[3 * j])];
                d1[j * so.w] = l1[static_cast<uint8_t>(src[3 * j + 1])];
                d2[j * so.w] = l2[static_cast<uint8_t>(src[3 * j + 2])];
              }
            }
          }
        });
        return;
      }
    }
    // Parallel over (sample, channel) planes; the rows of a plane are walked with pointer increments.
    at::parallel_for(0, N * 3, row_grain(P * P), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / 3, c = plane % 3;
        // Clamped so that an unvalidated action (NaN, out of [0, 1]) never reads outside the image.
        const int64_t y0 = std::clamp<int64_t>(corner[2 * n], 0, H - P);
        const int64_t x0 = std::clamp<int64_t>(corner[2 * n + 1], 0, W - P);
        const in_t* src = in + n * si.n + c * si.c + y0 * si.h + x0 * si.w;
        out_t* dst = o + n * so.n + c * so.c;
        for (int64_t i = 0; i < P; ++i, src += si.h, dst += so.h) {
          if constexpr (std::is_same_v<in_t, uint8_t>) {
            const out_t* table = lut.data() + c * 256;
            for (int64_t j = 0; j < P; ++j) dst[j * so.w] = table[static_cast<uint8_t>(src[j * si.w])];
          } else if (norm.normalise) {
            convert_row<in_t, out_t, true>(src, si.w, dst, so.w, P, norm, c);
          } else if (std::is_same_v<in_t, out_t> && si.w == 1 && so.w == 1) {
            std::memcpy(dst, src, P * sizeof(in_t));  // the plain crop of the reference: a row copy
          } else {
            convert_row<in_t, out_t, false>(src, si.w, dst, so.w, P, norm, c);
          }
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// glance resize: PyTorch's align_corners=True definition, with the taps and weights of every output row and
// column computed once for the whole batch.

template <typename opmath>
struct Taps {
  std::vector<int64_t> index;  // [out_size * taps], clamped to [0, in_size - 1]
  std::vector<opmath> weight;  // [out_size * taps]
};

template <typename opmath>
Taps<opmath> make_taps(int64_t in_size, int64_t out_size, bool bicubic) {
  const int taps = bicubic ? 4 : 2;
  Taps<opmath> t;
  t.index.resize(out_size * taps);
  t.weight.resize(out_size * taps);
  const opmath scale =
      out_size > 1 ? static_cast<opmath>(in_size - 1) / static_cast<opmath>(out_size - 1) : opmath(0);
  for (int64_t o = 0; o < out_size; ++o) {
    const opmath real = scale * static_cast<opmath>(o);
    const int64_t idx = std::clamp<int64_t>(static_cast<int64_t>(std::floor(real)), 0, in_size - 1);
    const opmath f = std::clamp<opmath>(real - static_cast<opmath>(idx), 0, 1);
    if (bicubic) {
      // Keys' kernel with A = -0.75 at the distances 1 + f, f, 1 - f, 2 - f (PyTorch's coefficients).
      const opmath A = -0.75;
      auto near = [A](opmath x) { return ((A + 2) * x - (A + 3)) * x * x + 1; };
      auto far = [A](opmath x) { return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A; };
      const opmath w[4] = {far(f + 1), near(f), near(1 - f), far(2 - f)};
      for (int k = 0; k < 4; ++k) {
        t.index[o * 4 + k] = std::clamp<int64_t>(idx - 1 + k, 0, in_size - 1);
        t.weight[o * 4 + k] = w[k];
      }
    } else {
      t.index[o * 2] = idx;
      t.index[o * 2 + 1] = std::min(idx + 1, in_size - 1);
      t.weight[o * 2] = 1 - f;
      t.weight[o * 2 + 1] = f;
    }
  }
  return t;
}

template <typename in_t, typename out_t, int TAPS>
void glance_resize_impl(const at::Tensor& images, at::Tensor& out, const Normaliser<opmath_for<in_t>>& norm) {
  using opmath = opmath_for<in_t>;
  const int64_t N = images.size(0), H = images.size(2), W = images.size(3), P = out.size(2);
  const Taps<opmath> ty = make_taps<opmath>(H, P, TAPS == 4), tx = make_taps<opmath>(W, P, TAPS == 4);
  const Strides4 si = strides_of(images), so = strides_of(out);
  const in_t* in = images.const_data_ptr<in_t>();
  out_t* o = out.data_ptr<out_t>();
  // Separable: each input row that a vertical tap touches is resized horizontally once (instead of once per
  // output row using it), then every output row is a TAPS-term sum of those rows, a loop the compiler
  // vectorises. The sum order, sum_k wy_k * (sum_l wx_l * x), is the Triton kernel's.
  std::vector<int64_t> col_off(P * TAPS);
  for (int64_t k = 0; k < P * TAPS; ++k) col_off[k] = tx.index[k] * si.w;
  std::vector<int64_t> slot(H, -1), rows;  // input row -> its slot in the per-plane buffer
  for (int64_t k = 0; k < P * TAPS; ++k)
    if (slot[ty.index[k]] < 0) slot[ty.index[k]] = 0;
  for (int64_t y = 0; y < H; ++y)
    if (slot[y] == 0) {
      slot[y] = static_cast<int64_t>(rows.size());
      rows.push_back(y);
    }
  const int64_t R = static_cast<int64_t>(rows.size());
  at::parallel_for(0, N * 3, std::max<int64_t>(1, 16384 / std::max<int64_t>(R * P * TAPS, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<opmath> tmp(R * P), line(P);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / 3, c = plane % 3;
      const in_t* src = in + n * si.n + c * si.c;
      for (int64_t k = 0; k < R; ++k) {
        const in_t* row = src + rows[k] * si.h;
        opmath* t = tmp.data() + k * P;
        for (int64_t ox = 0; ox < P; ++ox) {
          opmath acc = 0;
          for (int l = 0; l < TAPS; ++l)
            acc += tx.weight[ox * TAPS + l] * static_cast<opmath>(row[col_off[ox * TAPS + l]]);
          t[ox] = acc;
        }
      }
      out_t* dst_plane = o + n * so.n + c * so.c;
      for (int64_t oy = 0; oy < P; ++oy) {
        std::fill(line.begin(), line.end(), opmath(0));
        for (int k = 0; k < TAPS; ++k) {
          const opmath wy = ty.weight[oy * TAPS + k];
          const opmath* t = tmp.data() + slot[ty.index[oy * TAPS + k]] * P;
          for (int64_t ox = 0; ox < P; ++ox) line[ox] += wy * t[ox];
        }
        out_t* dst = dst_plane + oy * so.h;
        for (int64_t ox = 0; ox < P; ++ox) dst[ox * so.w] = static_cast<out_t>(norm(line[ox], c));
      }
    }
  });
}

void glance_resize_cpu(const at::Tensor& images, at::Tensor& out, bool bicubic, const std::vector<double>& mean,
                       const std::vector<double>& std) {
  check_common(images, out, mean, std);
  GFNET_DISPATCH_IN_OUT(images.scalar_type(), out.scalar_type(), "gfnet glance_resize", [&] {
    const Normaliser<opmath_for<in_t>> norm(images.scalar_type() == at::kByte, mean, std);
    if (bicubic)
      glance_resize_impl<in_t, out_t, 4>(images, out, norm);
    else
      glance_resize_impl<in_t, out_t, 2>(images, out, norm);
  });
}

// ---------------------------------------------------------------------------------------------------------
// bilinear crop (convention in kernels/focus_crop_bilinear.py): sample (i, j) of patch n sits at
// y = cy * (H - 1) + (i - (P - 1) / 2) * scale, x likewise; zero padding in the normalised image.

template <typename opmath>
struct Axis {
  int64_t i0;     // the lower tap; the upper one is i0 + 1
  opmath frac;    // the weight of the upper tap
  bool ok0, ok1;  // taps inside the image
};

template <typename opmath>
inline Axis<opmath> axis_at(opmath pos, int64_t size) {
  Axis<opmath> a;
  const opmath f = std::floor(pos);
  a.frac = pos - f;
  // NaN or far-out positions: both taps invalid, so nothing is read; the cast below stays defined.
  if (!(f >= -1 && f < static_cast<opmath>(size))) {
    a.i0 = -2;
    a.ok0 = a.ok1 = false;
    return a;
  }
  a.i0 = static_cast<int64_t>(f);
  a.ok0 = a.i0 >= 0;
  a.ok1 = a.i0 + 1 < size;
  return a;
}

template <typename opmath>
void check_bilinear(const at::Tensor& images, const at::Tensor& centers) {
  TORCH_CHECK(centers.device().is_cpu() && centers.dim() == 2 && centers.size(0) == images.size(0) &&
                  centers.size(1) == 2,
              "centers must be a CPU Tensor[N, 2] with the images' N; got ", centers.sizes());
  TORCH_CHECK(centers.scalar_type() == c10::CppTypeToScalarType<opmath>::value,
              "centers must be in the compute dtype ", c10::CppTypeToScalarType<opmath>::value, "; got ",
              centers.scalar_type());
}

void focus_crop_bilinear_cpu(const at::Tensor& images, const at::Tensor& centers, at::Tensor& out, double scale,
                             const std::vector<double>& mean, const std::vector<double>& std) {
  check_common(images, out, mean, std);
  GFNET_DISPATCH_IN_OUT(images.scalar_type(), out.scalar_type(), "gfnet focus_crop_bilinear", [&] {
    using opmath = opmath_for<in_t>;
    check_bilinear<opmath>(images, centers);
    const Normaliser<opmath> norm(images.scalar_type() == at::kByte, mean, std);
    const int64_t N = images.size(0), H = images.size(2), W = images.size(3), P = out.size(2);
    const at::Tensor cc = centers.contiguous();
    const opmath* ctr = cc.const_data_ptr<opmath>();
    const opmath step = static_cast<opmath>(scale), half = static_cast<opmath>(P - 1) * opmath(0.5);
    const Strides4 si = strides_of(images), so = strides_of(out);
    const in_t* in = images.const_data_ptr<in_t>();
    out_t* o = out.data_ptr<out_t>();
    at::parallel_for(0, N * 3 * P, row_grain(4 * P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / (3 * P), c = (r / P) % 3, i = r % P;
        const in_t* plane = in + n * si.n + c * si.c;
        const Axis<opmath> ay =
            axis_at<opmath>(ctr[2 * n] * (H - 1) + (static_cast<opmath>(i) - half) * step, H);
        const opmath cx = ctr[2 * n + 1] * (W - 1);
        auto value = [&](int64_t y, int64_t x) { return norm(static_cast<opmath>(plane[y * si.h + x * si.w]), c); };
        out_t* dst = o + n * so.n + c * so.c + i * so.h;
        for (int64_t j = 0; j < P; ++j) {
          const Axis<opmath> ax = axis_at<opmath>(cx + (static_cast<opmath>(j) - half) * step, W);
          const opmath v00 = ay.ok0 && ax.ok0 ? value(ay.i0, ax.i0) : opmath(0);
          const opmath v01 = ay.ok0 && ax.ok1 ? value(ay.i0, ax.i0 + 1) : opmath(0);
          const opmath v10 = ay.ok1 && ax.ok0 ? value(ay.i0 + 1, ax.i0) : opmath(0);
          const opmath v11 = ay.ok1 && ax.ok1 ? value(ay.i0 + 1, ax.i0 + 1) : opmath(0);
          const opmath ly = ay.frac, lx = ax.frac;
          dst[j * so.w] = static_cast<out_t>((1 - ly) * ((1 - lx) * v00 + lx * v01) + ly * ((1 - lx) * v10 + lx * v11));
        }
      }
    });
  });
}

// Backward: one thread owns whole samples, so the scatter into grad_images and the sum into grad_centers
// need no atomics and the result is deterministic.
void focus_crop_bilinear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& centers,
                                      double scale, const std::vector<double>& mean, const std::vector<double>& std,
                                      std::optional<at::Tensor> grad_images, std::optional<at::Tensor> grad_centers) {
  check_common(images, grad_out, mean, std);
  TORCH_CHECK(images.scalar_type() != at::kByte || !grad_images.has_value(), "uint8 images have no gradient");
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, images.scalar_type(),
                                  "gfnet focus_crop_bilinear_backward", [&] {
    using in_t = scalar_t;
    using opmath = opmath_for<in_t>;
    check_bilinear<opmath>(images, centers);
    const int64_t N = images.size(0), H = images.size(2), W = images.size(3), P = grad_out.size(2);
    const at::Tensor g = grad_out.to(c10::CppTypeToScalarType<opmath>::value);
    const Strides4 si = strides_of(images), sg = strides_of(g);
    opmath* gx = nullptr;
    Strides4 sx{0, 0, 0, 0};
    if (grad_images.has_value()) {
      TORCH_CHECK(grad_images->scalar_type() == c10::CppTypeToScalarType<opmath>::value &&
                      grad_images->sizes() == images.sizes() && grad_images->device().is_cpu(),
                  "grad_images must be a CPU tensor shaped like images in the compute dtype");
      gx = grad_images->data_ptr<opmath>();
      sx = strides_of(*grad_images);
    }
    opmath* gc = nullptr;
    if (grad_centers.has_value()) {
      TORCH_CHECK(grad_centers->scalar_type() == c10::CppTypeToScalarType<opmath>::value &&
                      grad_centers->is_contiguous() && grad_centers->numel() == 2 * N && grad_centers->device().is_cpu(),
                  "grad_centers must be a contiguous CPU Tensor[N, 2] in the compute dtype");
      gc = grad_centers->data_ptr<opmath>();
    }
    const Normaliser<opmath> norm(images.scalar_type() == at::kByte, mean, std);
    const at::Tensor cc = centers.contiguous();
    const opmath* ctr = cc.const_data_ptr<opmath>();
    const opmath step = static_cast<opmath>(scale), half = static_cast<opmath>(P - 1) * opmath(0.5);
    const in_t* in = images.const_data_ptr<in_t>();
    const opmath* gp = g.const_data_ptr<opmath>();
    at::parallel_for(0, N, row_grain(3 * P * P * 8), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        opmath sum_y = 0, sum_x = 0;
        for (int64_t c = 0; c < 3; ++c) {
          const in_t* plane = in + n * si.n + c * si.c;
          auto value = [&](int64_t y, int64_t x) { return norm(static_cast<opmath>(plane[y * si.h + x * si.w]), c); };
          const opmath inv_std = norm.normalise ? opmath(1) / norm.std[c] : opmath(1);
          for (int64_t i = 0; i < P; ++i) {
            const Axis<opmath> ay =
                axis_at<opmath>(ctr[2 * n] * (H - 1) + (static_cast<opmath>(i) - half) * step, H);
            const opmath cx = ctr[2 * n + 1] * (W - 1);
            const opmath ly = ay.frac;
            for (int64_t j = 0; j < P; ++j) {
              const opmath go = gp[n * sg.n + c * sg.c + i * sg.h + j * sg.w];
              const Axis<opmath> ax = axis_at<opmath>(cx + (static_cast<opmath>(j) - half) * step, W);
              const opmath lx = ax.frac;
              const bool k00 = ay.ok0 && ax.ok0, k01 = ay.ok0 && ax.ok1, k10 = ay.ok1 && ax.ok0,
                         k11 = ay.ok1 && ax.ok1;
              if (gx != nullptr) {
                opmath* base = gx + n * sx.n + c * sx.c;
                const opmath gs = go * inv_std;
                if (k00) base[ay.i0 * sx.h + ax.i0 * sx.w] += gs * (1 - ly) * (1 - lx);
                if (k01) base[ay.i0 * sx.h + (ax.i0 + 1) * sx.w] += gs * (1 - ly) * lx;
                if (k10) base[(ay.i0 + 1) * sx.h + ax.i0 * sx.w] += gs * ly * (1 - lx);
                if (k11) base[(ay.i0 + 1) * sx.h + (ax.i0 + 1) * sx.w] += gs * ly * lx;
              }
              if (gc != nullptr) {
                const opmath v00 = k00 ? value(ay.i0, ax.i0) : opmath(0);
                const opmath v01 = k01 ? value(ay.i0, ax.i0 + 1) : opmath(0);
                const opmath v10 = k10 ? value(ay.i0 + 1, ax.i0) : opmath(0);
                const opmath v11 = k11 ? value(ay.i0 + 1, ax.i0 + 1) : opmath(0);
                sum_y += go * ((1 - lx) * (v10 - v00) + lx * (v11 - v01));
                sum_x += go * ((1 - ly) * (v01 - v00) + ly * (v11 - v10));
              }
            }
          }
        }
        if (gc != nullptr) {
          gc[2 * n] = sum_y * static_cast<opmath>(H - 1);
          gc[2 * n + 1] = sum_x * static_cast<opmath>(W - 1);
        }
      }
    });
  });
}

std::vector<double> opt_vec(const std::optional<std::vector<double>>& v) {
  return v.has_value() ? *v : std::vector<double>{};
}

}  // namespace

void register_crop(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "focus_crop",
      [](const at::Tensor& images, const at::Tensor& corners, at::Tensor out, std::optional<std::vector<double>> mean,
         std::optional<std::vector<double>> std) {
        focus_crop_cpu(images, corners, out, opt_vec(mean), opt_vec(std));
        return out;
      },
      "Integer crops of Tensor[N, 3, H, W] at int32 corners Tensor[N, 2] into out Tensor[N, 3, P, P] (CPU)",
      py::arg("images"), py::arg("corners"), py::arg("out"), py::arg("mean") = py::none(),
      py::arg("std") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def(
      "glance_resize",
      [](const at::Tensor& images, at::Tensor out, bool bicubic, std::optional<std::vector<double>> mean,
         std::optional<std::vector<double>> std) {
        glance_resize_cpu(images, out, bicubic, opt_vec(mean), opt_vec(std));
        return out;
      },
      "align_corners=True resize of Tensor[N, 3, H, W] into out Tensor[N, 3, P, P] (CPU)", py::arg("images"),
      py::arg("out"), py::arg("bicubic"), py::arg("mean") = py::none(), py::arg("std") = py::none(),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "focus_crop_bilinear",
      [](const at::Tensor& images, const at::Tensor& centers, at::Tensor out, double scale,
         std::optional<std::vector<double>> mean, std::optional<std::vector<double>> std) {
        focus_crop_bilinear_cpu(images, centers, out, scale, opt_vec(mean), opt_vec(std));
        return out;
      },
      "Bilinear crops of Tensor[N, 3, H, W] at centers Tensor[N, 2] into out Tensor[N, 3, P, P] (CPU)",
      py::arg("images"), py::arg("centers"), py::arg("out"), py::arg("scale"), py::arg("mean") = py::none(),
      py::arg("std") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def(
      "focus_crop_bilinear_backward",
      [](const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& centers, double scale,
         std::optional<std::vector<double>> mean, std::optional<std::vector<double>> std,
         std::optional<at::Tensor> grad_images, std::optional<at::Tensor> grad_centers) {
        focus_crop_bilinear_backward_cpu(grad_out, images, centers, scale, opt_vec(mean), opt_vec(std),
                                         grad_images, grad_centers);
      },
      "Accumulates the bilinear crop's gradients into zero-filled grad_images / grad_centers (CPU)",
      py::arg("grad_out"), py::arg("images"), py::arg("centers"), py::arg("scale"), py::arg("mean") = py::none(),
      py::arg("std") = py::none(), py::arg("grad_images") = py::none(), py::arg("grad_centers") = py::none(),
      py::call_guard<py::gil_scoped_release>());
}
