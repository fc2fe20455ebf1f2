#pragma once

// How Python prints what the C++ API reports, so its messages and checkpoint digests read as the
// Python side's (csrc/api/ddp.cpp, csrc/api/checkpoint.cpp).
#include <optional>
#include <sstream>
#include <string>

#include <c10/core/ScalarType.h>

namespace torchlane::api {

// str(dtype) in Python ("torch.float32"); nullopt for dtypes without a Python name here.
inline std::optional<std::string> python_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    default:
      return std::nullopt;
  }
}

// "[a, b, c]": a Python list of the items as they stream (numbers, or reprs already made).
template <typename It>
std::string list_str(It begin, It end) {
  std::ostringstream s;
  s << "[";
  for (auto it = begin; it != end; ++it) {
    s << (it == begin ? "" : ", ") << *it;
  }
  s << "]";
  return s.str();
}

template <typename C>
std::string list_str(const C& items) {
  return list_str(items.begin(), items.end());
}

}  // namespace torchlane::api
