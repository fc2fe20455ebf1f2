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
  // train_mlp [steps] [hidden]: the benchmark (benchmarks/cpp_api.py) varies both.
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 300;
  const int64_t hidden = argc > 2 ? std::atoll(argv[2]) : 256;
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

  const int64_t local = global_batch / world;
  auto start = std::chrono::steady_clock::now();
  std::vector<double> step_ms;
  for (int64_t step = 1; step <= steps; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    const int64_t base = ((step - 1) * global_batch) % samples + rank * local;
    auto x = x_all.narrow(0, base, local), y = y_all.narrow(0, base, local);
    opt.zero_grad();
    auto loss = torch::mse_loss(ddp.forward(x), y);
    loss.backward();  // buckets are all-reduced during backward
    opt.step();
    step_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (step == 1 || step % 25 == 0 || step == steps) {
      std::vector<at::Tensor> mean{loss.detach().clone() / world};
      pg->allreduce(mean)->wait();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count() /
          step;
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
  if (rank == 0) {
    std::printf("median_step_ms %.4f\n", step_ms[step_ms.size() / 2]);
  }
  return 0;
}
