#include "reducer/reducer.hpp"

#include "comm/clock.hpp"
#include "comm/grad_bucket.hpp"
#include "comm/kept_works.hpp"
#include "reducer/finite_copy.hpp"
#include "reducer/row_sparse.hpp"

#include <algorithm>
#include <sstream>
#include <unordered_set>

#include <ATen/ScalarOps.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/variable.h>

namespace torchlane {

namespace {

using comm::now_ns;

std::string join_names(const std::vector<std::string>& names, size_t limit = 20) {
  std::ostringstream out;
  for (size_t i = 0; i < names.size() && i < limit; ++i) {
    out << (i ? ", " : "") << names[i];
  }
  if (names.size() > limit) {
    out << ", ... (" << names.size() - limit << " more)";
  }
  return out.str();
}

// Note [Finalize on the outermost backward]
// finalize_backward must run when the *whole* backward pass is done. A callback queued from a
// gradient hook lands on the graph task that is running, which under reentrant backward (a
// checkpointed segment runs a nested backward) is an inner one that ends early. So the forward's
// outputs carry a pre-hook on their grad_fn nodes: those nodes run first, on the outermost graph
// task, and queue finalize there. The token lets a graph that outlives the reducer do nothing.
class QueueFinalizePreHook : public torch::autograd::FunctionPreHook {
 public:
  QueueFinalizePreHook(Reducer* reducer, std::shared_ptr<std::atomic<bool>> alive)
      : reducer_(reducer), alive_(std::move(alive)) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    if (alive_->load()) {
      reducer_->queue_finalize();
    }
    return grads;
  }

 private:
  Reducer* reducer_;
  std::shared_ptr<std::atomic<bool>> alive_;
};

}  // namespace

Reducer::Reducer(std::vector<at::Tensor> params, std::vector<std::string> param_names,
                 c10::intrusive_ptr<c10d::ProcessGroup> process_group, ReducerOptions options)
    : params_(std::move(params)),
      param_names_(std::move(param_names)),
      process_group_(std::move(process_group)),
      options_(options) {
  TORCH_CHECK(process_group_, "process_group must not be None");
  TORCH_CHECK(!params_.empty(), "the reducer needs at least one parameter that requires grad");
  TORCH_CHECK(param_names_.size() == params_.size(), "got ", param_names_.size(),
              " parameter names for ", params_.size(), " parameters");
  TORCH_CHECK(options_.bucket_cap_bytes > 0, "bucket_cap_mb must be positive, got ",
              options_.bucket_cap_bytes, " bytes");
  world_size_ = process_group_->getSize();
  const auto n = static_cast<int64_t>(params_.size());
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = params_[i];
    TORCH_CHECK(p.defined() && p.requires_grad(), "parameter '", param_names_[i],
                "' must be a defined tensor that requires grad");
    TORCH_CHECK(p.layout() == at::kStrided, "parameter '", param_names_[i],
                "' is not a dense (strided) tensor; torchlane DDP supports dense parameters only");
    param_meta_.push_back(
        {static_cast<int64_t>(p.numel() * p.element_size()), p.scalar_type(), p.device()});
  }
  // See Note [Sparse gradients].
  sparse_kind_.assign(n, 0);
  for (const auto& [list, kind, what] :
       {std::tuple{&options_.sparse_params, 1, "sparse_params"},
        std::tuple{&options_.row_sparse_params, 2, "row_sparse_params"}}) {
    for (auto i : *list) {
      TORCH_CHECK_VALUE(i >= 0 && i < n, what, ": parameter index ", i, " is out of range [0, ", n,
                        ")");
      TORCH_CHECK_VALUE(sparse_kind_[i] == 0, what, ": parameter '", param_names_[i],
                        "' is listed twice (or is both sparse and row-sparse)");
      TORCH_CHECK_VALUE(params_[i].dim() >= 1, what, ": parameter '", param_names_[i],
                        "' is a scalar; a sparse reduction needs at least one dimension of rows");
      sparse_kind_[i] = static_cast<char>(kind);
      param_meta_[i].own_bucket = true;
    }
  }

  grad_hooks_.install(params_, [this](int64_t i) { autograd_hook(i); });

  std::vector<int64_t> reverse_order(n);
  for (int64_t i = 0; i < n; ++i) {
    reverse_order[i] = n - 1 - i;
  }
  bucket_order_ = std::move(reverse_order);
  initialize_buckets(compute_bucket_assignment(
      param_meta_, bucket_order_, options_.first_bucket_cap_bytes, options_.bucket_cap_bytes));
  ready_.assign(n, 0);
  hook_count_.assign(n, 0);
  local_used_host_.assign(n, 0);
  globally_unused_.assign(n, 0);
}

Reducer::~Reducer() {
  alive_->store(false);
  grad_hooks_.remove();
}

void Reducer::initialize_buckets(const std::vector<std::vector<int64_t>>& assignment) {
  at::NoGradGuard no_grad;
  std::vector<Bucket> buckets;
  buckets.reserve(assignment.size());
  param_location_.assign(params_.size(), {0, 0});
  for (const auto& members : assignment) {
    TORCH_INTERNAL_ASSERT(!members.empty());
    Bucket bucket;
    bucket.params = members;
    if (sparse_kind_[members.front()] != 0) {  // Note [Sparse gradients]: one parameter, no buffer
      TORCH_INTERNAL_ASSERT(members.size() == 1);
      const auto i = members.front();
      bucket.sparse = true;
      bucket.row_sparse = sparse_kind_[i] == 2;
      bucket.offsets = {0};
      bucket.lengths = {static_cast<size_t>(params_[i].numel())};
      bucket.buffer = at::empty({0}, params_[i].options().requires_grad(false));
      bucket.views.emplace_back();
      param_location_[i] = {buckets.size(), 0};
      bucket.pending = 1;
      buckets.push_back(std::move(bucket));
      continue;
    }
    size_t total = 0;
    for (auto i : members) {
      bucket.offsets.push_back(total);
      bucket.lengths.push_back(static_cast<size_t>(params_[i].numel()));
      total += bucket.lengths.back();
    }
    const auto& first = params_[members.front()];
    bucket.buffer = at::zeros({static_cast<int64_t>(total)}, first.options().requires_grad(false));
    for (size_t slot = 0; slot < members.size(); ++slot) {
      const auto i = members[slot];
      param_location_[i] = {buckets.size(), slot};
      auto view = bucket.buffer
                      .narrow(0, static_cast<int64_t>(bucket.offsets[slot]),
                              static_cast<int64_t>(bucket.lengths[slot]))
                      .view(params_[i].sizes());
      // See Note [Gradient as bucket view]: an existing gradient moves into the new buffer.
      if (options_.gradient_as_bucket_view) {
        auto& grad = params_[i].mutable_grad();
        if (grad.defined()) {
          view.copy_(grad);
          grad = view;
        }
      }
      bucket.views.push_back(std::move(view));
    }
    bucket.pending = members.size();
    buckets.push_back(std::move(bucket));
  }
  buckets_ = std::move(buckets);
}

void Reducer::reset_iteration_state() {
  if (!rebuilt_ && !static_graph_first_iteration()) {
    ready_order_.clear();  // only a complete, finished iteration's order is used for the rebuild
  }
  backward_started_ = false;
  layout_verified_ = false;
  finalize_queued_ = false;
  next_bucket_ = 0;
  std::fill(ready_.begin(), ready_.end(), 0);
  std::fill(hook_count_.begin(), hook_count_.end(), 0);
  for (auto& bucket : buckets_) {
    bucket.pending = bucket.params.size();
    bucket.future.reset();
    bucket.timer = BucketTimer();  // a fresh completion slot: Note [Step timer]
    bucket.sparse_grad.reset();
    bucket.wire_bytes = 0;
  }
  local_used_future_.reset();
  if (!(options_.static_graph && iterations_ > 0)) {
    unused_.clear();
  }
}

void Reducer::check_states_locked() const {
#ifdef TORCHLANE_DEBUG_CHECKS
  TORCH_INTERNAL_ASSERT(
      !require_finalize_ || backward_started_,
      "Note [Reducer states]: a reduction in progress without a started backward");
  TORCH_INTERNAL_ASSERT(!(expect_hooks_ && backward_started_) || require_finalize_,
                        "Note [Reducer states]: Reducing without require_finalize_");
  TORCH_INTERNAL_ASSERT(!layout_verified_ || backward_started_,
                        "Note [Reducer states]: layout verified before the backward started");
#endif
}

void Reducer::prepare_for_forward() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_states_locked();
  expect_hooks_ = false;
  if (!require_finalize_) {
    return;
  }
  auto missing = unready_parameter_names_locked();
  abandon_iteration();
  TORCH_CHECK(false,
              "Expected to have finished reduction in the prior iteration before starting a new "
              "one. This error indicates that your module has parameters that were not used in "
              "producing loss. You can enable unused parameter detection by passing the keyword "
              "argument `find_unused_parameters=True` to `torchlane.DistributedDataParallel`, and "
              "by making sure all `forward` function outputs participate in calculating loss. "
              "Parameters which did not receive grad for rank ",
              process_group_->getRank(), ": ", join_names(missing));
}

void Reducer::prepare_for_backward(const std::vector<at::Tensor>& outputs) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_states_locked();
  expect_hooks_ = true;
  local_backward_allowed_ = false;
  reset_iteration_state();
  if (options_.find_unused_parameters && !options_.static_graph) {
    find_unused_parameters(outputs);
  }
  // See Note [Finalize on the outermost backward].
  std::unordered_set<torch::autograd::Node*> hooked;
  for (const auto& out : outputs) {
    if (out.defined() && out.requires_grad()) {
      auto fn = out.grad_fn();
      if (fn && hooked.insert(fn.get()).second) {
        fn->add_pre_hook(std::make_unique<QueueFinalizePreHook>(this, alive_));
      }
    }
  }
}

void Reducer::queue_finalize() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (expect_hooks_) {
    queue_finalize_locked();
  }
}

void Reducer::queue_finalize_locked() {
  if (!finalize_queued_) {
    finalize_queued_ = true;
    auto alive = alive_;
    torch::autograd::Engine::get_default_engine().queue_callback([this, alive] {
      if (alive->load()) {
        finalize_backward();
      }
    });
  }
}

// Leaves an iteration that cannot finish (an error was raised) so that the next forward starts
// clean instead of reporting unreduced parameters.
void Reducer::abandon_iteration() {
  expect_hooks_ = false;
  require_finalize_ = false;
  reset_iteration_state();
  std::fill(local_used_host_.begin(), local_used_host_.end(), 0);
  // The bytes this unfinished step sent are not reported as the next step's.
  step_bytes_sent_ = 0;
  step_bytes_saved_ = 0;
  if (auto* counting = dynamic_cast<CommHook*>(comm_hook_.get())) {
    counting->take_bytes_sent();
  }
}

// Note [Finding unused parameters]: a parameter whose AccumulateGrad node cannot be reached from
// the forward's outputs will get no gradient in this backward. It is marked ready (a zero slot in
// its bucket) when the first hook fires, so its bucket does not wait for it forever.
void Reducer::find_unused_parameters(const std::vector<at::Tensor>& outputs) {
  std::unordered_set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> stack;
  for (const auto& out : outputs) {
    if (!out.defined() || !out.requires_grad()) {
      continue;
    }
    // From grad_fn only, as torch DDP: a parameter returned as an output is not thereby used.
    auto fn = out.grad_fn();
    if (fn && seen.insert(fn.get()).second) {
      stack.push_back(fn.get());
    }
  }
  while (!stack.empty()) {
    auto* node = stack.back();
    stack.pop_back();
    for (const auto& edge : node->next_edges()) {
      auto* next = edge.function.get();
      if (next && seen.insert(next).second) {
        stack.push_back(next);
      }
    }
  }
  unused_.clear();
  const auto& accumulators = grad_hooks_.accumulators();
  for (size_t i = 0; i < accumulators.size(); ++i) {
    if (!seen.count(accumulators[i].get())) {
      unused_.push_back(static_cast<int64_t>(i));
    }
  }
}

bool Reducer::static_graph_first_iteration() const {
  return options_.static_graph && iterations_ == 0;
}

// Whether this iteration all-reduces the usage flags after its buckets. Active and joined ranks
// (run_zero_allreduces) must agree on it, so it is decided in this one place.
bool Reducer::sends_usage_flags() const {
  return options_.find_unused_parameters || static_graph_first_iteration();
}

bool Reducer::tracks_usage() const {
  return options_.find_unused_parameters || options_.static_graph;
}

void Reducer::autograd_hook(int64_t index) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!expect_hooks_) {
    // Note [No silent gradient loss]: torch DDP skips such a gradient without a word (a second
    // backward after one synchronised forward, a loss computed through `.module`), and the ranks
    // drift apart. Local accumulation is only what no_sync() asked for; anything else raises.
    TORCH_CHECK(local_backward_allowed_, "torchlane.DistributedDataParallel: parameter '",
                param_names_[index],
                "' got a gradient in a backward pass that no synchronised forward prepared "
                "(a second backward after one forward, or a loss computed through `.module`). "
                "Its gradient would not be averaged across ranks. Run the forward through the "
                "DDP model again, call model.reducer.prepare_for_backward(outputs) before the "
                "backward, or use model.no_sync() to accumulate gradients locally on purpose.");
    // Note [Unused parameters after no_sync]: a parameter used only in no_sync() backwards
    // still holds a local gradient at the synchronised step, so it counts as used on this rank
    // there (as in torch DDP): otherwise, unused on every rank in that last step, it would keep
    // each rank's own accumulated gradient and the ranks would drift apart. The flags are
    // cleared once they have been sent.
    if (options_.find_unused_parameters && !options_.static_graph &&
        params_[index].grad().defined()) {
      local_used_host_[index] = 1;
    }
    return;  // no_sync() / require_backward_grad_sync=False: gradients accumulate locally
  }
  try {
    on_gradient_ready(index);
  } catch (...) {
    abandon_iteration();
    throw;
  }
}

void Reducer::on_gradient_ready(int64_t index) {
  // Normally an output's pre-hook queued finalize already (Note [Finalize on the outermost
  // backward]). If the loss did not come from the outputs, queue it on the running graph task;
  // should that be a nested one, finalize_backward finds buckets pending and re-arms.
  queue_finalize_locked();
  // "Used" means this hook fired with a gradient, as in torch DDP: a stale `.grad` of a
  // parameter marked ready as unused does not count.
  if (params_[index].grad().defined()) {
    local_used_host_[index] = 1;
  }
  if (!backward_started_) {
    backward_started_ = true;
    require_finalize_ = true;
    step_times_.first_hook_ns = now_ns();
    step_ready_order_.clear();
    flight_->iteration_first_seq.store(collective_seq_ + 1, std::memory_order_relaxed);
    flight_->iteration.fetch_add(1, std::memory_order_relaxed);
    for (auto i : unused_) {
      mark_ready(i);
    }
  }
  hook_count_[index] += 1;
  if (static_graph_first_iteration()) {
    // Note [Static graph]: the first iteration only observes how often each parameter's hook
    // fires and in which order; all buckets are reduced in finalize_backward.
    if (hook_count_[index] == 1) {
      ready_order_.push_back(index);
    }
    return;
  }
  if (options_.static_graph && hook_count_[index] < expected_hook_count_[index]) {
    return;  // the gradient is complete only after the last of its expected firings
  }
  mark_ready(index);
}

void Reducer::mark_ready(int64_t index) {
  TORCH_CHECK(!ready_[index], "torchlane DDP: parameter '", param_names_[index], "' (index ", index,
              ") received its gradient more than once in one backward pass. This happens with "
              "reentrant backward (e.g. activation checkpointing with use_reentrant=True) or when "
              "a parameter is used by several forward calls whose outputs share one backward. "
              "Pass static_graph=True if the graph is the same every iteration.");
  ready_[index] = 1;
  step_ready_order_.push_back(index);
  if (!rebuilt_ && !options_.static_graph && !options_.find_unused_parameters) {
    ready_order_.push_back(index);
  }
  copy_grad_to_bucket(index);
  const auto [b, slot] = param_location_[index];
  auto& bucket = buckets_[b];
  TORCH_INTERNAL_ASSERT(bucket.pending > 0);
  if (--bucket.pending == 0) {
    bucket.timer.ready_ns = now_ns();
    launch_ready_buckets();
  }
}

// Note [Gradient as bucket view]: with gradient_as_bucket_view=True each `.grad` is a view of
// its bucket's buffer, so AccumulateGrad already wrote the gradient in place and no copy is
// needed. A `.grad` that is not such a view (the first backward, or after zero_grad set it to
// None) is copied in once and replaced by the view.
void Reducer::copy_grad_to_bucket(int64_t index) {
  // backward(create_graph=True) runs hooks in grad mode: the bucket must not join the graph.
  at::NoGradGuard no_grad;
  if (sparse_kind_[index] != 0) {
    copy_sparse_grad_to_bucket(index);
    return;
  }
  const auto [b, slot] = param_location_[index];
  auto& view = buckets_[b].views[slot];
  auto& grad = params_[index].mutable_grad();
  if (!grad.defined()) {
    view.zero_();
    return;
  }
  TORCH_CHECK(!grad.is_sparse(), "torchlane DDP: parameter '", param_names_[index],
              "' got a sparse gradient, but only parameters of nn.Embedding / nn.EmbeddingBag "
              "modules built with sparse=True are reduced as sparse (as in torch DDP); build the "
              "module with sparse=True or keep its gradient dense");
  const bool scale =
      !comm_hook_;  // a comm hook receives the unscaled sum (Note [Comm hook contract])
  if (options_.gradient_as_bucket_view && grad.is_alias_of(view)) {
    if (scale) {
      view.mul_(1.0 / static_cast<double>(world_size_));
    }
    return;
  }
  if (scale) {
    // Pre-divide by world size fused into the copy, exactly as torch DDP does.
    auto factor = c10::scalar_to_tensor(c10::Scalar(1.0 / static_cast<double>(world_size_)));
    factor.unsafeGetTensorImpl()->set_wrapped_number(true);
    at::mul_out(view, grad, factor);
  } else {
    view.copy_(grad);
  }
  if (options_.gradient_as_bucket_view) {
    grad = view;
  }
}

// Note [Sparse gradients]
// torch DDP reduces the gradient of an nn.Embedding/EmbeddingBag built with sparse=True as a
// sparse COO tensor in a bucket of its own (a sparse tensor cannot be a slice of a flat buffer),
// and so does torchlane, with the same observable result:
//  * The gradient is divided by world size in place (values / world_size, a division as torch's
//    `div_(div_factor_)`, not a multiplication by 1/world_size: the two differ in the last bit)
//    unless a comm hook is registered, which receives the unscaled gradient as GradBucket::buffer()
//    (sparse; getGradients() is empty, as in torch).
//  * Without a hook it goes to the process group's all-reduce as a sparse tensor. Gloo's sparse
//    all-reduce (ProcessGroupGlooDetail.hpp, AsyncSparseAllreduceWork) coalesces the local tensor,
//    all-gathers every rank's nnz, then its indices and values (allgatherv), sums the per-rank
//    tensors in rank order, coalesces, and copies the result into the input tensor: the future's
//    value is the input list, which now holds the coalesced average. Since torchlane hands Gloo the
//    same tensor torch DDP does, the result is bitwise torch's. NCCL has no sparse all-reduce:
//    ProcessGroupNCCL::allreduce_sparse raises "NCCL does not support all_reduce with sparse
//    tensors" unless torch is built against Meta's NCCLX, so on NCCL torch DDP and torchlane both
//    raise that error for sparse buckets (use a Gloo group, or row_sparse_params below).
//  * The result is copied into `.grad` (still a sparse tensor; coalesced). gradient_as_bucket_view
//    does not apply to it (there is no flat buffer), as in torch.
//  * A rank on which the parameter got no gradient (find_unused_parameters) contributes an empty
//    sparse tensor (nnz 0, sparse_dim 1 as an embedding's gradient) where torch DDP fails with
//    "Expected sparse gradient to be defined."; a parameter unused on every rank keeps its `.grad`.
//  * Row-sparse (row_sparse_params, beyond torch): the parameter's `.grad` stays dense, but at
//    reduction time it is converted to its nonzero rows (one pass over the gradient, Note
//    [Row-sparse detection] in row_sparse.hpp), reduced by the same sparse path, and written back
//    as zeros plus the reduced rows. An embedding with sparse=False whose step touches few rows
//    then sends nnz * (row + 8 index bytes) instead of the whole table; comm_stats() reports the
//    bytes saved (negative if most rows are touched).
void Reducer::copy_sparse_grad_to_bucket(int64_t index) {
  const auto [b, slot] = param_location_[index];
  auto& bucket = buckets_[b];
  auto& grad = params_[index].mutable_grad();
  if (!grad.defined()) {
    bucket.sparse_grad = empty_sparse_grad(index);
  } else if (bucket.row_sparse) {
    TORCH_CHECK(!grad.is_sparse(), "torchlane DDP: parameter '", param_names_[index],
                "' is in row_sparse_params but got a sparse gradient; row_sparse_params is for "
                "parameters whose gradient is dense (sparse ones are reduced as sparse already)");
    bucket.sparse_grad = dense_rows_to_sparse(grad);  // Note [Row-sparse detection]
  } else {
    TORCH_CHECK(
        grad.is_sparse(), "Expected variable to have sparse gradient. torchlane DDP: parameter '",
        param_names_[index], "' belongs to a module with sparse=True but its gradient is dense");
    bucket.sparse_grad = grad;  // reduced in place, as torch DDP does
  }
  if (!comm_hook_) {
    bucket.sparse_grad.div_(world_size_);
  }
}

at::Tensor Reducer::empty_sparse_grad(int64_t index) const {
  const auto& p = params_[index];
  auto value_sizes = p.sizes().vec();
  value_sizes[0] = 0;
  return at::_sparse_coo_tensor_unsafe(
      at::empty({1, 0}, p.options().dtype(at::kLong).requires_grad(false)),
      at::empty(value_sizes, p.options().requires_grad(false)), p.sizes());
}

int64_t Reducer::bucket_bytes(const Bucket& bucket) const {
  if (!bucket.sparse) {
    return static_cast<int64_t>(bucket.buffer.nbytes());
  }
  if (!bucket.sparse_grad.defined()) {
    return 0;
  }
  return static_cast<int64_t>(bucket.sparse_grad._indices().nbytes() +
                              bucket.sparse_grad._values().nbytes());
}

void Reducer::launch_ready_buckets() {
  if (options_.verify_layout && !layout_verified_) {
    return;  // See Note [Layout verification]: launched by finalize_backward after the check.
  }
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].pending == 0) {
    launch_bucket(next_bucket_++);
  }
  if (next_bucket_ == buckets_.size() && sends_usage_flags() && !local_used_future_) {
    // Which parameters got a gradient on any rank: globally unused ones keep their `.grad`.
    auto used =
        at::from_blob(local_used_host_.data(), {static_cast<int64_t>(params_.size())}, at::kInt)
            .to(params_.front().device(), /*non_blocking=*/false, /*copy=*/true);
    std::vector<at::Tensor> tensors{used};
    local_used_future_ = comm::launched(process_group_->allreduce(tensors));
    local_used_result_ = used;
    std::fill(local_used_host_.begin(), local_used_host_.end(), 0);  // `used` is a copy
  }
}

void Reducer::launch_bucket(size_t b) {
  auto& bucket = buckets_[b];
  RECORD_FUNCTION("torchlane::allreduce_bucket", std::vector<c10::IValue>({bucket.buffer}));
  bucket.timer.launch_ns = now_ns();
  bucket.wire_bytes = bucket_bytes(bucket);
  flight_->on_launch(++collective_seq_, static_cast<int64_t>(b), bucket.wire_bytes,
                     bucket.timer.launch_ns);
  if (bucket.sparse) {  // See Note [Sparse gradients].
    if (comm_hook_) {
      auto grad_bucket = make_grad_bucket(b, bucket.sparse_grad);
      bucket.future = comm_hook_->runHook(grad_bucket);
      TORCH_CHECK(bucket.future, "the communication hook returned no future for bucket ", b);
    } else {
      std::vector<at::Tensor> tensors{bucket.sparse_grad};
      bucket.future = comm::launched(process_group_->allreduce(tensors));
    }
    if (!comm_hook_counts_bytes_) {
      step_bytes_sent_ += bucket.wire_bytes;
    }
    if (bucket.row_sparse) {
      step_bytes_saved_ += param_meta_[bucket.params.front()].bytes - bucket.wire_bytes;
    }
  } else if (comm_hook_) {
    auto grad_bucket = make_grad_bucket(b, bucket.buffer);
    bucket.future = comm_hook_->runHook(grad_bucket);
    TORCH_CHECK(bucket.future, "the communication hook returned no future for bucket ", b);
    if (!comm_hook_counts_bytes_) {
      step_bytes_sent_ += bucket.buffer.nbytes();
    }
  } else {
    std::vector<at::Tensor> tensors{bucket.buffer};
    bucket.future = comm::launched(process_group_->allreduce(tensors));
    step_bytes_sent_ += bucket.buffer.nbytes();
  }
  bucket.timer.return_ns = now_ns();
  auto done = bucket.timer.callback_ns;  // Note [Step timer]
  // Note [Flight record]: on_launch above ran before the launch, so a launch that hangs shows.
  auto flight = flight_;
  const int64_t seq = collective_seq_;
  const auto bucket_index = static_cast<int64_t>(b);
  bucket.future->addCallback([done, flight, seq, bucket_index](c10::ivalue::Future&) {
    const int64_t t = now_ns();
    done->store(t);
    flight->on_complete(seq, bucket_index, t);
  });
}

// Future::wait() returns normally when the future completed with an error (a peer died, the
// process group timed out): the error has to be fetched and raised here, or a failed all-reduce
// would pass for a finished one. The iteration is abandoned so the next forward does not also
// report unreduced parameters.
void Reducer::wait_or_throw(c10::ivalue::Future& future, const std::string& what) {
  std::string error;
  try {
    future.wait();
    if (future.hasError()) {
      error = future.tryRetrieveErrorMessage();
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (!error.empty()) {
    abandon_iteration();
    TORCH_CHECK(false, "torchlane DDP: the all-reduce of ", what,
                " failed while waiting for the other ranks: ", error);
  }
}

c10d::GradBucket Reducer::make_grad_bucket(size_t b, const at::Tensor& buffer) const {
  std::vector<at::Tensor> params;
  for (auto i : buckets_[b].params) {
    params.push_back(params_[i]);
  }
  return comm::make_grad_bucket(b, buckets_.size(), buffer, params);
}

std::string Reducer::describe_bucket(size_t b) const {
  const auto& bucket = buckets_[b];
  std::ostringstream out;
  out << "bucket " << b << " of " << buckets_.size() << " (" << bucket.params.size()
      << " parameters, " << (bucket.sparse ? "sparse, " : "") << bucket_bytes(bucket)
      << " bytes, first parameter '" << param_names_[bucket.params.front()] << "')";
  return out.str();
}

void Reducer::finalize_backward() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_states_locked();
  finalize_queued_ = false;
  if (!expect_hooks_ || !backward_started_) {
    return;
  }
  try {
    finalize_locked();
  } catch (...) {
    abandon_iteration();
    throw;
  }
  comm::drop_finished();  // Note [Releasing collectives' Work objects]
}

void Reducer::finalize_locked() {
  step_times_.backward_end_ns = now_ns();
  if (static_graph_first_iteration()) {
    expected_hook_count_ = hook_count_;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (hook_count_[i] == 0) {
        unused_.push_back(static_cast<int64_t>(i));
        ready_order_.push_back(static_cast<int64_t>(i));
      }
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      mark_ready(static_cast<int64_t>(i));
    }
  }
  if (options_.verify_layout && !layout_verified_) {
    verify_layout_across_ranks();
    layout_verified_ = true;
    launch_ready_buckets();
  }
  if (next_bucket_ < buckets_.size()) {
    // Some parameters have no gradient yet. Either a nested backward ended (more hooks will come
    // and queue this again) or they are unused: then require_finalize_ stays set and the next
    // forward raises with their names (prepare_for_forward).
    return;
  }
  expect_hooks_ = false;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    wait_or_throw(*buckets_[b].future, describe_bucket(b));
    buckets_[b].timer.wait_ns = now_ns();
  }
  step_times_.comm_end_ns = now_ns();
  if (local_used_future_) {
    wait_or_throw(*local_used_future_, "the unused-parameter flags");
    auto used = local_used_result_.to(at::kCPU);
    const auto* flags = used.data_ptr<int32_t>();
    for (size_t i = 0; i < params_.size(); ++i) {
      globally_unused_[i] = flags[i] == 0;
    }
  }
  write_back_gradients();
  if (comm_hook_counts_bytes_ && options_.check_finite) {  // Note [Rolling back a non-finite step]
    static_cast<CommHook*>(comm_hook_.get())->end_step(grads_finite_);
  }
  publish_stats();
  require_finalize_ = false;
  iterations_ += 1;
}

void Reducer::write_back_gradients() {
  at::NoGradGuard no_grad;
  grads_finite_ = true;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    auto& bucket = buckets_[b];
    // A trace names the write-back of each bucket, as torch's reducer::copy_bucket_to_grad.
    RECORD_FUNCTION("torchlane::copy_bucket_to_grad", std::vector<c10::IValue>({bucket.buffer}));
    if (bucket.sparse) {
      write_back_sparse(b);
      continue;
    }
    if (comm_hook_) {
      at::Tensor result;
      try {
        result = comm_hook_->parseHookResult(bucket.future->value());
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "the communication hook's future for ", describe_bucket(b),
                    " did not hold a tensor: ", e.what());
      }
      TORCH_CHECK(result.defined() && result.numel() == bucket.buffer.numel() &&
                      result.scalar_type() == bucket.buffer.scalar_type(),
                  "the communication hook must return a future of a tensor with the bucket's "
                  "numel and dtype: expected ",
                  bucket.buffer.numel(), " elements of ", bucket.buffer.scalar_type(), " for ",
                  describe_bucket(b), ", got ",
                  result.defined() ? std::to_string(result.numel()) : std::string("undefined"),
                  " elements of ",
                  result.defined() ? c10::toString(result.scalar_type()) : "no dtype");
      if (!result.is_same(bucket.buffer)) {
        bucket.buffer.copy_(result.reshape({-1}));
      }
    }
    // Note [Finite check]: every rank holds the same reduced buffer, so a NaN/Inf seen here is
    // seen on every rank and a step skipped on that basis is skipped consistently. In copy mode
    // the check rides on the write-back copy; gradient-as-view has no copy and pays one pass.
    bool bucket_finite = true;
    const bool check_per_copy = options_.check_finite && !options_.gradient_as_bucket_view &&
                                bucket.buffer.device().is_cpu();
    if (options_.check_finite && !check_per_copy) {
      bucket_finite = all_finite(bucket.buffer);
    }
    for (size_t slot = 0; slot < bucket.params.size(); ++slot) {
      const auto i = bucket.params[slot];
      if (tracks_usage() && globally_unused_[i]) {
        continue;  // no rank produced a gradient: leave `.grad` as it is, as torch DDP does
      }
      auto& grad = params_[i].mutable_grad();
      const auto& view = bucket.views[slot];
      if (options_.gradient_as_bucket_view) {
        if (!grad.defined() || !grad.is_alias_of(view)) {
          grad = view;
        }
      } else {
        if (!grad.defined()) {
          grad = at::empty_like(view, at::MemoryFormat::Contiguous);
        }
        if (check_per_copy) {
          bucket_finite &= copy_and_check_finite(grad, view);
        } else {
          grad.copy_(view);
        }
      }
    }
    grads_finite_ &= bucket_finite;
  }
}

// See Note [Sparse gradients].
void Reducer::write_back_sparse(size_t b) {
  auto& bucket = buckets_[b];
  const auto i = bucket.params.front();
  at::Tensor result;
  try {
    const auto& value = bucket.future->value();
    result = comm_hook_ ? comm_hook_->parseHookResult(value)
                        : (value.isTensor() ? value.toTensor() : value.toTensorVector().at(0));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "the communication hook's future for ", describe_bucket(b),
                " did not hold a tensor: ", e.what());
  }
  TORCH_CHECK(result.defined() && result.is_sparse() && result.sizes() == params_[i].sizes() &&
                  result.scalar_type() == params_[i].scalar_type(),
              "the communication hook must return a future of a sparse tensor shaped like the "
              "parameter for a sparse bucket: expected a sparse ",
              params_[i].scalar_type(), " tensor of size ", params_[i].sizes(), " for ",
              describe_bucket(b), ", got ",
              result.defined() ? (result.is_sparse() ? "a sparse " : "a dense ") : "undefined",
              result.defined() ? c10::toString(result.scalar_type()) : "",
              result.defined() ? " tensor of size " + c10::str(result.sizes()) : "");
  if (tracks_usage() && globally_unused_[i]) {
    return;  // no rank produced a gradient: leave `.grad` as it is, as torch DDP does
  }
  if (options_.check_finite) {
    grads_finite_ &= all_finite(result._values());
  }
  auto& grad = params_[i].mutable_grad();
  if (bucket.row_sparse) {
    auto rows = result.coalesce();
    if (!grad.defined()) {
      grad = at::zeros_like(params_[i], at::MemoryFormat::Contiguous);
    } else {
      grad.zero_();
    }
    grad.index_copy_(0, rows._indices().select(0, 0), rows._values());
  } else if (grad.defined() && grad.is_sparse()) {
    if (!grad.is_same(result)) {
      grad.copy_(result);
    }
  } else {
    grad = result;
  }
}

void Reducer::publish_stats() {
  StepStats stats;
  stats.times = step_times_;
  stats.ready_order = step_ready_order_;
  stats.row_sparse_bytes_saved = step_bytes_saved_;
  step_bytes_saved_ = 0;
  for (const auto& bucket : buckets_) {
    // Uncompressed: a row-sparse bucket's dense gradient, a sparse one's indices and values.
    stats.bytes_reduced += bucket.row_sparse ? param_meta_[bucket.params.front()].bytes
                           : bucket.sparse   ? bucket.wire_bytes
                                             : bucket_bytes(bucket);
    stats.bucket_times.push_back(bucket.timer);
  }
  auto* counting = comm_hook_counts_bytes_ ? dynamic_cast<CommHook*>(comm_hook_.get()) : nullptr;
  stats.bytes_sent = step_bytes_sent_ + (counting ? counting->take_bytes_sent() : 0);
  if (counting) {
    stats.collectives = counting->step_collectives();
  }
  step_bytes_sent_ = 0;
  std::lock_guard<std::mutex> guard(stats_mutex_);
  last_stats_ = std::move(stats);
}

StepStats Reducer::stats() const {
  std::lock_guard<std::mutex> guard(stats_mutex_);
  StepStats stats = last_stats_;
  if (!stats.bucket_times.empty()) {
    stats.times.comm_end_ns = 0;
    for (const auto& t : stats.bucket_times) {
      stats.times.comm_end_ns = std::max(stats.times.comm_end_ns, t.done_ns());
    }
  }
  return stats;
}

bool Reducer::rebuild_buckets() {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto n = static_cast<int64_t>(params_.size());
  if (rebuilt_ || (options_.find_unused_parameters && !options_.static_graph) ||
      static_cast<int64_t>(ready_order_.size()) != n) {
    return false;
  }
  // See Note [Bucket rebuild]. The order travels as a tensor (never a pickle) and is checked
  // before use: a bad peer must not be able to make us index out of bounds.
  auto order = at::empty({n + 1}, at::TensorOptions().dtype(at::kLong));
  if (process_group_->getRank() == 0) {
    auto* data = order.data_ptr<int64_t>();
    data[0] = n;
    std::copy(ready_order_.begin(), ready_order_.end(), data + 1);
  }
  auto on_device = order.to(params_.front().device());
  std::vector<at::Tensor> tensors{on_device};
  process_group_->broadcast(tensors)->wait();
  order = on_device.to(at::kCPU);
  const auto* data = order.data_ptr<int64_t>();
  TORCH_CHECK(data[0] == n, "torchlane DDP: rank 0 sent a bucket order for ", data[0],
              " parameters, this rank has ", n);
  std::vector<int64_t> received(data + 1, data + 1 + n);
  std::vector<char> seen(n, 0);
  for (int64_t pos = 0; pos < n; ++pos) {
    const auto i = received[pos];
    TORCH_CHECK(i >= 0 && i < n && !seen[i], "torchlane DDP: rank 0 sent an invalid bucket order ",
                "(entry ", pos, " = ", i, " is out of range or repeated)");
    seen[i] = 1;
  }
  bucket_order_ = std::move(received);
  initialize_buckets(compute_bucket_assignment(
      param_meta_, bucket_order_, options_.first_bucket_cap_bytes, options_.bucket_cap_bytes));
  rebuilt_ = true;
  ready_order_.clear();
  return true;
}

// Note [Bucket cap autotuning]
// bucket_cap_mb="auto" (torchlane/autotune.py) tries several caps during the first steps and
// settles on the fastest; each try re-plans the buckets here, between steps, from the same order
// the current buckets came from (the rebuilt ready order, or reverse registration order), so the
// only thing that changes is where buckets are cut. Every rank calls it with the same caps at the
// same step (the choice is agreed in Python), so bucket sizes stay identical across ranks. A comm
// hook's per-bucket state (PowerSGD's P/Q/error memories) is dropped: bucket i may now hold other
// gradients. Gradients already in .grad survive (Note [Gradient as bucket view] moves them).
void Reducer::set_bucket_caps(int64_t cap_bytes, int64_t first_cap_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(cap_bytes > 0 && first_cap_bytes > 0, "set_bucket_caps: caps must be positive, got ",
              cap_bytes, " and ", first_cap_bytes);
  TORCH_CHECK(!expect_hooks_ && !require_finalize_,  // Idle in Note [Reducer states]
              "set_bucket_caps: the bucket layout can only change between iterations (a "
              "synchronised backward is prepared or running)");
  if (cap_bytes == options_.bucket_cap_bytes &&
      first_cap_bytes == options_.first_bucket_cap_bytes) {
    return;
  }
  options_.bucket_cap_bytes = cap_bytes;
  options_.first_bucket_cap_bytes = first_cap_bytes;
  initialize_buckets(
      compute_bucket_assignment(param_meta_, bucket_order_, first_cap_bytes, cap_bytes));
  if (comm_hook_counts_bytes_) {
    static_cast<CommHook*>(comm_hook_.get())->reset_bucket_state();
  }
}

void Reducer::register_comm_hook(std::shared_ptr<c10d::CommHookInterface> hook) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(hook, "register_comm_hook: hook must not be None");
  // torch's sentence first, so code matching on torch DDP's message keeps working.
  TORCH_CHECK(!comm_hook_,
              "register_comm_hook or register_builtin_comm_hook can only be called once. "
              "torchlane DDP: a communication hook is already registered on this model");
  TORCH_CHECK(iterations_ == 0 && !backward_started_,
              "register_comm_hook must be called before the first backward pass; this model "
              "already reduced gradients ",
              iterations_, " time(s)");
  comm_hook_counts_bytes_ = dynamic_cast<CommHook*>(hook.get()) != nullptr;
  if (comm_hook_counts_bytes_ && options_.check_finite) {  // Note [Rolling back a non-finite step]
    static_cast<CommHook*>(hook.get())->enable_step_rollback();
  }
  comm_hook_ = std::move(hook);
}

// Note [Layout verification]
// With verify_layout (TORCH_DISTRIBUTED_DEBUG=DETAIL), buckets are not launched from the hooks:
// at the end of backward every rank all-gathers which parameters it has a gradient for and a
// fingerprint of its bucket layout, and only if all agree are the buckets launched. A rank that
// is missing gradients, or reduces a different layout, makes every rank raise the same error
// naming what each rank is missing, instead of mismatched collectives or a hang. It costs the
// overlap of communication with backward, so it is a debugging mode.
void Reducer::verify_layout_across_ranks() {
  const auto n = static_cast<int64_t>(params_.size());
  uint64_t fingerprint = 1469598103934665603ull;  // FNV-1a over the bucket layout
  auto mix = [&](uint64_t v) { fingerprint = (fingerprint ^ v) * 1099511628211ull; };
  for (const auto& bucket : buckets_) {
    mix(bucket.params.size());
    for (size_t slot = 0; slot < bucket.params.size(); ++slot) {
      mix(static_cast<uint64_t>(bucket.params[slot]));
      mix(bucket.lengths[slot]);
    }
  }
  auto mine = at::empty({n + 2}, at::kLong);
  auto* data = mine.data_ptr<int64_t>();
  data[0] = n;
  data[1] = static_cast<int64_t>(fingerprint);
  for (int64_t i = 0; i < n; ++i) {
    data[i + 2] = ready_[i];
  }
  const auto device = params_.front().device();
  std::vector<at::Tensor> input{mine.to(device)};
  std::vector<std::vector<at::Tensor>> output(1);
  for (int64_t r = 0; r < world_size_; ++r) {
    output[0].push_back(at::empty_like(input[0]));
  }
  process_group_->allgather(output, input)->wait();
  std::ostringstream problems;
  for (int64_t r = 0; r < world_size_; ++r) {
    auto theirs = output[0][r].to(at::kCPU);
    const auto* t = theirs.data_ptr<int64_t>();
    if (t[0] != n) {  // checked before reading t[2..]: a peer's data must not index past its end
      problems << " rank " << r << " has " << t[0] << " parameters, this rank " << n << ";";
      continue;
    }
    if (t[1] != data[1]) {
      problems << " rank " << r << " reduces a different bucket layout;";
    }
    std::vector<std::string> missing;
    for (int64_t i = 0; i < n; ++i) {
      if (t[i + 2] == 0) {
        missing.push_back(param_names_[i]);
      }
    }
    if (!missing.empty()) {
      problems << " rank " << r << " got no gradient for: " << join_names(missing) << ";";
    }
  }
  const auto report = problems.str();
  if (!report.empty()) {
    abandon_iteration();
    TORCH_CHECK(false,
                "torchlane DDP layout check (verify_layout / TORCH_DISTRIBUTED_DEBUG=DETAIL) "
                "failed before reducing gradients:",
                report,
                " Parameters without a gradient need find_unused_parameters=True; all ranks must "
                "run the same model.");
  }
}

// Note [Join]: a rank that ran out of data shadows the collectives of one synchronised backward
// of the others: an all-reduce of zeros per bucket, in bucket order, through the comm hook if one
// is registered, then the usage flags where the others send them.
void Reducer::run_zero_allreduces() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    auto zeros = buckets_[b].sparse ? empty_sparse_grad(buckets_[b].params.front())
                                    : at::zeros_like(buckets_[b].buffer);
    if (comm_hook_) {
      auto grad_bucket = make_grad_bucket(b, zeros);
      futures.push_back(comm_hook_->runHook(grad_bucket));
    } else {
      std::vector<at::Tensor> tensors{zeros};
      futures.push_back(comm::launched(process_group_->allreduce(tensors)));
    }
  }
  if (sends_usage_flags()) {
    std::vector<at::Tensor> tensors{at::zeros({static_cast<int64_t>(params_.size())},
                                              params_.front().options().dtype(at::kInt))};
    futures.push_back(comm::launched(process_group_->allreduce(tensors)));
  }
  for (size_t i = 0; i < futures.size(); ++i) {
    wait_or_throw(*futures[i], i < buckets_.size() ? describe_bucket(i) + " (joined rank)"
                                                   : std::string("the unused-parameter flags"));
  }
}

std::vector<std::string> Reducer::unready_parameter_names_locked() const {
  std::vector<std::string> names;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!ready_[i]) {
      names.push_back(param_names_[i]);
    }
  }
  return names;
}

}  // namespace torchlane
