// CPU kernel of gfnet::glance_resize: align_corners=True bilinear or bicubic resize, fused as focus_crop.
#include "kernel_common.h"

namespace {
using namespace gfnet_cpu;

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

}  // namespace

void register_glance_resize(pybind11::module_& m) {
  namespace py = pybind11;
  using gfnet_cpu::opt_vec;
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
}
