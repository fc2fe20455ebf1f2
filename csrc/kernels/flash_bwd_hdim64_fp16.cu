// bwd kernel, head dim 64, fp16. See flash_launch.cuh.
#include "kernels/flash_launch.cuh"

TORCHLANE_FLASH_BWD_INSTANTIATION(__half, 64)
