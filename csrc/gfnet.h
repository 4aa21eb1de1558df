// Declarations shared by the components of gfnet._C: each component file (one per op or component) defines
// one register_* function that adds its bindings; bindings.cpp calls them all.
#pragma once
#include <torch/extension.h>

void register_focus_crop(pybind11::module_& m);           // focus_crop.cpp: integer crops (CPU)
void register_glance_resize(pybind11::module_& m);        // glance_resize.cpp: align_corners=True resize (CPU)
void register_focus_crop_bilinear(pybind11::module_& m);  // focus_crop_bilinear.cpp: bilinear crop, fwd + bwd (CPU)
void register_scheduler(pybind11::module_& m);            // scheduler.cpp: early-exit batch scheduler
