#pragma once

// The torchlane C++ API: data-parallel training of LibTorch (torch::nn) models.
//   auto pg = torchlane::init_process_group();   // torchrun's env, or a FileStore path
//   torchlane::DistributedDataParallel ddp(net, pg, {.bucket_cap_mb = 25});
//   auto loss = loss_fn(ddp.forward(x), y); loss.backward(); opt.step();
// See docs/cpp_api.md.
#include "api/ddp.h"
#include "api/process_group.h"
