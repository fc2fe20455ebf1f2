// The C++ API test program, run on N ranks by tests/test_cpp_api.py:
//   RANK=r WORLD_SIZE=n torchlane_api_test <case> <file-store-path> [args...]
// Cases: replica, bucket_view, losses, no_sync, unused, hook:{bf16,fp16,powersgd,topk},
// mismatch, dead_peer, ckpt:{sgd,adam,adamw}:{save,load} <dir>, ckpt_errors <dir> <corrupt>
// <no-rng>, read <file>. Each prints "RESULT <key> <value>" lines; a failed check throws (exit code
// 1). Models and data are formulas (sin/cos of aranges) that tests/test_cpp_api.py rebuilds in
// Python for the comparison with python/torchlane/ddp.py.
#include <torch/torch.h>
#include <torchlane/torchlane.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

namespace {

constexpr int64_t kIn = 6, kHidden = 10, kOut = 3, kGlobalBatch = 12, kSteps = 4;
constexpr double kLr = 0.1;

struct NetImpl : torch::nn::Module {
  NetImpl(int64_t hidden, bool with_unused) {
    fc1 = register_module("fc1", torch::nn::Linear(kIn, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, hidden));
    if (with_unused) {
      unused = register_module("unused", torch::nn::Linear(hidden, kOut));
    }
    fc3 = register_module("fc3", torch::nn::Linear(hidden, kOut));
  }
  torch::Tensor forward(torch::Tensor x) {
    return fc3->forward(torch::tanh(fc2->forward(torch::tanh(fc1->forward(x)))));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr}, unused{nullptr};
};
TORCH_MODULE(Net);

// Parameter i (named_parameters order) = 0.5 * sin(0.7 * arange(numel) + i + offset).
void init_params(torch::nn::Module& m, double offset) {
  torch::NoGradGuard g;
  int64_t i = 0;
  for (auto& p : m.parameters()) {
    auto v = torch::sin(torch::arange(p.numel(), torch::kFloat) * 0.7 + (i++) + offset) * 0.5;
    p.copy_(v.reshape(p.sizes()));
  }
}

// The global batch of step s (12 rows: 2, 3 or 4 ranks); rank r trains rows [r*B/n, (r+1)*B/n).
std::pair<at::Tensor, at::Tensor> batch(int64_t step) {
  auto x = torch::sin(torch::arange(kGlobalBatch * kIn, torch::kFloat) * 0.31 + step)
               .reshape({kGlobalBatch, kIn});
  auto y = torch::cos(torch::arange(kGlobalBatch * kOut, torch::kFloat) * 0.17 + 2 * step)
               .reshape({kGlobalBatch, kOut});
  return {x, y};
}

void sgd(torch::nn::Module& m) {
  torch::NoGradGuard g;
  for (auto& p : m.parameters()) {
    if (p.grad().defined()) {
      p.sub_(p.grad() * kLr);
      p.grad().zero_();
    }
  }
}

double max_diff(torch::nn::Module& a, torch::nn::Module& b) {
  auto pa = a.parameters(), pb = b.parameters();
  TORCH_CHECK(pa.size() == pb.size());
  double d = 0;
  for (size_t i = 0; i < pa.size(); ++i) {
    d = std::max(d, (pa[i] - pb[i]).abs().max().item<double>());
  }
  return d;
}

// Largest difference of this rank's parameters from rank 0's.
double diff_from_rank0(torch::nn::Module& m, const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  double d = 0;
  for (auto& p : m.parameters()) {
    std::vector<at::Tensor> t{p.detach().clone()};
    pg->broadcast(t)->wait();
    d = std::max(d, (t[0] - p.detach()).abs().max().item<double>());
  }
  return d;
}

at::Tensor shard(const at::Tensor& t, int rank, int world) {
  const int64_t local = t.size(0) / world;
  return t.narrow(0, rank * local, local);
}

std::vector<std::string> g_args;  // the arguments after <case> <file-store-path>

void result(const std::string& key, double value) {
  std::printf("RESULT %s %.9g\n", key.c_str(), value);
  std::fflush(stdout);
}

void check(bool ok, const std::string& what) {
  TORCH_CHECK(ok, "check failed: ", what);
}

// The optimizers of the checkpoint cases (tests/cpp_api_cases.py OPTIMIZERS builds the same).
std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind,
                                                        std::vector<at::Tensor> params) {
  if (kind == "sgd") {
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1).momentum(0.9));
  }
  if (kind == "adam") {
    return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(0.01));
  }
  if (kind == "adamw") {
    return std::make_unique<torch::optim::AdamW>(
        params, torch::optim::AdamWOptions(0.01).weight_decay(0.05));
  }
  TORCH_CHECK(false, "unknown optimizer ", kind);
}

void train_step(torch::nn::Module& net, torchlane::DistributedDataParallel& ddp,
                torch::optim::Optimizer& opt, int64_t step, int rank, int world) {
  auto [x, y] = batch(step);
  opt.zero_grad();
  torch::mse_loss(ddp.forward(shard(x, rank, world)), shard(y, rank, world)).backward();
  opt.step();
}

// ckpt:<optimizer>:save  trains steps 0-1, saves step 2, trains 2-3, saves step 4;
// ckpt:<optimizer>:load  loads the newest checkpoint of the directory (a Python run's step 2),
//                        trains on to step 4 and saves it.
int run_checkpoint(const std::string& kind, const std::string& mode, const std::string& dir,
                   const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  const int rank = pg->getRank(), world = pg->getSize();
  Net net(kHidden, false);
  init_params(*net, 0.1 * rank + (mode == "load" ? 5.0 : 0.0));
  torchlane::DDPOptions opts;
  opts.bucket_cap_mb = 0.0002;
  torchlane::DistributedDataParallel ddp(net.ptr(), pg, opts);
  auto opt = make_optimizer(kind, net->parameters());
  int64_t start = 0;
  if (mode == "load") {
    auto info = torchlane::load_checkpoint(dir, ddp, opt.get());
    TORCH_CHECK(info.has_value(), "no checkpoint in ", dir);
    start = info->step;
    result("loaded_step", static_cast<double>(start));
    result("data_position", info->data_position.isInt() ? info->data_position.toInt() : -1);
  }
  for (int64_t step = start; step < 4; ++step) {
    if (step == 2 && mode == "save") {
      torchlane::CheckpointSaveOptions so;
      so.data_position = int64_t{2};
      torchlane::save_checkpoint(dir, ddp, opt.get(), 2, so);
    }
    train_step(*net, ddp, *opt, step, rank, world);
  }
  torchlane::save_checkpoint(dir, ddp, opt.get(), 4);
  return 0;
}

// Each error of load_checkpoint, printed as "CKPT_ERROR <label> <message>". argv: a directory
// holding ckpt-2 of the `sgd` case and nothing else, a corrupt copy of it, and a copy without
// RNG states (its checksum updated).
int run_checkpoint_errors(const std::string& dir, const std::string& corrupt,
                          const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  auto report = [](const std::string& label, auto&& fn) {
    try {
      fn();
      std::printf("CKPT_ERROR %s none\n", label.c_str());
    } catch (const c10::Error& e) {
      std::printf("CKPT_ERROR %s %s\n", label.c_str(), e.what_without_backtrace());
    }
  };
  Net net(kHidden, false);
  init_params(*net, 0.0);  // the same on every rank, as a save requires
  Net wide(kHidden + 1, false);
  auto sgd = make_optimizer("sgd", net->parameters());
  auto adam = make_optimizer("adam", net->parameters());
  report("missing_dir", [&] { torchlane::load_checkpoint(dir + "/nope", *net, nullptr, pg); });
  torchlane::CheckpointLoadOptions missing_ok;
  missing_ok.missing_ok = true;
  result("missing_ok_is_fresh_start",
         torchlane::load_checkpoint(dir + "/nope", *net, nullptr, pg, missing_ok) ? 0 : 1);
  report("corrupt", [&] { torchlane::load_checkpoint(corrupt, *net, sgd.get(), pg); });
  report("no_rng", [&] { torchlane::load_checkpoint(g_args.at(2), *net, sgd.get(), pg); });
  report("shape", [&] { torchlane::load_checkpoint(dir, *wide, nullptr, pg); });
  report("optimizer_type", [&] { torchlane::load_checkpoint(dir, *net, adam.get(), pg); });
  report("older_step", [&] { torchlane::save_checkpoint(dir, *net, sgd.get(), 1, pg); });
  // Nothing was applied by the failed loads: the model still has its own parameters.
  Net fresh(kHidden, false);
  init_params(*fresh, 0.0);
  result("untouched", max_diff(*net, *fresh) == 0.0 ? 1 : 0);
  return 0;
}

int run(const std::string& name, const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  const int rank = pg->getRank(), world = pg->getSize();
  torchlane::DDPOptions opts;
  opts.bucket_cap_mb = 0.0002;  // ~200 bytes: several buckets
  const bool unused = name == "unused";
  opts.find_unused_parameters = unused;
  opts.gradient_as_bucket_view = name == "bucket_view";

  if (name.rfind("ckpt:", 0) == 0) {
    const auto colon = name.find(':', 5);
    return run_checkpoint(name.substr(5, colon - 5), name.substr(colon + 1), g_args.at(0), pg);
  }
  if (name == "ckpt_errors") {
    return run_checkpoint_errors(g_args.at(0), g_args.at(1), pg);
  }
  if (name == "read") {  // read_checkpoint of a file: its checksum verified, or the error
    try {
      auto state = torchlane::read_checkpoint(g_args.at(0));
      std::printf("READ ok %zu\n", state.size());
    } catch (const c10::Error& e) {
      std::printf("READ error %s\n", e.what_without_backtrace());
    }
    return 0;
  }

  if (name == "mismatch") {
    Net net(rank == 1 ? kHidden + 1 : kHidden, false);
    try {
      torchlane::DistributedDataParallel ddp(net.ptr(), pg, opts);
    } catch (const c10::Error& e) {
      std::printf("MISMATCH %s\n", e.what_without_backtrace());
      return 0;
    }
    TORCH_CHECK(false, "a mismatched layout was not detected");
  }

  if (name == "dead_peer") {
    // Rank 1 SIGKILLs itself inside its second backward (as tests/test_peer_failure.py does to
    // the Python class): rank 0 must get an exception naming the bucket, not abort or hang.
    Net net(kHidden, false);
    torchlane::DistributedDataParallel ddp(net.ptr(), pg, opts);
    auto [x, y] = batch(0);
    torch::mse_loss(ddp.forward(shard(x, rank, world)), shard(y, rank, world)).backward();
    if (rank == 1) {
      net->fc1->weight.register_hook([](at::Tensor grad) {
        std::raise(SIGKILL);
        return grad;
      });
    }
    const auto start = std::chrono::steady_clock::now();
    try {
      for (int i = 0; i < 2; ++i) {  // the error may surface at the next step
        torch::mse_loss(ddp.forward(shard(x, rank, world)), shard(y, rank, world)).backward();
      }
    } catch (const std::exception& e) {
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      result("error_after_s", took.count());
      const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
      std::printf("PEER_ERROR %s\n", c10_error ? c10_error->what_without_backtrace() : e.what());
      return 0;
    }
    TORCH_CHECK(false, "the death of rank 1 was not detected");
  }

  Net net(kHidden, unused);
  init_params(*net, 0.1 * rank);  // rank-dependent: construction must broadcast rank 0's
  torchlane::DistributedDataParallel ddp(net.ptr(), pg, opts);
  Net replica(kHidden, unused);
  init_params(*replica, 0.0);
  result("init_diff", max_diff(*net, *replica));

  std::string hook;
  if (name.rfind("hook:", 0) == 0) {
    hook = name.substr(5);
    if (hook == "bf16") {
      ddp.register_comm_hook(torchlane::bf16_compress_hook(pg));
    } else if (hook == "fp16") {
      ddp.register_comm_hook(torchlane::fp16_compress_hook(pg));
    } else if (hook == "powersgd") {
      torchlane::hooks::PowerSGDOptions o;
      o.start_iter = 2;
      o.min_compression_rate = 1.5;
      ddp.register_comm_hook(torchlane::powersgd_hook(pg, o));
    } else if (hook == "topk") {
      torchlane::hooks::TopKOptions o;
      o.ratio = 0.2;
      o.start_iter = 2;
      o.min_compression_rate = 1.0;
      ddp.register_comm_hook(torchlane::topk_hook(pg, o));
    } else {
      TORCH_CHECK(false, "unknown hook ", hook);
    }
  }

  for (int64_t step = 0; step < kSteps; ++step) {
    auto [x, y] = batch(step);
    if (name == "no_sync") {
      // Two micro-batches: the first accumulates locally, the second synchronises both.
      auto [x2, y2] = batch(step + 100);
      {
        auto guard = ddp.no_sync();
        torch::mse_loss(ddp.forward(shard(x2, rank, world)), shard(y2, rank, world)).backward();
      }
      // Inside no_sync the gradient is this rank's own.
      {
        auto local = net->fc1->weight.grad().clone();
        std::vector<at::Tensor> t{local.clone()};
        pg->broadcast(t)->wait();
        if (rank != 0) {
          check((t[0] - local).abs().max().item<double>() > 1e-4, "no_sync grads were reduced");
        }
      }
      torch::mse_loss(ddp.forward(shard(x, rank, world)), shard(y, rank, world)).backward();
      torch::mse_loss(replica->forward(x2), y2).backward();
      torch::mse_loss(replica->forward(x), y).backward();
    } else {
      auto loss = torch::mse_loss(ddp.forward(shard(x, rank, world)), shard(y, rank, world));
      loss.backward();
      if (rank == 0) {
        result("loss" + std::to_string(step), loss.item<double>());
      }
      torch::mse_loss(replica->forward(x), y).backward();
    }
    if (unused) {
      check(!net->unused->weight.grad().defined(), "the unused parameter got a gradient");
    }
    if (!hook.empty() && step == kSteps - 1) {
      auto stats = ddp.comm_stats();
      result("bytes_reduced", static_cast<double>(stats.bytes_reduced));
      result("bytes_sent", static_cast<double>(stats.bytes_sent));
      result("num_buckets", static_cast<double>(stats.num_buckets));
    }
    sgd(*net);
    sgd(*replica);
  }
  result("replica_diff", max_diff(*net, *replica));
  result("rank0_diff", diff_from_rank0(*net, pg));
  result("num_buckets", static_cast<double>(ddp.comm_stats().num_buckets));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s <case> <file-store-path>\n", argv[0]);
    return 2;
  }
  torch::set_num_threads(1);
  g_args.assign(argv + 3, argv + argc);
  try {
    torchlane::ProcessGroupOptions po;
    po.file_store_path = argv[2];
    po.timeout = std::chrono::seconds(60);
    auto pg = torchlane::init_process_group(po);
    return run(argv[1], pg);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "ERROR %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ERROR %s\n", e.what());
  }
  return 1;
}
