// The torchlane op library: every tensor op's schema, in one place. Each op's implementations
// are registered next to its kernels (TORCH_LIBRARY_IMPL per dispatch key); fake kernels and
// autograd in the op's Python module.
#include <torch/library.h>

TORCH_LIBRARY(torchlane, m) {
  // attention: see Note [Attention op contract] in attention/attention.h
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The CUDA attention kernel's source run on the CPU; see Note [Tile primitives].
  m.def(
      "_attention_fwd_emulated(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> "
      "(Tensor, Tensor)");
  m.def(
      "_attention_bwd_emulated(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)");

  // gradient compression (csrc/hooks/)
  m.def("cast_compress(Tensor src, ScalarType wire_dtype, int world_size) -> Tensor");
  m.def("cast_decompress(Tensor wire, ScalarType dtype) -> Tensor");
  m.def("topk_compress_(Tensor(a!) residual, Tensor grad, int k) -> (Tensor, Tensor)");
  m.def("topk_scatter_add_(Tensor(a!) out, Tensor values, Tensor indices, float scale) -> ()");
  m.def("orthogonalize_(Tensor(a!) matrix, float epsilon) -> ()");
}
