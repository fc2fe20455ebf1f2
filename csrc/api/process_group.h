#pragma once

#include <chrono>
#include <string>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torchlane {

struct ProcessGroupOptions {
  // Rendezvous through a FileStore at this path instead of torchrun's TCPStore. rank and
  // world_size then come from the fields below, or from RANK / WORLD_SIZE when left at -1.
  std::string file_store_path;
  int rank = -1;
  int world_size = -1;
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
};

// A Gloo (CPU) process group. Without file_store_path it reads torchrun's environment
// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) and connects to the TCPStore torchrun's agent hosts
// (TORCHELASTIC_USE_AGENT_STORE=True), or to the one rank 0 hosts when launched otherwise.
// GLOO_SOCKET_IFNAME picks the network interface, as in Python. Raises c10::Error naming the
// missing or bad variable. See Note [Gloo headers] in CMakeLists.txt.
c10::intrusive_ptr<c10d::ProcessGroup> init_process_group(const ProcessGroupOptions& options = {});

// Whether this libtorchlane was built with Gloo headers (init_process_group() available).
bool has_gloo();

}  // namespace torchlane
