#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torchlane {

class DistributedDataParallel;

// Note [C++ checkpoints]
// save_checkpoint / load_checkpoint write and read the files of python/torchlane/checkpoint.py
// (Note [Checkpoint file]): `<dir>/ckpt-<step>.pt`, a torch.save zip archive holding
// {"format": "torchlane.checkpoint/1", "step", "world_size", "torch_version", "model",
//  "model_metadata", "optimizer", "data_position", "extra", "rng", "checksum"}, so a run can be
// checkpointed by a C++ program and resumed by a Python script, and the other way round.
//  - "model" is the module's state_dict (parameters and buffers by their dotted names, as the
//    Python module with the same structure names them); "optimizer" is torch.optim's
//    state_dict format, converted from and to the C++ optimizer: torch::optim::SGD <->
//    torch.optim.SGD, Adam <-> Adam, AdamW <-> AdamW (other optimizers: an error naming them).
//  - "checksum" is the SHA-256 digest of the rest that checkpoint.py's _digest computes
//    (checkpoint_digest below feeds the same bytes: type tags, Python reprs of the scalars, raw
//    tensor bytes), verified on load by both sides.
//  - "rng" holds each rank's CPU torch generator state ({"torch": uint8 tensor}); a checkpoint
//    written by Python also holds NumPy's and Python's, which C++ ignores, and Python restores
//    only the torch state of a C++ one.
//  - The archive is pickled without TorchScript's type tags (so torch.load(weights_only=True)
//    reads it) and holds plain dicts only: torch's C++ unpickler cannot read an OrderedDict, so
//    checkpoint.py saves the state_dict as a dict plus "model_metadata" (its _metadata).
// Both functions are collectives over `pg` (every rank calls them; a null pg is one process),
// with the agreement rules of the Python side: save checks that every rank holds the same
// parameters, rank 0 writes atomically (temporary file, fsync, rename, fsync of the directory)
// and keeps the newest `keep_last`; load lets rank 0 choose the file, every rank reads and
// verifies it, and all ranks apply it or all raise. Errors are c10::Error with the messages of
// checkpoint.py's CheckpointError.

struct CheckpointSaveOptions {
  int64_t keep_last = 3;  // <= 0: keep all
  bool discard_newer = false;
  bool verify_replicas = true;
  c10::IValue data_position;  // None, a number, a string, a list or dict of those, ...
};

struct CheckpointLoadOptions {
  bool missing_ok = false;  // a directory that does not exist is a fresh start (returns nullopt)
  bool strict = true;       // every model key present in the file and nothing else
  bool restore_rng = true;
};

struct CheckpointInfo {
  std::string path;
  int64_t step = 0;
  c10::IValue data_position;
};

// Writes `<directory>/ckpt-<step>.pt`; returns its path on every rank.
std::string save_checkpoint(const std::string& directory, torch::nn::Module& module,
                            torch::optim::Optimizer* optimizer, int64_t step,
                            const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                            const CheckpointSaveOptions& options = {});
std::string save_checkpoint(const std::string& directory, DistributedDataParallel& ddp,
                            torch::optim::Optimizer* optimizer, int64_t step,
                            const CheckpointSaveOptions& options = {});

// Loads the newest checkpoint of the directory `path` (or the file `path`) into the module and
// optimizer and restores this rank's RNG state; nullopt when the directory holds none.
std::optional<CheckpointInfo> load_checkpoint(const std::string& path, torch::nn::Module& module,
                                              torch::optim::Optimizer* optimizer,
                                              const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                              const CheckpointLoadOptions& options = {});
std::optional<CheckpointInfo> load_checkpoint(const std::string& path, DistributedDataParallel& ddp,
                                              torch::optim::Optimizer* optimizer,
                                              const CheckpointLoadOptions& options = {});

// One checkpoint file, its checksum verified (checkpoint.read in Python).
c10::impl::GenericDict read_checkpoint(const std::string& file);

// The hex SHA-256 of checkpoint.py's _digest(value): tensors, dicts, lists, tuples, None, bool,
// int, float and str (ASCII or UTF-8 text); anything else raises, naming where it is.
std::string checkpoint_digest(const c10::IValue& value);

}  // namespace torchlane
