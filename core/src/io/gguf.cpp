#include <c10/util/Half.h>
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "util/file.h"

namespace graft::io {
namespace {

constexpr std::uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
constexpr std::uint64_t kDefaultAlignment = 32;

// Block size (elements) and bytes per block of every ggml type whose layout we know, so that the
// tensor table can be validated even for types we cannot dequantise.
struct TypeLayout {
  std::uint32_t type;
  const char* name;
  std::uint64_t block;
  std::uint64_t bytes;
};
constexpr TypeLayout kLayouts[] = {
    {0, "F32", 1, 4},       {1, "F16", 1, 2},       {2, "Q4_0", 32, 18},    {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},    {7, "Q5_1", 32, 24},    {8, "Q8_0", 32, 34},    {9, "Q8_1", 32, 36},
    {10, "Q2_K", 256, 84},  {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144}, {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292}, {24, "I8", 1, 1},       {25, "I16", 1, 2},
    {26, "I32", 1, 4},      {27, "I64", 1, 8},      {28, "F64", 1, 8},      {30, "BF16", 1, 2},
};

const TypeLayout* layout_of(std::uint32_t type) {
  for (const auto& l : kLayouts)
    if (l.type == type) return &l;
  return nullptr;
}

std::size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::u8:
    case GgufType::i8:
    case GgufType::boolean:
      return 1;
    case GgufType::u16:
    case GgufType::i16:
      return 2;
    case GgufType::u32:
    case GgufType::i32:
    case GgufType::f32:
      return 4;
    case GgufType::u64:
    case GgufType::i64:
    case GgufType::f64:
      return 8;
    case GgufType::string:
      return 8;  // at least the length
    case GgufType::array:
      return 12;  // at least element type and count
  }
  return 0;
}

// A bounds-checked cursor over the mapped file: every read names the file and what was being read
// when it runs out of bytes.
class Reader {
 public:
  Reader(const MappedFile& f, std::string where) : f_(f), where_(std::move(where)) {}

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, f_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    auto n = read<std::uint64_t>(what);
    need(n, what);
    std::string s(reinterpret_cast<const char*>(f_.data() + pos_), n);
    pos_ += n;
    return s;
  }
  // A metadata key or tensor name: printable UTF-8 (it ends up in messages and in lookups).
  std::string read_name(const char* what) {
    const auto at = pos_;
    auto s = read_string(what);
    const bool control = std::any_of(s.begin(), s.end(), [](char c) {
      return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
    });
    if (s.empty() || control || not_text_at(s) != std::string::npos)
      throw FileError(where_, std::string(what) + " at byte " + std::to_string(at) +
                                  (s.empty() ? " is empty" : " is not printable UTF-8 text"));
    return s;
  }
  void need(std::uint64_t n, const char* what) const {
    if (n > f_.size() - pos_)
      throw FileError(where_, std::string("truncated while reading ") + what + " at byte " +
                                  std::to_string(pos_));
  }
  std::uint64_t remaining() const { return f_.size() - pos_; }
  std::uint64_t pos() const { return pos_; }
  const std::string& where() const { return where_; }

 private:
  const MappedFile& f_;
  std::string where_;
  std::uint64_t pos_ = 0;
};

GgufValue read_value(Reader& r, GgufType type, const std::string& key, int depth) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufType::u8:
      v.i = r.read<std::uint8_t>("a u8 value");
      break;
    case GgufType::i8:
      v.i = r.read<std::int8_t>("an i8 value");
      break;
    case GgufType::u16:
      v.i = r.read<std::uint16_t>("a u16 value");
      break;
    case GgufType::i16:
      v.i = r.read<std::int16_t>("an i16 value");
      break;
    case GgufType::u32:
      v.i = r.read<std::uint32_t>("a u32 value");
      break;
    case GgufType::i32:
      v.i = r.read<std::int32_t>("an i32 value");
      break;
    case GgufType::u64:
      v.i = static_cast<std::int64_t>(r.read<std::uint64_t>("a u64 value"));
      break;
    case GgufType::i64:
      v.i = r.read<std::int64_t>("an i64 value");
      break;
    case GgufType::f32:
      v.f = r.read<float>("an f32 value");
      break;
    case GgufType::f64:
      v.f = r.read<double>("an f64 value");
      break;
    case GgufType::boolean: {
      auto b = r.read<std::uint8_t>("a bool value");
      if (b > 1)
        throw FileError(r.where(), "metadata '" + key + "': bool value " + std::to_string(b));
      v.i = b;
      break;
    }
    case GgufType::string:
      v.s = r.read_string("a string value");
      break;
    case GgufType::array: {
      if (depth > 4) throw FileError(r.where(), "metadata '" + key + "': arrays nested too deep");
      auto et = r.read<std::uint32_t>("an array type");
      if (et > static_cast<std::uint32_t>(GgufType::f64))
        throw FileError(r.where(),
                        "metadata '" + key + "': unknown array element type " + std::to_string(et));
      v.element_type = static_cast<GgufType>(et);
      auto n = r.read<std::uint64_t>("an array length");
      if (n > r.remaining() / scalar_size(v.element_type))
        throw FileError(r.where(), "metadata '" + key + "': array of " + std::to_string(n) +
                                       " elements cannot fit in the rest of the file");
      v.array.reserve(n);
      for (std::uint64_t k = 0; k < n; ++k)
        v.array.push_back(read_value(r, v.element_type, key, depth + 1));
      break;
    }
    default:
      throw FileError(r.where(), "metadata '" + key + "': unknown value type " +
                                     std::to_string(static_cast<std::uint32_t>(type)));
  }
  return v;
}

float half_to_float(std::uint16_t bits) {
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

}  // namespace

// --- GgufValue ---------------------------------------------------------------------------

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufType::u8:
    case GgufType::i8:
    case GgufType::u16:
    case GgufType::i16:
    case GgufType::u32:
    case GgufType::i32:
    case GgufType::u64:
    case GgufType::i64:
    case GgufType::boolean:
      return true;
    default:
      return false;
  }
}
bool GgufValue::is_float() const { return type == GgufType::f32 || type == GgufType::f64; }

std::int64_t GgufValue::as_int(const std::string& key) const {
  if (!is_integer()) throw Error("GGUF metadata '" + key + "': expected an integer");
  return i;
}
double GgufValue::as_double(const std::string& key) const {
  if (is_float()) return f;
  if (is_integer()) return static_cast<double>(i);
  throw Error("GGUF metadata '" + key + "': expected a number");
}
const std::string& GgufValue::as_string(const std::string& key) const {
  if (type != GgufType::string) throw Error("GGUF metadata '" + key + "': expected a string");
  return s;
}
std::vector<std::string> GgufValue::as_strings(const std::string& key) const {
  if (type != GgufType::array || element_type != GgufType::string)
    throw Error("GGUF metadata '" + key + "': expected an array of strings");
  std::vector<std::string> out;
  out.reserve(array.size());
  for (const auto& e : array) out.push_back(e.s);
  return out;
}
std::vector<double> GgufValue::as_doubles(const std::string& key) const {
  if (type != GgufType::array) throw Error("GGUF metadata '" + key + "': expected an array");
  std::vector<double> out;
  out.reserve(array.size());
  for (const auto& e : array) out.push_back(e.as_double(key));
  return out;
}
std::vector<std::int64_t> GgufValue::as_ints(const std::string& key) const {
  if (type != GgufType::array) throw Error("GGUF metadata '" + key + "': expected an array");
  std::vector<std::int64_t> out;
  out.reserve(array.size());
  for (const auto& e : array) out.push_back(e.as_int(key));
  return out;
}

std::string GgufValue::to_string() const {
  std::ostringstream os;
  if (type == GgufType::string) {
    os << '"' << (s.size() > 60 ? s.substr(0, 60) + "..." : s) << '"';
  } else if (type == GgufType::array) {
    os << "[";
    for (std::size_t k = 0; k < array.size() && k < 5; ++k)
      os << (k ? ", " : "") << array[k].to_string();
    if (array.size() > 5) os << ", ... (" << array.size() << " items)";
    os << "]";
  } else if (type == GgufType::boolean) {
    os << (i ? "true" : "false");
  } else if (is_float()) {
    os << f;
  } else {
    os << i;
  }
  return os.str();
}

std::string ggml_type_name(std::uint32_t type) {
  if (auto* l = layout_of(type)) return l->name;
  return "type " + std::to_string(type);
}

// --- GgufFile ----------------------------------------------------------------------------

GgufFile::GgufFile(const std::filesystem::path& path)
    : path_(path), file_(std::make_shared<MappedFile>(path)) {
  Reader r(*file_, path.string());
  const std::string& where = r.where();
  auto magic = r.read<std::uint32_t>("the magic number");
  if (std::memcmp(&magic, "GGUF", 4) != 0) throw FileError(where, "not a GGUF file (bad magic)");
  version_ = r.read<std::uint32_t>("the version");
  if (version_ != 2 && version_ != 3)
    throw FileError(where, "GGUF version " + std::to_string(version_) +
                               " is not supported (graft reads versions 2 and 3)");
  auto n_tensors = r.read<std::uint64_t>("the tensor count");
  auto n_kv = r.read<std::uint64_t>("the metadata count");
  // Each entry needs at least 12 bytes (metadata) or 24 bytes (tensor description).
  if (n_kv > r.remaining() / 12 || n_tensors > r.remaining() / 24)
    throw FileError(where, "absurd counts: " + std::to_string(n_tensors) + " tensors and " +
                               std::to_string(n_kv) + " metadata entries in a " +
                               std::to_string(file_->size()) + "-byte file");

  for (std::uint64_t k = 0; k < n_kv; ++k) {
    auto key = r.read_name("a metadata key");
    auto type = r.read<std::uint32_t>("a metadata type");
    if (type > static_cast<std::uint32_t>(GgufType::f64))
      throw FileError(where, "metadata '" + key + "': unknown value type " + std::to_string(type));
    metadata_.emplace_back(key, read_value(r, static_cast<GgufType>(type), key, 0));
  }

  std::uint64_t alignment = kDefaultAlignment;
  if (auto* a = find("general.alignment")) {
    auto v = a->as_int("general.alignment");
    if (v <= 0 || (v & (v - 1)) != 0 || v > (1 << 20))
      throw FileError(where, "general.alignment " + std::to_string(v) + " is not a power of two");
    alignment = static_cast<std::uint64_t>(v);
  }

  for (std::uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo info;
    info.name = r.read_name("a tensor name");
    const std::string ctx = "tensor '" + info.name + "': ";
    auto n_dims = r.read<std::uint32_t>("a tensor rank");
    if (n_dims == 0 || n_dims > kMaxDims)
      throw FileError(where, ctx + "rank " + std::to_string(n_dims) + " (expected 1 to 4)");
    std::uint64_t numel = 1;
    std::vector<std::int64_t> dims(n_dims);
    for (std::uint32_t d = 0; d < n_dims; ++d) {
      auto n = r.read<std::uint64_t>("a tensor dimension");
      if (n > (std::uint64_t{1} << 40) || (n != 0 && numel > (std::uint64_t{1} << 62) / n))
        throw FileError(where, ctx + "absurd dimension " + std::to_string(n));
      numel *= n;
      dims[d] = static_cast<std::int64_t>(n);
    }
    info.shape.assign(dims.rbegin(), dims.rend());
    info.type = r.read<std::uint32_t>("a tensor type");
    info.offset = r.read<std::uint64_t>("a tensor offset");
    const TypeLayout* l = layout_of(info.type);
    if (!l) throw FileError(where, ctx + "unknown ggml type " + std::to_string(info.type));
    if (dims[0] % static_cast<std::int64_t>(l->block) != 0)
      throw FileError(where, ctx + "innermost dimension " + std::to_string(dims[0]) +
                                 " is not a multiple of the " + l->name + " block size " +
                                 std::to_string(l->block));
    info.bytes = numel / l->block * l->bytes;
    if (info.offset % alignment != 0)
      throw FileError(where, ctx + "offset " + std::to_string(info.offset) + " is not aligned to " +
                                 std::to_string(alignment));
    tensors_.push_back(std::move(info));
  }
  data_offset_ = (r.pos() + alignment - 1) / alignment * alignment;
  const std::uint64_t data_size = file_->size() > data_offset_ ? file_->size() - data_offset_ : 0;
  for (const auto& t : tensors_) {
    if (t.offset > data_size || t.bytes > data_size - t.offset)
      throw FileError(where, "tensor '" + t.name + "': its " + std::to_string(t.bytes) +
                                 " bytes at offset " + std::to_string(t.offset) +
                                 " run past the end of the file (truncated?)");
  }
}

GgufFile::~GgufFile() = default;

const GgufValue* GgufFile::find(const std::string& key) const {
  for (const auto& [k, v] : metadata_)
    if (k == key) return &v;
  return nullptr;
}

const GgufValue& GgufFile::at(const std::string& key) const {
  if (auto* v = find(key)) return *v;
  throw FileError(path_.string(), "missing metadata key '" + key + "'");
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

at::Tensor GgufFile::load(const std::string& name) const {
  auto* info = find_tensor(name);
  if (!info) throw FileError(path_.string(), "no tensor named '" + name + "'");
  return load(*info);
}

at::Tensor GgufFile::load(const GgufTensorInfo& info) const {
  const std::uint8_t* src = file_->data() + data_offset_ + info.offset;
  auto copy_as = [&](c10::ScalarType dt) {
    auto t = torch::empty(info.shape, torch::TensorOptions().dtype(dt));
    if (info.bytes) std::memcpy(t.data_ptr(), src, info.bytes);
    return t;
  };
  switch (info.type) {
    case 0:
      return copy_as(torch::kFloat);
    case 1:
      return copy_as(torch::kHalf);
    case 30:
      return copy_as(torch::kBFloat16);
    case 24:
      return copy_as(torch::kChar);
    case 25:
      return copy_as(torch::kShort);
    case 26:
      return copy_as(torch::kInt);
    case 27:
      return copy_as(torch::kLong);
    case 28:
      return copy_as(torch::kDouble);
    case 8:    // Q8_0: blocks of 32 int8 with one f16 scale
    case 2: {  // Q4_0: blocks of 32 4-bit values (low nibbles first) with one f16 scale, offset 8
      auto t = torch::empty(info.shape, torch::TensorOptions().dtype(torch::kFloat));
      float* dst = t.data_ptr<float>();
      const std::uint64_t blocks = static_cast<std::uint64_t>(t.numel()) / 32;
      const std::uint64_t stride = info.type == 8 ? 34 : 18;
      for (std::uint64_t b = 0; b < blocks; ++b) {
        const std::uint8_t* blk = src + b * stride;
        std::uint16_t dbits;
        std::memcpy(&dbits, blk, 2);
        const float d = half_to_float(dbits);
        float* out = dst + b * 32;
        if (info.type == 8) {
          const auto* q = reinterpret_cast<const std::int8_t*>(blk + 2);
          for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]);
        } else {
          const std::uint8_t* q = blk + 2;
          for (int j = 0; j < 16; ++j) {
            out[j] = d * static_cast<float>((q[j] & 0x0F) - 8);
            out[j + 16] = d * static_cast<float>((q[j] >> 4) - 8);
          }
        }
      }
      return t;
    }
    default:
      throw FileError(path_.string(), "tensor '" + info.name + "': " + ggml_type_name(info.type) +
                                          " tensors are not supported (graft reads F32, F16, "
                                          "BF16, Q8_0 and Q4_0)");
  }
}

TensorMap GgufFile::load_all() const {
  TensorMap out;
  for (const auto& t : tensors_) out.emplace(t.name, load(t));
  return out;
}

// --- writing -----------------------------------------------------------------------------

namespace {

void put_value(std::ostream& out, const GgufValue& v, bool with_type);

template <typename T>
void put(std::ostream& out, T v) {
  out.write(reinterpret_cast<const char*>(&v), sizeof v);
}
void put_string(std::ostream& out, const std::string& s) {
  put<std::uint64_t>(out, s.size());
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

void put_value(std::ostream& out, const GgufValue& v, bool with_type) {
  if (with_type) put<std::uint32_t>(out, static_cast<std::uint32_t>(v.type));
  switch (v.type) {
    case GgufType::u8:
    case GgufType::boolean:
      put<std::uint8_t>(out, static_cast<std::uint8_t>(v.i));
      break;
    case GgufType::i8:
      put<std::int8_t>(out, static_cast<std::int8_t>(v.i));
      break;
    case GgufType::u16:
      put<std::uint16_t>(out, static_cast<std::uint16_t>(v.i));
      break;
    case GgufType::i16:
      put<std::int16_t>(out, static_cast<std::int16_t>(v.i));
      break;
    case GgufType::u32:
      put<std::uint32_t>(out, static_cast<std::uint32_t>(v.i));
      break;
    case GgufType::i32:
      put<std::int32_t>(out, static_cast<std::int32_t>(v.i));
      break;
    case GgufType::u64:
      put<std::uint64_t>(out, static_cast<std::uint64_t>(v.i));
      break;
    case GgufType::i64:
      put<std::int64_t>(out, v.i);
      break;
    case GgufType::f32:
      put<float>(out, static_cast<float>(v.f));
      break;
    case GgufType::f64:
      put<double>(out, v.f);
      break;
    case GgufType::string:
      put_string(out, v.s);
      break;
    case GgufType::array:
      put<std::uint32_t>(out, static_cast<std::uint32_t>(v.element_type));
      put<std::uint64_t>(out, v.array.size());
      for (const auto& e : v.array) put_value(out, e, false);
      break;
  }
}

}  // namespace

std::vector<std::uint8_t> quantize_q8_0(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) % 32 == 0,
              "Q8_0 needs rows a multiple of 32 long, got shape ", t.sizes());
  const auto x = t.detach().to(torch::kCPU, torch::kFloat).contiguous();
  const float* src = x.data_ptr<float>();
  const auto blocks = static_cast<std::size_t>(x.numel() / 32);
  std::vector<std::uint8_t> out(blocks * 34);
  for (std::size_t b = 0; b < blocks; ++b) {
    const float* v = src + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    std::uint8_t* blk = out.data() + b * 34;
    const std::uint16_t dbits = c10::Half(d).x;
    std::memcpy(blk, &dbits, 2);
    for (int j = 0; j < 32; ++j)
      blk[2 + j] = static_cast<std::uint8_t>(static_cast<std::int8_t>(std::round(v[j] * id)));
  }
  return out;
}

void write_gguf(const std::filesystem::path& path,
                const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const TensorMap& tensors, std::uint32_t alignment,
                const std::set<std::string>& q8_0) {
  struct Blob {
    std::string name;
    at::Tensor tensor;
    GgmlType type;
    std::vector<std::uint8_t> quantised;  // Q8_0 blocks
    std::uint64_t bytes() const {
      return type == GgmlType::q8_0 ? quantised.size() : tensor.numel() * tensor.element_size();
    }
  };
  std::vector<Blob> blobs;
  for (const auto& name : q8_0)
    if (!tensors.count(name))
      throw FileError(path.string(), "no tensor '" + name + "' to write as Q8_0");
  for (const auto& [name, t] : tensors) {
    auto c = t.detach().to(torch::kCPU).contiguous();
    if (c.scalar_type() != torch::kFloat && c.scalar_type() != torch::kHalf &&
        c.scalar_type() != torch::kBFloat16)
      throw FileError(path.string(),
                      "tensor '" + name + "': only F32, F16 and BF16 can be written");
    if (q8_0.count(name)) {
      if (c.dim() < 1 || c.size(-1) % 32)
        throw FileError(path.string(), "tensor '" + name +
                                           "': Q8_0 needs rows a multiple of 32 long, not " +
                                           std::to_string(c.dim() ? c.size(-1) : 0));
      blobs.push_back({name, c, GgmlType::q8_0, quantize_q8_0(c)});
      continue;
    }
    const auto type = c.scalar_type() == torch::kFloat  ? GgmlType::f32
                      : c.scalar_type() == torch::kHalf ? GgmlType::f16
                                                        : GgmlType::bf16;
    blobs.push_back({name, std::move(c), type, {}});
  }
  auto pad = [&](std::ostream& out, std::uint64_t pos) {
    for (std::uint64_t k = pos; k % alignment; ++k) out.put('\0');
  };
  write_atomically(path, [&](std::ostream& out) {
    out.write("GGUF", 4);
    put<std::uint32_t>(out, 3);
    put<std::uint64_t>(out, blobs.size());
    bool has_alignment = false;
    for (const auto& kv : metadata) has_alignment |= kv.first == "general.alignment";
    put<std::uint64_t>(out, metadata.size() + (alignment != kDefaultAlignment && !has_alignment));
    for (const auto& [k, v] : metadata) {
      put_string(out, k);
      put_value(out, v, true);
    }
    if (alignment != kDefaultAlignment && !has_alignment) {
      put_string(out, "general.alignment");
      put_value(out, gguf_int(alignment), true);
    }
    std::uint64_t offset = 0;
    for (const auto& b : blobs) {
      const auto& t = b.tensor;
      put_string(out, b.name);
      put<std::uint32_t>(out, static_cast<std::uint32_t>(t.dim()));
      for (int64_t d = t.dim() - 1; d >= 0; --d) put<std::uint64_t>(out, t.size(d));
      put<std::uint32_t>(out, static_cast<std::uint32_t>(b.type));
      put<std::uint64_t>(out, offset);
      offset += (b.bytes() + alignment - 1) / alignment * alignment;
    }
    pad(out, static_cast<std::uint64_t>(out.tellp()));
    for (const auto& b : blobs) {
      const void* data = b.type == GgmlType::q8_0 ? static_cast<const void*>(b.quantised.data())
                                                  : b.tensor.data_ptr();
      out.write(static_cast<const char*>(data), static_cast<std::streamsize>(b.bytes()));
      pad(out, b.bytes());
    }
  });
}

GgufValue gguf_int(std::int64_t v, GgufType type) {
  GgufValue g;
  g.type = type;
  g.i = v;
  return g;
}
GgufValue gguf_float(double v, GgufType type) {
  GgufValue g;
  g.type = type;
  g.f = v;
  return g;
}
GgufValue gguf_string(std::string v) {
  GgufValue g;
  g.type = GgufType::string;
  g.s = std::move(v);
  return g;
}
GgufValue gguf_bool(bool v) {
  GgufValue g;
  g.type = GgufType::boolean;
  g.i = v ? 1 : 0;
  return g;
}
GgufValue gguf_strings(const std::vector<std::string>& v) {
  GgufValue g;
  g.type = GgufType::array;
  g.element_type = GgufType::string;
  for (const auto& s : v) g.array.push_back(gguf_string(s));
  return g;
}
GgufValue gguf_floats(const std::vector<double>& v, GgufType type) {
  GgufValue g;
  g.type = GgufType::array;
  g.element_type = type;
  for (double x : v) g.array.push_back(gguf_float(x, type));
  return g;
}
GgufValue gguf_ints(const std::vector<std::int64_t>& v, GgufType type) {
  GgufValue g;
  g.type = GgufType::array;
  g.element_type = type;
  for (auto x : v) g.array.push_back(gguf_int(x, type));
  return g;
}

}  // namespace graft::io
