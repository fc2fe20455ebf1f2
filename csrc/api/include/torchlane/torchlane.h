#pragma once

// The torchlane C++ API: data-parallel training of LibTorch (torch::nn) models.
//   auto pg = torchlane::init_process_group();   // torchrun's env, or a FileStore path
//   torchlane::DistributedDataParallel ddp(net, pg, {.bucket_cap_mb = 25});
//   auto loss = loss_fn(ddp.forward(x), y); loss.backward(); opt.step();
//   torchlane::save_checkpoint("ckpt", ddp, &opt, step);  // checkpoint.py's file format
// See docs/cpp_api.md.
#include "api/checkpoint.h"
#include "api/ddp.h"
#include "api/process_group.h"
