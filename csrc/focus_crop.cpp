// CPU kernel of gfnet::focus_crop: integer crops, fused with uint8 -> float, normalisation, layout and dtype.
#include "kernel_common.h"

namespace {
using namespace gfnet_cpu;

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

}  // namespace

void register_focus_crop(pybind11::module_& m) {
  namespace py = pybind11;
  using gfnet_cpu::opt_vec;
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
}
