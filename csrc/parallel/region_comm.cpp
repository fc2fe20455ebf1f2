// See Note [Tensor-parallel regions] in region_comm.hpp.
#include "parallel/region_comm.hpp"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include "comm/kept_works.hpp"

namespace torchlane::parallel {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

void check_group(const ProcessGroupPtr& pg) {
  TORCH_CHECK_VALUE(pg, "process_group must be a torch.distributed.ProcessGroup, got None");
}

int64_t checked_dim(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK_VALUE(x.dim() > 0, "dim: a 0-dimensional tensor has no dimension to split");
  TORCH_CHECK_VALUE(dim >= -x.dim() && dim < x.dim(), "dim must be in [", -x.dim(), ", ", x.dim(),
                    ") for a tensor of shape ", x.sizes(), ", got ", dim);
  return dim < 0 ? dim + x.dim() : dim;
}

int64_t divisible_dim(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim) {
  dim = checked_dim(x, dim);
  TORCH_CHECK_VALUE(x.size(dim) % pg->getSize() == 0, "size ", x.size(dim), " of dim ", dim,
                    " (shape ", x.sizes(), ") must be divisible by the process group size ",
                    pg->getSize());
  return dim;
}

// Waits on the Work itself: Gloo's reduce_scatter_single Work has no future.
void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  comm::keep(work);
  work->wait();
}

// Saved in the autograd context; a ProcessGroup is a CustomClassHolder, kept as a capsule.
void save_group(AutogradContext* ctx, const ProcessGroupPtr& pg, int64_t dim = 0) {
  ctx->saved_data["pg"] = c10::IValue::make_capsule(pg);
  ctx->saved_data["dim"] = dim;
}

ProcessGroupPtr saved_group(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<c10d::ProcessGroup>(ctx->saved_data["pg"].toCapsule());
}

int64_t saved_dim(AutogradContext* ctx) {
  return ctx->saved_data["dim"].toInt();
}

}  // namespace

std::pair<at::Tensor, at::Tensor> stacked_chunks_output(const at::Tensor& x, int64_t n,
                                                        int64_t dim) {
  auto chunks = x.chunk(n, dim);
  auto in = at::cat(chunks, 0);  // (n * chunk.size(0), ...): chunk r is block r
  return {in, at::empty(chunks[0].sizes(), in.options())};
}

at::Tensor all_reduce(const at::Tensor& x, const ProcessGroupPtr& pg, bool max) {
  check_group(pg);
  RECORD_FUNCTION("torchlane::tp_all_reduce", std::vector<c10::IValue>({x}));
  std::vector<at::Tensor> buf{x.contiguous().clone()};
  if (pg->getSize() == 1) {
    return buf[0];
  }
  c10d::AllreduceOptions opts;
  opts.reduceOp = max ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  wait(pg->allreduce(buf, opts));
  return buf[0];
}

at::Tensor all_gather(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim) {
  check_group(pg);
  dim = checked_dim(x, dim);
  const int64_t n = pg->getSize();
  if (n == 1) {
    return x;
  }
  RECORD_FUNCTION("torchlane::tp_all_gather", std::vector<c10::IValue>({x}));
  auto in = x.contiguous();
  // The flat collectives take (n * size(0), ...) buffers: rank r's block is rows [r * size(0), ..).
  auto flat = in.sizes().vec();
  flat[0] *= n;
  auto out = at::empty(flat, in.options());
  wait(pg->all_gather_single(out, in));
  return at::cat(out.chunk(n, 0), dim);
}

at::Tensor reduce_scatter(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim) {
  check_group(pg);
  dim = divisible_dim(x, pg, dim);
  const int64_t n = pg->getSize();
  if (n == 1) {
    return x;
  }
  RECORD_FUNCTION("torchlane::tp_reduce_scatter", std::vector<c10::IValue>({x}));
  auto out = stacked_chunks_output(x, n, dim);
  wait(pg->reduce_scatter_single(out.second, out.first));
  return out.second;
}

at::Tensor own_chunk(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim) {
  check_group(pg);
  dim = divisible_dim(x, pg, dim);
  const int64_t n = pg->getSize();
  if (n == 1) {
    return x;
  }
  return x.chunk(n, dim)[pg->getRank()].contiguous();
}

namespace {

struct CopyToRegion : public torch::autograd::Function<CopyToRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const ProcessGroupPtr& pg) {
    save_group(ctx, pg);
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_reduce(grads[0], saved_group(ctx)), at::Tensor()};
  }
};

struct ReduceFromRegion : public torch::autograd::Function<ReduceFromRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const ProcessGroupPtr& pg) {
    return all_reduce(x, pg);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};

struct ScatterToRegion : public torch::autograd::Function<ScatterToRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const ProcessGroupPtr& pg,
                            int64_t dim) {
    save_group(ctx, pg, checked_dim(x, dim));
    return own_chunk(x, pg, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_gather(grads[0], saved_group(ctx), saved_dim(ctx)), at::Tensor(), at::Tensor()};
  }
};

struct GatherFromRegion : public torch::autograd::Function<GatherFromRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const ProcessGroupPtr& pg,
                            int64_t dim) {
    save_group(ctx, pg, checked_dim(x, dim));
    return all_gather(x, pg, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {own_chunk(grads[0], saved_group(ctx), saved_dim(ctx)), at::Tensor(), at::Tensor()};
  }
};

struct GatherFromSequenceRegion : public torch::autograd::Function<GatherFromSequenceRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const ProcessGroupPtr& pg,
                            int64_t dim) {
    save_group(ctx, pg, checked_dim(x, dim));
    return all_gather(x, pg, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {reduce_scatter(grads[0], saved_group(ctx), saved_dim(ctx)), at::Tensor(), at::Tensor()};
  }
};

struct ReduceScatterToSequence : public torch::autograd::Function<ReduceScatterToSequence> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const ProcessGroupPtr& pg,
                            int64_t dim) {
    save_group(ctx, pg, checked_dim(x, dim));
    return reduce_scatter(x, pg, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_gather(grads[0], saved_group(ctx), saved_dim(ctx)), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor copy_to_region(const at::Tensor& x, const ProcessGroupPtr& pg) {
  check_group(pg);
  return CopyToRegion::apply(x, pg);
}

at::Tensor reduce_from_region(const at::Tensor& x, const ProcessGroupPtr& pg) {
  check_group(pg);
  return ReduceFromRegion::apply(x, pg);
}

at::Tensor scatter_to_region(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim) {
  check_group(pg);
  divisible_dim(x, pg, dim);
  return ScatterToRegion::apply(x, pg, dim);
}

at::Tensor gather_from_region(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim) {
  check_group(pg);
  checked_dim(x, dim);
  return GatherFromRegion::apply(x, pg, dim);
}

at::Tensor gather_from_sequence_region(const at::Tensor& x, const ProcessGroupPtr& pg,
                                       int64_t dim) {
  check_group(pg);
  checked_dim(x, dim);
  return GatherFromSequenceRegion::apply(x, pg, dim);
}

at::Tensor reduce_scatter_to_sequence_region(const at::Tensor& x, const ProcessGroupPtr& pg,
                                             int64_t dim) {
  check_group(pg);
  divisible_dim(x, pg, dim);
  return ReduceScatterToSequence::apply(x, pg, dim);
}

}  // namespace torchlane::parallel
