// The one place where gfnet._C's Python bindings are assembled.
#include "gfnet.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gfnet's C++ extension: CPU crop/resize kernels and the early-exit batch scheduler";
  register_focus_crop(m);
  register_glance_resize(m);
  register_focus_crop_bilinear(m);
  register_scheduler(m);
}
