// C++ checkpoints in python/torchlane/checkpoint.py's format; see Note [C++ checkpoints].
#include "api/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <regex>
#include <sstream>
#include <string_view>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <ATen/CPUGeneratorImpl.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#endif

#include "api/ddp.h"
#include "api/python_names.h"

namespace torchlane {
namespace {

namespace fs = std::filesystem;
using c10::IValue;
using GenericDict = c10::impl::GenericDict;
using GenericList = c10::impl::GenericList;

constexpr const char* kFormat = "torchlane.checkpoint/1";

// ---- SHA-256 (FIPS 180-4) -------------------------------------------------------------------
// Note [Checkpoint digest speed]: Python's hashlib (OpenSSL) hashes with the x86 SHA extensions
// at ~1.7 GB/s; the portable rounds below do ~280 MB/s, which made a C++ save of a 9 MB state
// twice as slow as Python's. CPUs with the SHA extensions (cpuid leaf 7, EBX bit 29) take
// compress_shani, the others the portable rounds; tests/test_cpp_api.py checks the digest
// against Python's on whichever this machine runs.

constexpr uint32_t kSha256K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) {
  return (x >> n) | (x << (32 - n));
}

void compress_portable(uint32_t* state, const uint8_t* data, size_t blocks) {
  for (; blocks > 0; --blocks, data += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t{data[4 * i]} << 24) | (uint32_t{data[4 * i + 1]} << 16) |
             (uint32_t{data[4 * i + 2]} << 8) | uint32_t{data[4 * i + 3]};
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 =
          h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kSha256K[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
  }
}

#if defined(__x86_64__)
// Each sha256rnds2 does two rounds on the state held as ABEF/CDGH and returns the new ABEF, whose
// predecessor is then the CDGH of the next two; sha256msg1/msg2 extend the message schedule four
// words at a time (W[i..i+3] from W[i-16..i-1]).
__attribute__((target("sha,sse4.1,ssse3"))) void compress_shani(uint32_t* state,
                                                                const uint8_t* data,
                                                                size_t blocks) {
  const __m128i byteswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i abcd = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state));
  __m128i efgh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4));
  __m128i cdab = _mm_shuffle_epi32(abcd, 0xB1);
  __m128i hgfe = _mm_shuffle_epi32(efgh, 0x1B);
  __m128i abef = _mm_alignr_epi8(cdab, hgfe, 8);
  __m128i cdgh = _mm_blend_epi16(hgfe, cdab, 0xF0);
  for (; blocks > 0; --blocks, data += 64) {
    const __m128i abef_in = abef, cdgh_in = cdgh;
    __m128i w[16];
    for (int i = 0; i < 16; ++i) {
      if (i < 4) {
        w[i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 16 * i)),
                                byteswap);
      } else {
        __m128i x = _mm_sha256msg1_epu32(w[i - 4], w[i - 3]);
        x = _mm_add_epi32(x, _mm_alignr_epi8(w[i - 1], w[i - 2], 4));
        w[i] = _mm_sha256msg2_epu32(x, w[i - 1]);
      }
      __m128i k =
          _mm_add_epi32(w[i], _mm_loadu_si128(reinterpret_cast<const __m128i*>(kSha256K + 4 * i)));
      cdgh = _mm_sha256rnds2_epu32(cdgh, abef, k);
      k = _mm_shuffle_epi32(k, 0x0E);
      abef = _mm_sha256rnds2_epu32(abef, cdgh, k);
    }
    abef = _mm_add_epi32(abef, abef_in);
    cdgh = _mm_add_epi32(cdgh, cdgh_in);
  }
  const __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
  const __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), _mm_blend_epi16(feba, dchg, 0xF0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), _mm_alignr_epi8(dchg, feba, 8));
}

bool cpu_has_sha() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 29))) {
    return false;
  }
  __get_cpuid(1, &a, &b, &c, &d);
  return (c & (1u << 19)) && (c & (1u << 9));  // SSE4.1, SSSE3
}
#endif

void compress(uint32_t* state, const uint8_t* data, size_t blocks) {
#if defined(__x86_64__)
  static const bool sha = cpu_has_sha() && std::getenv("TORCHLANE_PORTABLE_SHA256") == nullptr;
  if (sha) {
    compress_shani(state, data, blocks);
    return;
  }
#endif
  compress_portable(state, data, blocks);
}

class Sha256 {
 public:
  void update(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    total_ += n;
    if (fill_ > 0) {
      const size_t take = std::min(n, size_t{64} - fill_);
      std::memcpy(block_.data() + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ < 64) {
        return;
      }
      compress(h_.data(), block_.data(), 1);
      fill_ = 0;
    }
    compress(h_.data(), p, n / 64);  // whole blocks straight from the input
    p += n / 64 * 64;
    n %= 64;
    std::memcpy(block_.data(), p, n);
    fill_ = n;
  }
  void update(std::string_view s) {
    update(s.data(), s.size());
  }
  std::string hexdigest() {
    const uint64_t bits = total_ * 8;
    const uint8_t pad = 0x80;
    update(&pad, 1);
    const uint8_t zero = 0;
    while (fill_ != 56) {
      update(&zero, 1);
    }
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) {
      len[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    }
    update(len, 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t word : h_) {
      for (int shift = 28; shift >= 0; shift -= 4) {
        out += hex[(word >> shift) & 0xf];
      }
    }
    return out;
  }

 private:
  std::array<uint32_t, 8> h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<uint8_t, 64> block_{};
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

// ---- Python reprs (what checkpoint.py's _feed hashes) ---------------------------------------

// repr(float): the shortest digits that round-trip, fixed notation for decimal exponents in
// [-4, 16), else d.ddde+XX (CPython's float_repr_style "short").
std::string py_float_repr(double v) {
  if (std::isnan(v)) {
    return "nan";
  }
  if (std::isinf(v)) {
    return v < 0 ? "-inf" : "inf";
  }
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  TORCH_INTERNAL_ASSERT(res.ec == std::errc());
  const std::string s(buf, res.ptr);
  const auto e_pos = s.find('e');
  std::string mantissa = s.substr(0, e_pos);
  const int exp10 = std::stoi(s.substr(e_pos + 1));
  std::string sign;
  if (mantissa[0] == '-') {
    sign = "-";
    mantissa.erase(0, 1);
  }
  std::string digits;
  for (char c : mantissa) {
    if (c != '.') {
      digits += c;
    }
  }
  const int decpt = exp10 + 1;  // digits[0] sits before the point at position decpt
  const int n = static_cast<int>(digits.size());
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      return sign + "0." + std::string(-decpt, '0') + digits;
    }
    if (decpt >= n) {
      return sign + digits + std::string(decpt - n, '0') + ".0";
    }
    return sign + digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  std::string out = sign + digits.substr(0, 1);
  if (n > 1) {
    out += "." + digits.substr(1);
  }
  const int e = decpt - 1;
  char ebuf[16];
  std::snprintf(ebuf, sizeof(ebuf), "e%c%02d", e < 0 ? '-' : '+', std::abs(e));
  return out + ebuf;
}

// repr(str) of ASCII or UTF-8 text (non-ASCII characters are taken as printable, as they are in
// names and messages).
std::string py_str_repr(std::string_view s) {
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : s) {
    if (c == quote || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + quote;
}

std::string py_dtype(at::ScalarType t) {
  const auto name = api::python_dtype_name(t);
  TORCH_CHECK(name, "checkpoint: tensors of dtype ", t, " are not supported by the C++ API");
  return *name;
}

void feed(Sha256& h, const IValue& v, const std::string& where) {
  if (v.isTensor()) {
    const auto& t0 = v.toTensor();
    TORCH_CHECK(t0.layout() == at::kStrided && !t0.is_quantized(), "checkpoint: ", where, " is a ",
                t0.layout(), " tensor; only dense tensors are supported");
    const auto t = t0.detach().cpu().contiguous();
    std::string head = "T" + py_dtype(t.scalar_type()) + "(";
    for (int64_t i = 0; i < t.dim(); ++i) {
      head += (i ? ", " : "") + std::to_string(t.size(i));
    }
    head += t.dim() == 1 ? ",)" : ")";
    h.update(head);
    if (t.numel()) {
      h.update(t.data_ptr(), t.numel() * t.element_size());
    }
  } else if (v.isGenericDict()) {
    const auto d = v.toGenericDict();
    h.update("D" + std::to_string(d.size()));
    for (const auto& kv : d) {
      const auto key = kv.key().isString() ? py_str_repr(kv.key().toStringRef())
                       : kv.key().isInt()  ? std::to_string(kv.key().toInt())
                                           : std::string("?");
      feed(h, kv.key(), where + " key " + key);
      feed(h, kv.value(), where + "[" + key + "]");
    }
  } else if (v.isList()) {
    const auto items = v.toListRef();
    h.update("list" + std::to_string(items.size()));
    for (size_t i = 0; i < items.size(); ++i) {
      feed(h, items[i], where + "[" + std::to_string(i) + "]");
    }
  } else if (v.isTuple()) {
    const auto& items = v.toTupleRef().elements();
    h.update("tuple" + std::to_string(items.size()));
    for (size_t i = 0; i < items.size(); ++i) {
      feed(h, items[i], where + "[" + std::to_string(i) + "]");
    }
  } else if (v.isNone()) {
    h.update("NoneType:None;");
  } else if (v.isBool()) {
    h.update(v.toBool() ? "bool:True;" : "bool:False;");
  } else if (v.isInt()) {
    h.update("int:" + std::to_string(v.toInt()) + ";");
  } else if (v.isDouble()) {
    h.update("float:" + py_float_repr(v.toDouble()) + ";");
  } else if (v.isString()) {
    h.update("str:" + py_str_repr(v.toStringRef()) + ";");
  } else {
    TORCH_CHECK(false, "checkpoint: ", where, " has type ", v.tagKind(),
                ", which the C++ API cannot hold; use tensors, numbers, strings, lists, tuples "
                "and dicts of those");
  }
}

// ---- files ----------------------------------------------------------------------------------

std::string checkpoint_path(const std::string& directory, int64_t step) {
  char name[64];
  std::snprintf(name, sizeof(name), "ckpt-%010lld.pt", static_cast<long long>(step));
  return (fs::path(directory) / name).string();
}

// (step, path) of every checkpoint in `directory`, oldest first.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& directory) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(directory, ec)) {
    return found;
  }
  static const std::regex name_re("^ckpt-(\\d+)\\.pt$");
  for (const auto& entry : fs::directory_iterator(directory)) {
    const auto name = entry.path().filename().string();
    std::smatch m;
    if (std::regex_match(name, m, name_re)) {
      found.emplace_back(std::stoll(m[1].str()), entry.path().string());
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

std::string errno_text(int err) {
  return "errno " + std::to_string(err) + " (" + std::strerror(err) + ")";
}

// torch.save's zip archive of `value`, pickled without TorchScript's type tags (which
// torch.load(weights_only=True) refuses).
std::vector<char> serialize(const IValue& value) {
  std::vector<char> pickled;
  torch::jit::Pickler pickler(
      [&](const char* p, size_t n) { pickled.insert(pickled.end(), p, p + n); },
      /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
      /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(value);
  pickler.stop();
  std::vector<char> out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* p, size_t n) {
    const auto* c = static_cast<const char*>(p);
    out.insert(out.end(), c, c + n);
    return n;
  });
  torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(),
                                     writer);
  writer.writeEndOfFile();
  return out;
}

// Temporary file, fsync, rename, fsync of the directory: `target` is complete or absent.
void write_atomically(const std::string& directory, const std::string& target,
                      const std::vector<char>& data) {
  std::error_code ec;
  fs::create_directories(directory, ec);
  TORCH_CHECK(!ec, "checkpoint.save: cannot create directory ", directory, ": ", ec.message());
  for (const auto& entry : fs::directory_iterator(directory)) {  // leftovers of a dead writer
    const auto name = entry.path().filename().string();
    if (name.rfind(".ckpt-", 0) == 0 && name.size() > 4 && name.substr(name.size() - 4) == ".tmp") {
      fs::remove(entry.path(), ec);
    }
  }
  std::string tmp = (fs::path(directory) / ".ckpt-XXXXXX.tmp").string();
  const int fd = mkstemps(tmp.data(), 4);
  TORCH_CHECK(fd >= 0, "checkpoint.save: writing ", target, " failed with ", errno_text(errno),
              "; nothing was written and older checkpoints are intact");
  int err = 0;
  size_t done = 0;
  while (done < data.size() && err == 0) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno != EINTR) {
      err = errno;
    } else if (n > 0) {
      done += static_cast<size_t>(n);
    }
  }
  if (err == 0 && ::fsync(fd) != 0) {
    err = errno;
  }
  if (::close(fd) != 0 && err == 0) {
    err = errno;
  }
  if (err == 0 && std::rename(tmp.c_str(), target.c_str()) != 0) {
    err = errno;
  }
  if (err != 0) {
    ::unlink(tmp.c_str());
    TORCH_CHECK(false, "checkpoint.save: writing ", target, " failed with ", errno_text(err),
                "; nothing was written and older checkpoints are intact");
  }
  const int dir_fd = ::open(directory.c_str(), O_RDONLY);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

// ---- model and optimizer state --------------------------------------------------------------

// The module's state_dict in Python's order: each module's parameters, then its buffers, then
// its children's, depth first.
void collect_state(const torch::nn::Module& m, const std::string& prefix,
                   std::vector<std::pair<std::string, at::Tensor>>& out) {
  for (const auto& p : m.named_parameters(/*recurse=*/false)) {
    out.emplace_back(prefix + p.key(), p.value());
  }
  for (const auto& b : m.named_buffers(/*recurse=*/false)) {
    out.emplace_back(prefix + b.key(), b.value());
  }
  for (const auto& c : m.named_children()) {
    collect_state(*c.value(), prefix + c.key() + ".", out);
  }
}

std::vector<std::pair<std::string, at::Tensor>> module_state(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  collect_state(m, "", out);
  return out;
}

GenericDict str_dict() {
  return GenericDict(c10::StringType::get(), c10::AnyType::get());
}

GenericList any_list() {
  return GenericList(c10::AnyType::get());
}

enum class OptKind { kSGD, kAdam, kAdamW };

OptKind opt_kind(torch::optim::Optimizer* opt) {
  if (dynamic_cast<torch::optim::SGD*>(opt)) {
    return OptKind::kSGD;
  }
  if (dynamic_cast<torch::optim::AdamW*>(opt)) {
    return OptKind::kAdamW;
  }
  if (dynamic_cast<torch::optim::Adam*>(opt)) {
    return OptKind::kAdam;
  }
  TORCH_CHECK(false,
              "checkpoint: the optimizer is not torch::optim::SGD, Adam or AdamW, the C++ "
              "optimizers whose state has a torch.optim counterpart in the checkpoint format");
}

const char* opt_name(OptKind k) {
  return k == OptKind::kSGD ? "SGD" : k == OptKind::kAdam ? "Adam" : "AdamW";
}

// torch.optim's state_dict: {"state": {index: {...}}, "param_groups": [{..., "params": [...]}]}
// with the group keys torch.optim writes, so Python's load_state_dict restores every setting.
GenericDict optimizer_state(torch::optim::Optimizer* opt) {
  const auto kind = opt_kind(opt);
  GenericDict state(c10::IntType::get(), c10::AnyType::get());
  auto groups = any_list();
  int64_t index = 0;
  for (auto& group : opt->param_groups()) {
    auto g = str_dict();
    auto params = any_list();
    if (kind == OptKind::kSGD) {
      const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
      g.insert("lr", o.lr());
      g.insert("momentum", o.momentum());
      g.insert("dampening", o.dampening());
      g.insert("weight_decay", o.weight_decay());
      g.insert("nesterov", o.nesterov());
      g.insert("maximize", false);
      g.insert("foreach", IValue());
      g.insert("differentiable", false);
      g.insert("fused", IValue());
    } else {
      // AdamOptions and AdamWOptions have the same fields.
      auto fill = [&](const auto& o) {
        g.insert("lr", o.lr());
        g.insert("betas",
                 c10::ivalue::Tuple::create(std::get<0>(o.betas()), std::get<1>(o.betas())));
        g.insert("eps", o.eps());
        g.insert("weight_decay", o.weight_decay());
        g.insert("amsgrad", o.amsgrad());
      };
      if (kind == OptKind::kAdam) {
        fill(static_cast<const torch::optim::AdamOptions&>(group.options()));
      } else {
        fill(static_cast<const torch::optim::AdamWOptions&>(group.options()));
      }
      g.insert("maximize", false);
      g.insert("foreach", IValue());
      g.insert("capturable", false);
      g.insert("differentiable", false);
      g.insert("fused", IValue());
      g.insert("decoupled_weight_decay", kind == OptKind::kAdamW);
    }
    for (const auto& p : group.params()) {
      params.push_back(index);
      const auto it = opt->state().find(p.unsafeGetTensorImpl());
      if (it != opt->state().end()) {
        auto s = str_dict();
        if (kind == OptKind::kSGD) {
          const auto& ps = static_cast<const torch::optim::SGDParamState&>(*it->second);
          if (ps.momentum_buffer().defined()) {
            s.insert("momentum_buffer", ps.momentum_buffer().detach().cpu());
          }
        } else {
          auto fill = [&](const auto& ps) {
            s.insert("step", at::scalar_tensor(static_cast<double>(ps.step()), at::kFloat));
            s.insert("exp_avg", ps.exp_avg().detach().cpu());
            s.insert("exp_avg_sq", ps.exp_avg_sq().detach().cpu());
            if (ps.max_exp_avg_sq().defined()) {
              s.insert("max_exp_avg_sq", ps.max_exp_avg_sq().detach().cpu());
            }
          };
          if (kind == OptKind::kAdam) {
            fill(static_cast<const torch::optim::AdamParamState&>(*it->second));
          } else {
            fill(static_cast<const torch::optim::AdamWParamState&>(*it->second));
          }
        }
        if (s.size() > 0) {
          state.insert(index, s);
        }
      }
      ++index;
    }
    g.insert("params", params);
    groups.push_back(g);
  }
  auto out = str_dict();
  out.insert("state", state);
  out.insert("param_groups", groups);
  return out;
}

double number(const IValue& v, const std::string& what) {
  if (v.isDouble()) {
    return v.toDouble();
  }
  if (v.isInt()) {
    return static_cast<double>(v.toInt());
  }
  TORCH_CHECK(false, what, " is a ", v.tagKind(), ", not a number");
}

bool flag(const GenericDict& g, const char* key, bool fallback) {
  return g.contains(key) && g.at(key).isBool() ? g.at(key).toBool() : fallback;
}

// Checks everything load_optimizer_state will use; throws with the checkpoint's file name.
void validate_optimizer_state(torch::optim::Optimizer* opt, const IValue& saved,
                              const std::string& file) {
  const auto kind = opt_kind(opt);
  TORCH_CHECK(!saved.isNone(), "checkpoint ", file,
              " holds no optimizer state, but an optimizer was passed; nothing was loaded");
  TORCH_CHECK(saved.isGenericDict() && saved.toGenericDict().contains("param_groups") &&
                  saved.toGenericDict().contains("state"),
              "checkpoint ", file, ": its optimizer entry is not a torch.optim state_dict");
  const auto d = saved.toGenericDict();
  const auto groups = d.at("param_groups").toListRef();
  std::vector<int64_t> mine, theirs;
  for (const auto& g : opt->param_groups()) {
    mine.push_back(static_cast<int64_t>(g.params().size()));
  }
  for (const auto& g : groups) {
    theirs.push_back(static_cast<int64_t>(g.toGenericDict().at("params").toListRef().size()));
  }
  TORCH_CHECK(mine == theirs, "checkpoint ", file,
              ": its optimizer state has parameter groups of sizes ", api::list_str(theirs),
              ", the optimizer ", api::list_str(mine), "; nothing was loaded");
  const std::vector<std::string> keys =
      kind == OptKind::kSGD
          ? std::vector<std::string>{"lr", "momentum", "dampening", "weight_decay", "nesterov"}
          : std::vector<std::string>{"lr", "betas", "eps", "weight_decay", "amsgrad"};
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto g = groups[gi].toGenericDict();
    for (const auto& k : keys) {
      TORCH_CHECK(g.contains(k), "checkpoint ", file, ": parameter group ", gi,
                  " of its optimizer state has no '", k, "': it is not the state of torch.optim.",
                  opt_name(kind), "; nothing was loaded");
    }
    if (kind != OptKind::kSGD && g.contains("decoupled_weight_decay")) {
      const bool decoupled = flag(g, "decoupled_weight_decay", false);
      TORCH_CHECK(decoupled == (kind == OptKind::kAdamW), "checkpoint ", file,
                  ": its optimizer state is torch.optim.", decoupled ? "AdamW" : "Adam",
                  "'s, the optimizer is ", opt_name(kind), "; nothing was loaded");
    }
  }
  // Every state tensor has its parameter's shape.
  std::vector<at::Tensor> params;
  for (const auto& g : opt->param_groups()) {
    params.insert(params.end(), g.params().begin(), g.params().end());
  }
  for (const auto& kv : d.at("state").toGenericDict()) {
    const int64_t i = kv.key().toInt();
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(params.size()), "checkpoint ", file,
                ": its optimizer state names parameter ", i, " of ", params.size(),
                "; nothing was loaded");
    TORCH_CHECK(kv.value().isGenericDict(), "checkpoint ", file,
                ": the optimizer state of parameter ", i, " is not a dict; nothing was loaded");
    const auto entry = kv.value().toGenericDict();
    if (kind != OptKind::kSGD) {
      for (const char* key : {"step", "exp_avg", "exp_avg_sq"}) {
        TORCH_CHECK(entry.contains(key), "checkpoint ", file, ": the optimizer state of parameter ",
                    i, " has no '", key, "': it is not the state of torch.optim.", opt_name(kind),
                    "; nothing was loaded");
      }
    }
    for (const auto& s : entry) {
      const auto& key = s.key().toStringRef();
      if (key == "step" || !s.value().isTensor()) {
        continue;
      }
      TORCH_CHECK(s.value().toTensor().sizes() == params[i].sizes(), "checkpoint ", file,
                  ": optimizer state '", key, "' of parameter ", i, " has shape ",
                  s.value().toTensor().sizes(), ", the parameter ", params[i].sizes(),
                  "; nothing was loaded");
    }
  }
}

at::Tensor like(const IValue& v, const at::Tensor& param) {
  return v.toTensor().to(param.device(), param.scalar_type()).clone();
}

void load_optimizer_state(torch::optim::Optimizer* opt, const GenericDict& d) {
  const auto kind = opt_kind(opt);
  const auto groups = d.at("param_groups").toListRef();
  const auto saved_state = d.at("state").toGenericDict();
  opt->state().clear();
  int64_t index = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto g = groups[gi].toGenericDict();
    auto& group = opt->param_groups()[gi];
    const std::string where = "optimizer parameter group " + std::to_string(gi);
    if (kind == OptKind::kSGD) {
      auto& o = static_cast<torch::optim::SGDOptions&>(group.options());
      o.lr(number(g.at("lr"), where + " lr"))
          .momentum(number(g.at("momentum"), where + " momentum"))
          .dampening(number(g.at("dampening"), where + " dampening"))
          .weight_decay(number(g.at("weight_decay"), where + " weight_decay"))
          .nesterov(g.at("nesterov").toBool());
    } else {
      const auto betas = g.at("betas");
      const auto& b =
          betas.isTuple() ? betas.toTupleRef().elements().vec() : betas.toListRef().vec();
      TORCH_CHECK(b.size() == 2, where, " betas has ", b.size(), " entries, not 2");
      auto fill = [&](auto& o) {
        o.lr(number(g.at("lr"), where + " lr"))
            .betas(std::make_tuple(number(b[0], where + " betas[0]"),
                                   number(b[1], where + " betas[1]")))
            .eps(number(g.at("eps"), where + " eps"))
            .weight_decay(number(g.at("weight_decay"), where + " weight_decay"))
            .amsgrad(g.at("amsgrad").toBool());
      };
      if (kind == OptKind::kAdam) {
        fill(static_cast<torch::optim::AdamOptions&>(group.options()));
      } else {
        fill(static_cast<torch::optim::AdamWOptions&>(group.options()));
      }
    }
    for (const auto& p : group.params()) {
      if (saved_state.contains(index)) {
        const auto s = saved_state.at(index).toGenericDict();
        std::unique_ptr<torch::optim::OptimizerParamState> ps;
        if (kind == OptKind::kSGD) {
          auto st = std::make_unique<torch::optim::SGDParamState>();
          if (s.contains("momentum_buffer") && s.at("momentum_buffer").isTensor()) {
            st->momentum_buffer(like(s.at("momentum_buffer"), p));
          }
          ps = std::move(st);
        } else {
          auto fill = [&](auto st) {
            const auto step = s.at("step");
            st->step(step.isTensor() ? static_cast<int64_t>(step.toTensor().item<double>())
                                     : static_cast<int64_t>(number(step, "step")));
            st->exp_avg(like(s.at("exp_avg"), p));
            st->exp_avg_sq(like(s.at("exp_avg_sq"), p));
            if (s.contains("max_exp_avg_sq")) {
              st->max_exp_avg_sq(like(s.at("max_exp_avg_sq"), p));
            }
            ps = std::move(st);
          };
          if (kind == OptKind::kAdam) {
            fill(std::make_unique<torch::optim::AdamParamState>());
          } else {
            fill(std::make_unique<torch::optim::AdamWParamState>());
          }
        }
        opt->state()[p.unsafeGetTensorImpl()] = std::move(ps);
      }
      ++index;
    }
  }
}

// ---- RNG ------------------------------------------------------------------------------------

at::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// ---- collectives ----------------------------------------------------------------------------

struct Group {
  const c10::intrusive_ptr<c10d::ProcessGroup>& pg;
  int rank() const {
    return pg ? pg->getRank() : 0;
  }
  int world() const {
    return pg ? pg->getSize() : 1;
  }
  std::vector<at::Tensor> all_gather(const at::Tensor& local) const {
    if (world() == 1) {
      return {local};
    }
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < world(); ++r) {
      out[0].push_back(at::empty_like(local));
    }
    std::vector<at::Tensor> in{local.contiguous()};
    pg->allgather(out, in)->wait();
    return out[0];
  }
  int64_t broadcast(int64_t value) const {
    if (world() == 1) {
      return value;
    }
    std::vector<at::Tensor> t{at::full({1}, value, at::kLong)};
    pg->broadcast(t)->wait();
    return t[0].item<int64_t>();
  }
  std::string broadcast(const std::string& value) const {
    if (world() == 1) {
      return value;
    }
    const int64_t n = broadcast(static_cast<int64_t>(value.size()));
    auto bytes = at::zeros({std::max<int64_t>(n, 1)}, at::kByte);
    if (rank() == 0) {
      std::memcpy(bytes.data_ptr(), value.data(), value.size());
    }
    std::vector<at::Tensor> t{bytes};
    pg->broadcast(t)->wait();
    return std::string(static_cast<const char*>(t[0].data_ptr()), n);
  }
};

at::Tensor digest_bytes(const std::string& hex) {
  auto out = at::zeros({32}, at::kByte);
  auto* p = out.data_ptr<uint8_t>();
  for (size_t i = 0; i + 1 < hex.size() && i / 2 < 32; i += 2) {
    p[i / 2] = static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16));
  }
  return out;
}

std::string message_of(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  return c10_error ? c10_error->what_without_backtrace() : e.what();
}

void validate_model(const GenericDict& model, const std::string& file,
                    const std::vector<std::pair<std::string, at::Tensor>>& own, bool strict) {
  if (strict) {
    std::vector<std::string> missing, unexpected;
    for (const auto& [name, _] : own) {
      if (!model.contains(name)) {
        missing.push_back(py_str_repr(name));
      }
    }
    for (const auto& kv : model) {
      const auto& name = kv.key().toStringRef();
      if (std::none_of(own.begin(), own.end(), [&](const auto& o) { return o.first == name; })) {
        unexpected.push_back(py_str_repr(name));
      }
    }
    if (!missing.empty() || !unexpected.empty()) {
      TORCH_CHECK(false, "checkpoint ", file, " does not match the model: missing keys ",
                  api::list_str(missing), ", unexpected keys ", api::list_str(unexpected),
                  "; nothing was loaded");
    }
  }
  for (const auto& [name, tensor] : own) {
    TORCH_CHECK(!model.contains(name) || model.at(name).isTensor(), "checkpoint ", file, ": ",
                py_str_repr(name), " is a ", model.at(name).tagKind(),
                " in the checkpoint, not a tensor; nothing was loaded");
    if (model.contains(name)) {
      const auto& saved = model.at(name).toTensor();
      TORCH_CHECK(saved.sizes() == tensor.sizes(), "checkpoint ", file, ": ", py_str_repr(name),
                  " has shape ", saved.sizes(), " in the checkpoint and ", tensor.sizes(),
                  " in the model; nothing was loaded");
    }
  }
}

std::string torch_version() {
#ifdef TORCH_VERSION_MAJOR
  return "libtorch " + std::to_string(TORCH_VERSION_MAJOR) + "." +
         std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
#else
  return "libtorch";
#endif
}

}  // namespace

std::string checkpoint_digest(const IValue& value) {
  Sha256 h;
  feed(h, value, "value");
  return h.hexdigest();
}

GenericDict read_checkpoint(const std::string& file) {
  std::error_code ec;
  TORCH_CHECK(fs::is_regular_file(file, ec), "checkpoint file ", file, " does not exist");
  std::ifstream in(file, std::ios::binary);
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  IValue value;
  try {
    value = torch::jit::pickle_load(data);
  } catch (const std::exception& e) {
    auto text = message_of(e);
    text = text.substr(0, text.find('\n'));
    TORCH_CHECK(false, "checkpoint file ", file,
                " cannot be loaded (corrupt, truncated, not a weights-only checkpoint, or written "
                "with an OrderedDict, which torch's C++ unpickler cannot read): ",
                text);
  }
  TORCH_CHECK(value.isGenericDict() && value.toGenericDict().contains("format") &&
                  value.toGenericDict().at("format").isString() &&
                  value.toGenericDict().at("format").toStringRef() == kFormat,
              "checkpoint file ", file, " is not a torchlane checkpoint (", kFormat, ")");
  auto state = value.toGenericDict();
  auto content = state.copy();
  const IValue expected = content.contains("checksum") ? content.at("checksum") : IValue();
  (void)content.erase("checksum");
  const auto actual = checkpoint_digest(content);
  TORCH_CHECK(expected.isString() && expected.toStringRef() == actual, "checkpoint file ", file,
              " is corrupt: its content checksum is ", actual, ", the checksum stored in it is ",
              expected.isString() ? expected.toStringRef() : std::string("None"));
  return state;
}

std::string save_checkpoint(const std::string& directory, torch::nn::Module& module,
                            torch::optim::Optimizer* optimizer, int64_t step,
                            const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                            const CheckpointSaveOptions& options) {
  TORCH_CHECK(step >= 0, "checkpoint.save: step must be an int >= 0, got ", step);
  TORCH_CHECK(!directory.empty(), "checkpoint.save: directory must not be empty");
  if (optimizer != nullptr) {
    opt_kind(optimizer);  // an unsupported optimizer fails before any collective
  }
  const Group group{pg};
  const int rank = group.rank(), world = group.world();
  const auto own = module_state(module);
  if (options.verify_replicas && world > 1) {
    auto params = str_dict();
    for (const auto& p : module.named_parameters()) {
      params.insert(p.key(), p.value().detach());
    }
    const auto rows = group.all_gather(digest_bytes(checkpoint_digest(params)));
    std::vector<int> differ;
    for (int r = 0; r < world; ++r) {
      if (!rows[r].equal(rows[0])) {
        differ.push_back(r);
      }
    }
    TORCH_CHECK(differ.empty(),
                "checkpoint.save: the model parameters differ between ranks (ranks ",
                api::list_str(differ), " differ from rank 0); nothing was written");
  }
  const auto rngs = group.all_gather(cpu_rng_state());  // collective: before rank-0-only work
  const auto target = checkpoint_path(directory, step);

  std::exception_ptr error;
  if (rank == 0) {
    try {
      std::vector<std::pair<int64_t, std::string>> newer;
      for (const auto& found : list_checkpoints(directory)) {
        if (found.first > step) {
          newer.push_back(found);
        }
      }
      if (!newer.empty() && !options.discard_newer) {
        std::vector<int> steps;
        for (const auto& n : newer) {
          steps.push_back(static_cast<int>(n.first));
        }
        TORCH_CHECK(false, "checkpoint.save: ", directory, " holds checkpoints of higher steps ",
                    api::list_str(steps), " than step ", step,
                    "; `load` would resume from those. Pass discard_newer=true to replace them "
                    "by this one, or save elsewhere. Nothing was written");
      }
      auto model = str_dict();
      for (const auto& [name, t] : own) {
        model.insert(name, t.detach().cpu());
      }
      auto rng = any_list();
      for (const auto& r : rngs) {
        auto d = str_dict();
        d.insert("torch", r);
        rng.push_back(d);
      }
      auto state = str_dict();
      state.insert("format", kFormat);
      state.insert("step", step);
      state.insert("world_size", static_cast<int64_t>(world));
      state.insert("torch_version", torch_version());
      state.insert("model", model);
      state.insert("model_metadata", str_dict());  // C++ modules carry no state_dict versions
      state.insert("optimizer", optimizer ? IValue(optimizer_state(optimizer)) : IValue());
      state.insert("data_position", options.data_position);
      state.insert("extra", str_dict());
      state.insert("rng", rng);
      state.insert("checksum", checkpoint_digest(state));
      write_atomically(directory, target, serialize(state));
      for (const auto& n : newer) {  // discard_newer: only once the new file is durable
        fs::remove(n.second);
      }
      if (options.keep_last > 0) {
        auto all = list_checkpoints(directory);
        const auto extra = static_cast<int64_t>(all.size()) - options.keep_last;
        for (int64_t i = 0; i < extra; ++i) {
          if (all[i].second != target) {
            fs::remove(all[i].second);
          }
        }
      }
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (world > 1) {
    const int64_t failed = group.broadcast(static_cast<int64_t>(error ? 1 : 0));
    TORCH_CHECK(rank == 0 || failed == 0, "rank 0 failed to write checkpoint ", target,
                " (see rank 0's error)");
  }
  if (error) {
    std::rethrow_exception(error);
  }
  return target;
}

std::optional<CheckpointInfo> load_checkpoint(const std::string& path, torch::nn::Module& module,
                                              torch::optim::Optimizer* optimizer,
                                              const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                              const CheckpointLoadOptions& options) {
  if (optimizer != nullptr) {
    opt_kind(optimizer);
  }
  const Group group{pg};
  const int rank = group.rank(), world = group.world();
  std::error_code ec;
  const bool is_dir = !fs::is_regular_file(path, ec) &&
                      (fs::is_directory(path, ec) ||
                       !(path.size() >= 3 && path.compare(path.size() - 3, 3, ".pt") == 0));
  // Rank 0 chooses the file and every rank follows (Note [Checkpoint agreement] in Python).
  std::string chosen;
  if (is_dir) {
    const int64_t missing =
        group.broadcast(static_cast<int64_t>(fs::is_directory(path, ec) ? 0 : 1));
    TORCH_CHECK(!missing || options.missing_ok, "checkpoint.load: checkpoint directory ", path,
                " does not exist (on rank 0); pass missing_ok=true to allow a fresh start");
    if (missing) {
      return std::nullopt;
    }
    if (rank == 0) {
      const auto found = list_checkpoints(path);
      chosen = found.empty() ? "" : found.back().second;
    }
  } else {
    chosen = path;
  }
  chosen = group.broadcast(chosen);
  if (chosen.empty()) {
    return std::nullopt;
  }

  GenericDict state = str_dict();
  std::string local_error;
  try {
    state = read_checkpoint(chosen);
  } catch (const std::exception& e) {
    local_error = message_of(e);
  }
  // All ranks must read the same bytes, or all raise.
  auto digest = local_error.empty() ? digest_bytes(state.at("checksum").toStringRef())
                                    : at::zeros({32}, at::kByte);
  auto row = at::cat({digest, at::full({1}, local_error.empty() ? 0 : 1, at::kByte)});
  const auto rows = group.all_gather(row);
  std::vector<int> failed, differ;
  for (int r = 0; r < world; ++r) {
    if (rows[r][32].item<int>() != 0) {
      failed.push_back(r);
    } else if (!rows[r].equal(rows[0])) {
      differ.push_back(r);
    }
  }
  TORCH_CHECK(local_error.empty(), local_error);
  TORCH_CHECK(failed.empty(), "checkpoint.load: ranks ", api::list_str(failed), " could not read ",
              chosen, " (see their errors); nothing was loaded");
  TORCH_CHECK(differ.empty(), "checkpoint.load: ranks ", api::list_str(differ),
              " read different contents of ", chosen, " than rank 0; nothing was loaded");

  TORCH_CHECK(!(state.contains("kind") && state.at("kind").isString() &&
                state.at("kind").toStringRef() == "sharded"),
              "checkpoint ", chosen,
              " is sharded (written by a ShardedDataParallel model); the C++ API loads "
              "unsharded checkpoints: get the full state_dict with "
              "torchlane.checkpoint.consolidate(file) in Python");
  const auto own = module_state(module);
  TORCH_CHECK(state.contains("model") && state.at("model").isGenericDict(), "checkpoint ", chosen,
              " holds no model state_dict");
  const auto model = state.at("model").toGenericDict();
  validate_model(model, chosen, own, options.strict);
  // This rank's RNG state, when restored (only from a checkpoint of the same world size).
  const int64_t saved_world = state.at("world_size").toInt();
  std::optional<at::Tensor> rng_state;
  if (options.restore_rng && saved_world == world) {
    const auto rngs = state.at("rng");
    const bool has = rngs.isList() && rngs.toListRef().size() > size_t(rank) &&
                     rngs.toListRef()[rank].isGenericDict() &&
                     rngs.toListRef()[rank].toGenericDict().contains("torch");
    TORCH_CHECK(has, "checkpoint ", chosen, " holds no torch RNG state for rank ", rank,
                " (pass restore_rng=false to load it without); nothing was loaded");
    rng_state = rngs.toListRef()[rank].toGenericDict().at("torch").toTensor();
  }
  if (optimizer != nullptr) {
    validate_optimizer_state(
        optimizer, state.contains("optimizer") ? state.at("optimizer") : IValue(), chosen);
  }

  {
    torch::NoGradGuard no_grad;
    for (const auto& [name, tensor] : own) {
      if (model.contains(name)) {
        tensor.copy_(model.at(name).toTensor());
      }
    }
  }
  if (optimizer != nullptr) {
    load_optimizer_state(optimizer, state.at("optimizer").toGenericDict());
  }
  if (rng_state) {
    set_cpu_rng_state(*rng_state);
  } else if (options.restore_rng) {
    TORCH_WARN("checkpoint ", chosen, " was written by ", saved_world, " ranks and is loaded by ",
               world, ": RNG states are not restored");
  }
  CheckpointInfo info;
  info.path = chosen;
  info.step = state.at("step").toInt();
  info.data_position = state.contains("data_position") ? state.at("data_position") : IValue();
  return info;
}

std::string save_checkpoint(const std::string& directory, DistributedDataParallel& ddp,
                            torch::optim::Optimizer* optimizer, int64_t step,
                            const CheckpointSaveOptions& options) {
  return save_checkpoint(directory, *ddp.module(), optimizer, step, ddp.process_group(), options);
}

std::optional<CheckpointInfo> load_checkpoint(const std::string& path, DistributedDataParallel& ddp,
                                              torch::optim::Optimizer* optimizer,
                                              const CheckpointLoadOptions& options) {
  return load_checkpoint(path, *ddp.module(), optimizer, ddp.process_group(), options);
}

}  // namespace torchlane
