// The emulated build used by the CPU tests: the real kernel and launcher sources compiled as
// plain C++ (see cuda_emulation.h), registering the ops as kind_fast_emu::* for CPU tensors.
// Not part of the installed extension (setup.py skips csrc/emulation/).
#define KIND_FAST_EMULATE 1
#include "../kind_linear_cuda.cu"
#include "../module.cpp"
