// GGUF, the llama.cpp model format (versions 2 and 3): a header, typed key/value metadata, tensor
// descriptions, then aligned tensor data. https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
#pragma once

#include <graft/io/tensors.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace graft::io {

/// GGUF metadata value types, numbered as in the file.
enum class GgufType : std::uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

/// One metadata value. Scalars are widened (integers to int64/uint64, floats to double); an array
/// keeps its element type and its elements.
struct GgufValue {
  GgufType type = GgufType::u8;
  GgufType element_type = GgufType::u8;  ///< for arrays
  std::int64_t i = 0;                    ///< any integer type or bool
  double f = 0;                          ///< f32 / f64
  std::string s;                         ///< string
  std::vector<GgufValue> array;          ///< array elements

  bool is_integer() const;
  bool is_float() const;
  /// Typed reads; a wrong type throws graft::Error naming `key`.
  std::int64_t as_int(const std::string& key) const;
  double as_double(const std::string& key) const;  ///< accepts integers too
  const std::string& as_string(const std::string& key) const;
  std::vector<std::string> as_strings(const std::string& key) const;
  std::vector<double> as_doubles(const std::string& key) const;
  std::vector<std::int64_t> as_ints(const std::string& key) const;
  /// A short human-readable rendering (arrays abbreviated), for `graft inspect`.
  std::string to_string() const;
};

/// ggml tensor types that graft reads. Others are reported by number as unsupported.
enum class GgmlType : std::uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, bf16 = 30 };

/// Name of a ggml type ("F32", "Q8_0", ...), or "type N" for unknown ones.
std::string ggml_type_name(std::uint32_t type);

/// One tensor's description. `shape` is in PyTorch (outermost first) order: GGUF stores the
/// dimensions innermost first, so [64, 512] in the file is a (512, 64) tensor here.
struct GgufTensorInfo {
  std::string name;
  std::vector<std::int64_t> shape;
  std::uint32_t type = 0;
  std::uint64_t offset = 0;  ///< from the start of the data section
  std::uint64_t bytes = 0;   ///< stored size
};

class MappedFile;

/// An opened GGUF file. The file is memory-mapped; tensors are copied out on request.
class GgufFile {
 public:
  /// Parses and validates the header, metadata and tensor table. Throws graft::FileError for a
  /// wrong magic or version, a truncated file, an absurd count, shape or offset, or an
  /// unsupported tensor type (reported when that tensor is loaded).
  explicit GgufFile(const std::filesystem::path& path);
  ~GgufFile();

  std::uint32_t version() const { return version_; }
  const std::filesystem::path& path() const { return path_; }
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  /// The metadata value under `key`, or nullptr.
  const GgufValue* find(const std::string& key) const;
  /// The metadata value under `key`; throws graft::FileError when it is missing.
  const GgufValue& at(const std::string& key) const;
  const GgufTensorInfo* find_tensor(const std::string& name) const;

  /// Loads one tensor: F32, F16 and BF16 keep their dtype; quantised types (Q8_0, Q4_0) are
  /// dequantised to F32.
  at::Tensor load(const GgufTensorInfo& info) const;
  at::Tensor load(const std::string& name) const;
  TensorMap load_all() const;

 private:
  std::filesystem::path path_;
  std::shared_ptr<MappedFile> file_;
  std::uint32_t version_ = 0;
  std::uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::vector<GgufTensorInfo> tensors_;
};

/// Writes a GGUF v3 file (F32, F16 and BF16 tensors; `shape` order as in GgufTensorInfo)
/// atomically. Used by tests to make fixtures and by exporters. The tensors named in `q8_0` are
/// written quantised to Q8_0 as llama.cpp's reference quantiser does (blocks of 32 along a row:
/// d = max|x| / 127 stored as f16, q = round(x / d)); their rows must be a multiple of 32 long.
void write_gguf(const std::filesystem::path& path,
                const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const TensorMap& tensors, std::uint32_t alignment = 32,
                const std::set<std::string>& q8_0 = {});

/// `t` (float, rows a multiple of 32 long) as llama.cpp's Q8_0 blocks: per 32 values, an f16
/// scale then 32 int8.
std::vector<std::uint8_t> quantize_q8_0(const at::Tensor& t);

/// Convenience constructors for metadata values.
GgufValue gguf_int(std::int64_t v, GgufType type = GgufType::u32);
GgufValue gguf_float(double v, GgufType type = GgufType::f32);
GgufValue gguf_string(std::string v);
GgufValue gguf_bool(bool v);
GgufValue gguf_strings(const std::vector<std::string>& v);
GgufValue gguf_floats(const std::vector<double>& v, GgufType type = GgufType::f32);
GgufValue gguf_ints(const std::vector<std::int64_t>& v, GgufType type = GgufType::i32);

}  // namespace graft::io
