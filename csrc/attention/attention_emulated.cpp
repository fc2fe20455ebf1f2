// The CUDA flash kernels' source (csrc/kernels/flash_{fwd,bwd}_block.h) compiled for the CPU on
// the host tile backend and run block by block: torchlane::_attention_{fwd,bwd}_emulated.
// Test-only and slow (scalar loops); see Note [Tile primitives].
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "attention/flash_glue.h"
#include "kernels/flash_bwd_block.h"
#include "kernels/flash_fwd_block.h"
#include "kernels/static_switch.h"
#include "kernels/tile_host.h"

namespace torchlane::attention {
namespace {

using kernels::HostTile;

// Shared memory of one emulated block.
std::vector<uint64_t> shared_memory(int bytes) {
  return std::vector<uint64_t>((bytes + 7) / 8);
}

template <typename E, int D>
void run_fwd(const kernels::FlashFwdParams& p) {
  using Kt = kernels::FwdTraits<D, E>;
  const int m_blocks = (p.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM;
  at::parallel_for(0, int64_t(p.b) * p.h, 1, [&](int64_t begin, int64_t end) {
    auto smem = shared_memory(Kt::kFwdSmemBytes);
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int m = 0; m < m_blocks; ++m) {
        kernels::flash_fwd_block<HostTile<Kt::kNWarps>, Kt>(p, m, static_cast<int>(bh),
                                                            reinterpret_cast<char*>(smem.data()));
      }
    }
  });
}

// Blocks of different (batch, kv head) write disjoint dq rows, so they may run in parallel; the
// key blocks of one kv head share dq rows (atomics on the GPU) and run in order here.
template <typename E, int D>
void run_bwd(const kernels::FlashBwdParams& p) {
  using Kt = kernels::BwdTraits<D, E>;
  const int n_blocks = (p.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  at::parallel_for(0, int64_t(p.b) * p.h_kv, 1, [&](int64_t begin, int64_t end) {
    auto smem = shared_memory(Kt::kBwdSmemBytes);
    for (int64_t bhk = begin; bhk < end; ++bhk) {
      for (int n = 0; n < n_blocks; ++n) {
        kernels::flash_bwd_block<HostTile<Kt::kNWarps>, Kt>(p, n, static_cast<int>(bhk),
                                                            reinterpret_cast<char*>(smem.data()));
      }
    }
  });
}

template <typename F>
void dispatch(at::ScalarType t, int64_t d, F&& f) {
  TORCHLANE_HEADDIM_SWITCH(d, [&] {
    if (t == at::kBFloat16) {
      f(kernels::HostBf16{}, std::integral_constant<int, kHeadDim>{});
    } else {
      f(kernels::HostHalf{}, std::integral_constant<int, kHeadDim>{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_emulated(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, bool causal,
                                                double scale) {
  check_flash_inputs(q_in, k_in, v_in, scale, "torchlane._attention_fwd_emulated");
  const at::Tensor q = flash_layout(q_in), k = flash_layout(k_in), v = flash_layout(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const auto p = make_fwd_params(q, k, v, out, lse, causal, scale);
  dispatch(q.scalar_type(), q.size(3), [&](auto e, auto d) {
    run_fwd<decltype(e), decltype(d)::value>(p);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_emulated(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, bool causal,
    double scale) {
  check_flash_inputs(q_in, k_in, v_in, scale, "torchlane._attention_bwd_emulated");
  check_attention_backward_inputs(dout_in, c10::nullopt, q_in, k_in, v_in, out, lse, scale);
  const at::Tensor q = flash_layout(q_in), k = flash_layout(k_in), v = flash_layout(v_in),
                   dout = flash_layout(dout_in);
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const at::Tensor lse_c = lse.contiguous();
  const auto p =
      make_bwd_params(dout, q, k, v, out, lse_c, delta, dq_accum, dk, dv, causal, scale);
  dispatch(q.scalar_type(), q.size(3), [&](auto e, auto d) {
    run_bwd<decltype(e), decltype(d)::value>(p);
  });
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlane, CPU, m) {
  m.impl("_attention_fwd_emulated", &fwd_emulated);
  m.impl("_attention_bwd_emulated", &bwd_emulated);
}

}  // namespace torchlane::attention
