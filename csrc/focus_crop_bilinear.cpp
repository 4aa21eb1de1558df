// CPU kernels of gfnet::focus_crop_bilinear, forward and backward.
#include "kernel_common.h"

namespace {
using namespace gfnet_cpu;

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

}  // namespace

void register_focus_crop_bilinear(pybind11::module_& m) {
  namespace py = pybind11;
  using gfnet_cpu::opt_vec;
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
