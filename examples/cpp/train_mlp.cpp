// Data-parallel training of a LibTorch MLP with torchlane's C++ DDP.
//   make cpp-demo   (torchrun --nproc-per-node 2 --no-python ./build/cpp-demo/train_mlp)
// Every rank generates the same synthetic regression set (y = a smooth function of x plus noise)
// and trains on its own shard of each global batch; rank 0 prints the all-reduced loss.
#include <torch/torch.h>
#include <torchlane/torchlane.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

struct MLPImpl : torch::nn::Module {
  MLPImpl(int64_t in, int64_t hidden, int64_t out)
      : fc1(register_module("fc1", torch::nn::Linear(in, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, hidden))),
        fc3(register_module("fc3", torch::nn::Linear(hidden, out))) {}
  torch::Tensor forward(torch::Tensor x) {
    return fc3->forward(torch::gelu(fc2->forward(torch::gelu(fc1->forward(x)))));
  }
  torch::nn::Linear fc1, fc2, fc3;
};
TORCH_MODULE(MLP);

int main(int argc, char** argv) {
  // train_mlp [steps] [hidden] [checkpoint_dir]: the benchmark (benchmarks/cpp_api.py) varies
  // the first two. With a directory, the run resumes from its newest checkpoint and saves one
  // every 100 steps and at the end, in torchlane.checkpoint's format (Python can resume it).
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 300;
  const int64_t hidden = argc > 2 ? std::atoll(argv[2]) : 256;
  const std::string ckpt_dir = argc > 3 ? argv[3] : "";
  auto pg = torchlane::init_process_group();
  const int rank = pg->getRank(), world = pg->getSize();
  torch::manual_seed(0);
  const int64_t in = 32, out = 8, global_batch = 256, samples = 8192;
  auto x_all = torch::randn({samples, in});
  auto w_true = torch::randn({in, out}) / 4;
  auto y_all = torch::sin(x_all.matmul(w_true)) * 2 + 0.05 * torch::randn({samples, out});

  torch::manual_seed(1000 + rank);  // different initialisations: DDP broadcasts rank 0's
  MLP net(in, hidden, out);
  torchlane::DistributedDataParallel ddp(net.ptr(), pg, {.bucket_cap_mb = 1});
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));

  int64_t first = 1;
  if (!ckpt_dir.empty()) {
    torchlane::CheckpointLoadOptions load_options;
    load_options.missing_ok = true;  // a fresh start
    if (auto info = torchlane::load_checkpoint(ckpt_dir, ddp, &opt, load_options)) {
      first = info->step + 1;
      if (rank == 0) {
        std::printf("resumed from %s\n", info->path.c_str());
      }
    }
  }

  const int64_t local = global_batch / world;
  auto start = std::chrono::steady_clock::now();
  std::vector<double> step_ms;
  double last_loss = 0, save_ms = -1;
  for (int64_t step = first; step <= steps; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    const int64_t base = ((step - 1) * global_batch) % samples + rank * local;
    auto x = x_all.narrow(0, base, local), y = y_all.narrow(0, base, local);
    opt.zero_grad();
    auto loss = torch::mse_loss(ddp.forward(x), y);
    loss.backward();  // buckets are all-reduced during backward
    opt.step();
    step_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (!ckpt_dir.empty() && (step % 100 == 0 || step == steps)) {
      const auto t0 = std::chrono::steady_clock::now();
      torchlane::save_checkpoint(ckpt_dir, ddp, &opt, step);
      save_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
    if (step == first || step % 25 == 0 || step == steps) {
      std::vector<at::Tensor> mean{loss.detach().clone() / world};
      pg->allreduce(mean)->wait();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count() /
          static_cast<double>(step - first + 1);
      last_loss = mean[0].item<double>();
      if (rank == 0) {
        std::printf("step %4lld/%lld  loss %.5f  %.2f ms/step  (%d ranks, %lld buckets)\n",
                    static_cast<long long>(step), static_cast<long long>(steps),
                    mean[0].item<double>(), ms, world,
                    static_cast<long long>(ddp.comm_stats().num_buckets));
        std::fflush(stdout);
      }
    }
  }
  std::sort(step_ms.begin(), step_ms.end());
  if (rank == 0 && !step_ms.empty()) {
    std::printf("median_step_ms %.4f\nfinal_loss %.9g\n", step_ms[step_ms.size() / 2], last_loss);
    if (save_ms >= 0) {
      std::printf("checkpoint_save_ms %.3f\n", save_ms);  // the last save_checkpoint
    }
  }
  return 0;
}
