// The one place where gfnet._C's Python bindings are assembled.
#include "gfnet.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gfnet's C++ extension: CPU crop/resize kernels and the early-exit batch scheduler";
  register_crop(m);
  register_scheduler(m);
  m.attr("with_cuda") =
#ifdef GFNET_WITH_CUDA
      true;
#else
      false;
#endif
}
