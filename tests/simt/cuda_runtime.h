// Stands in for the CUDA toolkit's <cuda_runtime.h> when csrc/*.cu are compiled as C++ for the CPU
// emulator (simt.h).
#pragma once
#include "simt.h"
