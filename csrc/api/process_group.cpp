// torchlane::init_process_group: a Gloo c10d::ProcessGroup for C++ programs.
#include "api/process_group.h"

#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef TORCHLANE_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

namespace torchlane {
namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

int64_t env_int(const char* name, int64_t given) {
  if (given >= 0) {
    return given;
  }
  const char* v = std::getenv(name);
  TORCH_CHECK_VALUE(v && *v, "init_process_group: environment variable ", name,
                    " is not set (launch with torchrun, or set it)");
  char* end = nullptr;
  const long long parsed = std::strtoll(v, &end, 10);
  TORCH_CHECK_VALUE(end && *end == '\0' && parsed >= 0, "init_process_group: ", name,
                    " must be a non-negative integer, got '", v, "'");
  return parsed;
}

}  // namespace

bool has_gloo() {
#ifdef TORCHLANE_WITH_GLOO
  return true;
#else
  return false;
#endif
}

c10::intrusive_ptr<c10d::ProcessGroup> init_process_group(const ProcessGroupOptions& options) {
  const int64_t rank = env_int("RANK", options.rank);
  const int64_t world_size = env_int("WORLD_SIZE", options.world_size);
  TORCH_CHECK_VALUE(world_size >= 1, "init_process_group: world_size must be >= 1, got ",
                    world_size);
  TORCH_CHECK_VALUE(rank < world_size,
                    "init_process_group: rank must be in [0, world_size), got rank ", rank,
                    " and world_size ", world_size);
  c10::intrusive_ptr<c10d::Store> store;
  if (!options.file_store_path.empty()) {
    store = c10::make_intrusive<c10d::FileStore>(options.file_store_path, world_size);
  } else {
    const std::string host = env_or("MASTER_ADDR", "");
    TORCH_CHECK_VALUE(!host.empty(),
                      "init_process_group: environment variable MASTER_ADDR is not set (launch "
                      "with torchrun, or pass ProcessGroupOptions::file_store_path)");
    const int64_t port = env_int("MASTER_PORT", -1);
    TORCH_CHECK_VALUE(port > 0 && port < 65536,
                      "init_process_group: MASTER_PORT must be a port "
                      "number, got ",
                      port);
    c10d::TCPStoreOptions tcp;
    tcp.port = static_cast<uint16_t>(port);
    // torchrun's agent already serves the store: every rank is a client (as Python's env://).
    tcp.isServer = rank == 0 && env_or("TORCHELASTIC_USE_AGENT_STORE", "") != "True";
    tcp.numWorkers = world_size;
    tcp.waitWorkers = false;
    tcp.timeout = options.timeout;
    auto tcp_store = c10::make_intrusive<c10d::TCPStore>(host, tcp);
    // Keys of a restarted attempt must not meet the previous attempt's.
    store = c10::make_intrusive<c10d::PrefixStore>(
        "torchlane/attempt_" + env_or("TORCHELASTIC_RESTART_COUNT", "0"), tcp_store);
  }
#ifdef TORCHLANE_WITH_GLOO
  auto gloo_options = c10d::ProcessGroupGloo::Options::create(options.timeout);
  const std::string ifname = env_or("GLOO_SOCKET_IFNAME", "");
  gloo_options->devices.push_back(ifname.empty()
                                      ? c10d::ProcessGroupGloo::createDefaultDevice()
                                      : c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
      store, static_cast<int>(rank), static_cast<int>(world_size), gloo_options);
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, static_cast<int>(rank),
                                                    static_cast<int>(world_size));
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, backend);
  return pg;
#else
  TORCH_CHECK(false,
              "init_process_group: this libtorchlane was built without Gloo headers "
              "(apt-get install libgloo-dev and rebuild), pass your own c10d::ProcessGroup to "
              "torchlane::DistributedDataParallel instead");
#endif
}

}  // namespace torchlane
