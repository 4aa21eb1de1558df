// Declarations shared by the components of gfnet._C: each component file (one per component)
// defines one register_* function that adds its bindings; bindings.cpp calls them all.
#pragma once
#include <torch/extension.h>

void register_crop(pybind11::module_& m);       // crop.cpp: focus crop, glance resize, bilinear crop (CPU)
void register_scheduler(pybind11::module_& m);  // scheduler.cpp: early-exit batch scheduler
