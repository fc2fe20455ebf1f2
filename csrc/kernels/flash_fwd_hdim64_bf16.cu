// fwd kernel, head dim 64, bf16. See flash_launch.cuh.
#include "kernels/flash_launch.cuh"

TORCHLANE_FLASH_FWD_INSTANTIATION(__nv_bfloat16, 64)
