// Stand-in for CUDA's header when the kernels are compiled for the host: `host.h` defines the
// f16 type and conversions.
#pragma once
