// The binding of the CUDA-enabled extension (entropy_kernels._C_cuda): bindings.cpp with the
// CUDA dispatch compiled in. A separate file, so its object never collides with the CPU
// extension's bindings.o when setup.py builds both.
#define EK_WITH_CUDA 1
#include "bindings.cpp"
