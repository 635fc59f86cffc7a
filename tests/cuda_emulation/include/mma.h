// Stands in for CUDA's <mma.h> in the CPU emulation: nvcuda::wmma is in cuda_emulation.h.
#pragma once

#include "cuda_emulation.h"
