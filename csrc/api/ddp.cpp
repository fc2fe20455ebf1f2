// torchlane::DistributedDataParallel for LibTorch modules; see Note [C++ DistributedDataParallel].
#include "api/ddp.h"

#include <cmath>
#include <sstream>

#include <torch/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "api/python_names.h"
#include "hooks/cast_hook.hpp"
#include "reducer/reducer.hpp"

namespace torchlane {
namespace {

constexpr int64_t kMiB = 1024 * 1024;
constexpr int64_t kFirstBucketCapBytes = 1 * kMiB;
constexpr size_t kBufferBroadcastBytes = 250 * kMiB;  // torch DDP's broadcast bucket size

// The dtype codes of python/torchlane/ddp.py's _DTYPES, so both sides exchange the same records.
constexpr at::ScalarType kDtypes[] = {at::kFloat,        at::kDouble,       at::kHalf,
                                      at::kBFloat16,     at::kLong,         at::kInt,
                                      at::kComplexFloat, at::kComplexDouble};
constexpr int64_t kNumDtypes = sizeof(kDtypes) / sizeof(kDtypes[0]);

int64_t dtype_code(at::ScalarType t) {
  for (int64_t i = 0; i < kNumDtypes; ++i) {
    if (kDtypes[i] == t) {
      return i;
    }
  }
  return -1;
}

std::string dtype_name(at::ScalarType t) {
  return api::python_dtype_name(t).value_or(std::string("torch.") + c10::toString(t));
}

using api::list_str;

// Identity on the outputs, with find_unused_parameters (Python's _OutputSink): outputs that took
// no part in the loss get an undefined gradient here, so the graph below them still runs and
// their parameters' hooks fire (Note [Finding unused parameters]).
struct OutputSink : public torch::autograd::Function<OutputSink> {
  // at::TensorList: the form of a list apply() records as tensor inputs (one graph node).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList tensors) {
    ctx->set_materialize_grads(false);
    torch::autograd::variable_list out;
    for (const auto& t : tensors) {
      out.push_back(t.clone());
    }
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return grads;
  }
};

}  // namespace

std::shared_ptr<CommHook> bf16_compress_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg) {
  return std::make_shared<hooks::CastCompressHook>(std::move(pg), at::kBFloat16);
}
std::shared_ptr<CommHook> fp16_compress_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg) {
  return std::make_shared<hooks::CastCompressHook>(std::move(pg), at::kHalf);
}
std::shared_ptr<CommHook> powersgd_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                        hooks::PowerSGDOptions options) {
  return std::make_shared<hooks::PowerSGDHook>(std::move(pg), options);
}
std::shared_ptr<CommHook> topk_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                    hooks::TopKOptions options) {
  return std::make_shared<hooks::TopKHook>(std::move(pg), options);
}

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                                                 c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                                 DDPOptions options, torch::nn::AnyModule any)
    : module_(std::move(module)), any_(std::move(any)), pg_(std::move(pg)), options_(options) {
  TORCH_CHECK_VALUE(module_, "DistributedDataParallel: module must not be null");
  TORCH_CHECK_VALUE(pg_, "DistributedDataParallel: process_group must not be null");
  TORCH_CHECK_VALUE(std::isfinite(options_.bucket_cap_mb) && options_.bucket_cap_mb > 0,
                    "bucket_cap_mb must be a finite number > 0, got ", options_.bucket_cap_mb);
  for (const auto& item : module_->named_parameters()) {
    if (item.value().requires_grad()) {
      param_names_.push_back(item.key());
      params_.push_back(item.value());
    }
  }
  TORCH_CHECK(!params_.empty(),
              "DistributedDataParallel is not needed when a module doesn't have any parameter "
              "that requires a gradient.");
  verify_params_across_ranks();
  broadcast(module_states());
  ReducerOptions ro;
  ro.bucket_cap_bytes = static_cast<int64_t>(options_.bucket_cap_mb * kMiB);
  ro.first_bucket_cap_bytes = std::min(kFirstBucketCapBytes, ro.bucket_cap_bytes);
  ro.find_unused_parameters = options_.find_unused_parameters;
  ro.gradient_as_bucket_view = options_.gradient_as_bucket_view;
  ro.check_finite = options_.check_finite;
  ro.verify_layout = options_.verify_layout;
  reducer_ = std::make_unique<Reducer>(params_, param_names_, pg_, ro);
}

DistributedDataParallel::~DistributedDataParallel() = default;

std::vector<at::Tensor> DistributedDataParallel::module_buffers() const {
  std::vector<at::Tensor> out;
  for (const auto& b : module_->buffers()) {
    out.push_back(b);
  }
  return out;
}

std::vector<at::Tensor> DistributedDataParallel::module_states() const {
  std::vector<at::Tensor> out;
  for (const auto& p : module_->parameters()) {
    out.push_back(p.detach());
  }
  for (const auto& b : module_buffers()) {
    out.push_back(b);
  }
  return out;
}

void DistributedDataParallel::broadcast(std::vector<at::Tensor> tensors) {
  std::vector<at::Tensor> nonempty;
  for (auto& t : tensors) {
    if (t.numel() > 0) {
      nonempty.push_back(t);
    }
  }
  if (!nonempty.empty()) {
    torch::NoGradGuard no_grad;
    c10d::broadcast_coalesced(pg_, nonempty, kBufferBroadcastBytes, 0);
  }
}

// The same exchange and messages as DistributedDataParallel._verify_params_across_ranks in
// python/torchlane/ddp.py: every rank raises, naming the first parameter that differs.
void DistributedDataParallel::verify_params_across_ranks() {
  std::vector<std::vector<int64_t>> records;
  std::vector<int64_t> flat{static_cast<int64_t>(params_.size())};
  for (const auto& p : params_) {
    std::vector<int64_t> rec{p.dim(), dtype_code(p.scalar_type())};
    rec.insert(rec.end(), p.sizes().begin(), p.sizes().end());
    flat.insert(flat.end(), rec.begin(), rec.end());
    records.push_back(std::move(rec));
  }
  const int world = pg_->getSize();
  const int me = pg_->getRank();
  const auto device = params_.front().device();
  auto allgather = [&](const at::Tensor& mine) {
    std::vector<at::Tensor> input{mine};
    std::vector<std::vector<at::Tensor>> output(1);
    for (int r = 0; r < world; ++r) {
      output[0].push_back(at::empty_like(mine));
    }
    pg_->allgather(output, input)->wait();
    return output[0];
  };
  auto length = at::tensor({static_cast<int64_t>(flat.size())}, at::kLong).to(device);
  int64_t longest = 0;
  for (const auto& l : allgather(length)) {
    longest = std::max(longest, l.item<int64_t>());
  }
  auto mine = at::full({longest}, -1, at::kLong);
  std::copy(flat.begin(), flat.end(), mine.data_ptr<int64_t>());
  const auto gathered = allgather(mine.to(device));
  for (int rank = 0; rank < world; ++rank) {
    const auto other = gathered[rank].to(at::kCPU).contiguous();
    const int64_t* theirs = other.data_ptr<int64_t>();
    if (std::equal(theirs, theirs + longest, mine.data_ptr<int64_t>())) {
      continue;
    }
    TORCH_CHECK(theirs[0] == flat[0], "DDP expects the same model on every rank: rank ", me,
                " has ", flat[0], " parameters that require grad, rank ", rank, " has ", theirs[0],
                ".");
    int64_t pos = 1;
    for (size_t i = 0; i < params_.size(); ++i) {
      const auto& rec = records[i];
      const auto n = static_cast<int64_t>(rec.size());
      const bool same = pos + n <= longest && std::equal(rec.begin(), rec.end(), theirs + pos);
      if (!same) {
        const int64_t ndim = theirs[pos];
        const int64_t code = theirs[pos + 1];
        const int64_t shape_end = std::min(longest, pos + 2 + std::max<int64_t>(ndim, 0));
        const std::string their_dtype =
            code >= 0 && code < kNumDtypes ? dtype_name(kDtypes[code]) : "other";
        const auto sizes = params_[i].sizes();
        TORCH_CHECK(false, "DDP expects the same model on every rank, but parameter '",
                    param_names_[i], "' has shape ", list_str(sizes.begin(), sizes.end()),
                    " and dtype ", dtype_name(params_[i].scalar_type()), " on rank ", me,
                    " and shape ", list_str(theirs + pos + 2, theirs + shape_end), " and dtype ",
                    their_dtype, " on rank ", rank, ".");
      }
      pos += n;
    }
  }
}

void DistributedDataParallel::pre_forward() {
  if (at::GradMode::is_enabled()) {
    // Raises if the previous reduction never finished (Note [Reducer life cycle]).
    reducer_->prepare_for_forward();
    reducer_->rebuild_buckets();
  }
  if (require_forward_param_sync_ && options_.broadcast_buffers) {
    auto buffers = module_buffers();
    if (!buffers.empty()) {
      broadcast(std::move(buffers));
    }
  }
}

void DistributedDataParallel::allow_local_backward() {
  reducer_->allow_local_backward();
}

std::vector<at::Tensor> DistributedDataParallel::finish_forward(std::vector<at::Tensor> outs) {
  const bool grad_sync = at::GradMode::is_enabled() && require_backward_grad_sync_;
  if (grad_sync && options_.find_unused_parameters) {
    std::vector<size_t> positions;
    torch::autograd::variable_list needs_grad;
    for (size_t i = 0; i < outs.size(); ++i) {
      if (outs[i].defined() && outs[i].requires_grad()) {
        positions.push_back(i);
        needs_grad.push_back(outs[i]);
      }
    }
    if (!needs_grad.empty()) {
      auto sunk = OutputSink::apply(at::TensorList(needs_grad));
      for (size_t j = 0; j < positions.size(); ++j) {
        outs[positions[j]] = sunk[j];
      }
    }
  }
  if (grad_sync) {
    require_forward_param_sync_ = true;
    std::vector<at::Tensor> defined;
    for (const auto& t : outs) {
      if (t.defined()) {
        defined.push_back(t);
      }
    }
    reducer_->prepare_for_backward(defined);
  } else {
    require_forward_param_sync_ = false;
  }
  return outs;
}

at::Tensor DistributedDataParallel::post_forward(at::Tensor out) {
  return finish_forward({std::move(out)})[0];
}

std::vector<at::Tensor> DistributedDataParallel::post_forward(std::vector<at::Tensor> outs) {
  return finish_forward(std::move(outs));
}

void DistributedDataParallel::register_comm_hook(std::shared_ptr<c10d::CommHookInterface> hook) {
  TORCH_CHECK_VALUE(hook, "register_comm_hook: hook must not be null");
  reducer_->register_comm_hook(std::move(hook));
}

bool DistributedDataParallel::grads_finite() const {
  TORCH_CHECK(options_.check_finite,
              "grads_finite needs torchlane.DistributedDataParallel(..., check_finite=True)");
  return reducer_->grads_finite();
}

CommStats DistributedDataParallel::comm_stats() const {
  const auto stats = reducer_->stats();
  auto ms = [&](int64_t t) {
    const int64_t t0 = stats.times.first_hook_ns;
    return t && t0 ? static_cast<double>(t - t0) / 1e6 : 0.0;
  };
  CommStats out;
  out.bytes_reduced = stats.bytes_reduced;
  out.bytes_sent = stats.bytes_sent;
  out.backward_end_ms = ms(stats.times.backward_end_ns);
  out.comm_end_ms = ms(stats.times.comm_end_ns);
  for (const auto& b : reducer_->buckets()) {
    BucketInfo info;
    info.numel = b.buffer.numel();
    info.bytes = static_cast<int64_t>(b.buffer.nbytes());
    info.dtype = c10::toString(b.buffer.scalar_type());
    for (auto i : b.params) {
      info.params.push_back(param_names_[i]);
    }
    out.buckets.push_back(std::move(info));
  }
  out.num_buckets = static_cast<int64_t>(out.buckets.size());
  return out;
}

}  // namespace torchlane
