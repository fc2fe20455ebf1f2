// bwd kernel, head dim 128, bf16. See flash_launch.cuh.
#include "kernels/flash_launch.cuh"

TORCHLANE_FLASH_BWD_INSTANTIATION(__nv_bfloat16, 128)
