// See Note [Overlapped column backward] in parallel_linear.hpp.
#include "parallel/parallel_linear.hpp"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include "comm/kept_works.hpp"

namespace torchlane::parallel {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

ProcessGroupPtr group_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<c10d::ProcessGroup>(ctx->saved_data["pg"].toCapsule());
}

struct ColumnParallelLinear : public torch::autograd::Function<ColumnParallelLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const ProcessGroupPtr& pg,
                            bool sequence_parallel, int64_t seq_dim) {
    ctx->saved_data["pg"] = c10::IValue::make_capsule(pg);
    ctx->saved_data["sp"] = sequence_parallel;
    ctx->saved_data["seq_dim"] = seq_dim;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({x, weight});
    const auto total = sequence_parallel ? all_gather(x, pg, seq_dim) : x;
    return at::linear(total, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    RECORD_FUNCTION("torchlane::column_parallel_linear_backward", std::vector<c10::IValue>());
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const auto pg = group_of(ctx);
    const bool sp = ctx->saved_data["sp"].toBool();
    const int64_t seq_dim = ctx->saved_data["seq_dim"].toInt();
    const int64_t n = pg->getSize();
    const auto grad_y = grads[0].contiguous();
    const auto total = sp ? all_gather(x, pg, seq_dim) : x;

    // Launch the input-gradient collective, then compute the weight gradient under it.
    at::Tensor grad_x;
    c10::intrusive_ptr<c10d::Work> in_flight;
    if (ctx->needs_input_grad(0)) {
      auto grad_total = at::matmul(grad_y, weight);
      if (n == 1) {
        grad_x = grad_total;
      } else if (sp) {
        const int64_t d = seq_dim < 0 ? seq_dim + grad_total.dim() : seq_dim;
        auto buffers = stacked_chunks_output(grad_total, n, d);
        grad_x = buffers.second;
        in_flight = pg->reduce_scatter_single(grad_x, buffers.first);
      } else {
        grad_x = grad_total.contiguous();
        std::vector<at::Tensor> buf{grad_x};
        in_flight = pg->allreduce(buf);
      }
    }
    at::Tensor grad_w, grad_b;
    const int64_t out_features = weight.size(0);
    const auto gy2 = grad_y.reshape({-1, out_features});
    if (ctx->needs_input_grad(1)) {
      grad_w = gy2.t().mm(total.reshape({-1, weight.size(1)}));
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_b = gy2.sum(0);
    }
    if (in_flight) {
      comm::keep(in_flight);  // Note [Releasing collectives' Work objects]
      in_flight->wait();
    }
    return {grad_x, grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor column_parallel_linear(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias, const ProcessGroupPtr& pg,
                                  bool sequence_parallel, int64_t seq_dim) {
  TORCH_CHECK_VALUE(pg, "process_group must be a torch.distributed.ProcessGroup, got None");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "input's last dim (shape ",
                    x.sizes(), ") must equal weight's in_features ", weight.size(1));
  if (sequence_parallel) {
    const int64_t d = seq_dim < 0 ? seq_dim + x.dim() : seq_dim;
    TORCH_CHECK_VALUE(d >= 0 && d < x.dim() - 1, "seq_dim ", seq_dim,
                      " is not a dimension other than the feature (last) dimension of an input "
                      "of shape ",
                      x.sizes());
  }
  // An undefined Tensor is not a valid autograd input; an absent bias is an empty optional.
  const auto b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  return ColumnParallelLinear::apply(x, weight, b, pg, sequence_parallel, seq_dim);
}

}  // namespace torchlane::parallel
