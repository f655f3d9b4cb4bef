#include <graft/error.h>
#include <graft/io/json.h>
#include <graft/io/safetensors.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "util/file.h"

namespace graft::io {
namespace {

using nlohmann::json;

// Largest header we accept; the format's own reference implementation caps it at 100 MB.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeName {
  const char* name;
  c10::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"F32", c10::kFloat}, {"F16", c10::kHalf},  {"BF16", c10::kBFloat16}, {"F64", c10::kDouble},
    {"I64", c10::kLong},  {"I32", c10::kInt},   {"I16", c10::kShort},     {"I8", c10::kChar},
    {"U8", c10::kByte},   {"BOOL", c10::kBool},
};

const char* dtype_name(c10::ScalarType t, const std::string& path, const std::string& tensor) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.name;
  throw FileError(path, "tensor '" + tensor + "': dtype " + std::string(c10::toString(t)) +
                            " cannot be stored in safetensors");
}

bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return true;
  *out = a * b;
  return false;
}

}  // namespace

SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  const std::string where = path.string();
  MappedFile file(path);
  if (file.size() < 8) throw FileError(where, "truncated: shorter than the 8-byte header length");
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, file.data(), 8);
  if (header_len > kMaxHeaderBytes)
    throw FileError(where, "header length " + std::to_string(header_len) +
                               " is absurd (not a safetensors file?)");
  if (header_len > file.size() - 8)
    throw FileError(where, "truncated: header of " + std::to_string(header_len) +
                               " bytes runs past the end of the file (" +
                               std::to_string(file.size()) + " bytes)");
  const json header = parse_json(
      std::string(reinterpret_cast<const char*>(file.data()) + 8, header_len), where + ": header");
  if (!header.is_object()) throw FileError(where, "header is not a JSON object");

  const std::uint8_t* data = file.data() + 8 + header_len;
  const std::uint64_t data_size = file.size() - 8 - header_len;
  SafetensorsFile out;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw FileError(where, "__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) throw FileError(where, "__metadata__." + k + " is not a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (name.empty() || std::any_of(name.begin(), name.end(), [](char c) {
          return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
        }))
      throw FileError(where, "a tensor name is empty or holds control characters");
    const std::string ctx = "tensor '" + name + "': ";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets"))
      throw FileError(where, ctx + "expected an object with dtype, shape and data_offsets");
    const auto& jd = entry["dtype"];
    if (!jd.is_string()) throw FileError(where, ctx + "dtype is not a string");
    const std::string dname = jd.get<std::string>();
    const DtypeName* dt = nullptr;
    for (const auto& d : kDtypes)
      if (dname == d.name) dt = &d;
    if (!dt) throw FileError(where, ctx + "unknown dtype \"" + dname + "\"");

    const auto& js = entry["shape"];
    if (!js.is_array()) throw FileError(where, ctx + "shape is not an array");
    std::vector<std::int64_t> shape;
    std::uint64_t numel = 1;
    for (const auto& d : js) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<std::int64_t>() >= 0))
        throw FileError(where, ctx + "shape entries must be non-negative integers");
      auto n = d.get<std::uint64_t>();
      if (n > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ||
          mul_overflows(numel, n, &numel))
        throw FileError(where, ctx + "absurd shape " + js.dump());
      shape.push_back(static_cast<std::int64_t>(n));
    }
    const auto& jo = entry["data_offsets"];
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() ||
        !jo[1].is_number_unsigned())
      throw FileError(where, ctx + "data_offsets must be two non-negative integers");
    auto begin = jo[0].get<std::uint64_t>(), end = jo[1].get<std::uint64_t>();
    if (begin > end || end > data_size)
      throw FileError(where, ctx + "data_offsets [" + std::to_string(begin) + ", " +
                                 std::to_string(end) + "] fall outside the " +
                                 std::to_string(data_size) + " data bytes (truncated file?)");
    std::uint64_t bytes = 0;
    if (mul_overflows(numel, c10::elementSize(dt->type), &bytes) || bytes != end - begin)
      throw FileError(where, ctx + "shape " + js.dump() + " of " + dname + " needs " +
                                 std::to_string(bytes) + " bytes but data_offsets span " +
                                 std::to_string(end - begin));
    spans.emplace_back(begin, end);
    auto t = torch::empty(shape, torch::TensorOptions().dtype(dt->type));
    if (bytes) std::memcpy(t.data_ptr(), data + begin, bytes);
    out.tensors.emplace(name, std::move(t));
  }
  std::sort(spans.begin(), spans.end());
  for (std::size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second && spans[i].first != spans[i].second)
      throw FileError(where, "tensor data regions overlap");
  return out;
}

void write_safetensors(const std::filesystem::path& path, const TensorMap& tensors,
                       const Metadata& metadata) {
  const std::string where = path.string();
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> blobs;
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    auto c = t.detach().to(torch::kCPU).contiguous();
    const char* dname = dtype_name(c.scalar_type(), where, name);
    const std::uint64_t bytes = c.numel() * c.element_size();
    header[name] = {
        {"dtype", dname}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    blobs.push_back(std::move(c));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  write_atomically(path, [&](std::ostream& out) {
    const std::uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(text.data(), static_cast<std::streamsize>(n));
    for (const auto& b : blobs)
      out.write(static_cast<const char*>(b.data_ptr()),
                static_cast<std::streamsize>(b.numel() * b.element_size()));
  });
}

TensorMap read_safetensors_model(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  fs::path index;
  if (fs::is_directory(path)) {
    if (fs::exists(path / "model.safetensors.index.json")) {
      index = path / "model.safetensors.index.json";
    } else if (fs::exists(path / "model.safetensors")) {
      return read_safetensors(path / "model.safetensors").tensors;
    } else {
      throw FileError(path.string(),
                      "no model.safetensors or model.safetensors.index.json in this folder");
    }
  } else if (path.extension() == ".json") {
    index = path;
  } else {
    return read_safetensors(path).tensors;
  }

  const json j = read_json_file(index);
  if (!j.contains("weight_map") || !j["weight_map"].is_object())
    throw FileError(index.string(), "expected a \"weight_map\" object");
  std::map<std::string, std::vector<std::string>> by_shard;
  for (const auto& [name, shard] : j["weight_map"].items()) {
    if (!shard.is_string())
      throw FileError(index.string(), "weight_map." + name + " is not a string");
    const auto file = shard.get<std::string>();
    if (fs::path(file).filename() != fs::path(file))
      throw FileError(index.string(), "weight_map." + name + ": shard \"" + file +
                                          "\" must be a file name in the same folder");
    by_shard[file].push_back(name);
  }
  TensorMap out;
  for (const auto& [file, names] : by_shard) {
    auto shard = read_safetensors(index.parent_path() / file);
    for (const auto& name : names) {
      auto it = shard.tensors.find(name);
      if (it == shard.tensors.end())
        throw FileError(index.string(), "weight_map says '" + name + "' is in " + file +
                                            ", but that shard does not hold it");
      out.emplace(name, std::move(it->second));
    }
  }
  return out;
}

int write_safetensors_model(const std::filesystem::path& dir, const TensorMap& tensors,
                            std::int64_t max_shard_bytes, const Metadata& metadata) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  std::vector<TensorMap> shards(1);
  std::int64_t current = 0, total = 0;
  for (const auto& [name, t] : tensors) {
    const std::int64_t bytes = t.numel() * t.element_size();
    if (current > 0 && current + bytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().emplace(name, t);
    current += bytes;
    total += bytes;
  }
  if (shards.size() == 1) {
    write_safetensors(dir / "model.safetensors", tensors, metadata);
    return 1;
  }
  json weight_map = json::object();
  const int n = static_cast<int>(shards.size());
  for (int i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", i + 1, n);
    write_safetensors(dir / name, shards[i], metadata);
    for (const auto& kv : shards[i]) weight_map[kv.first] = name;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_atomically(dir / "model.safetensors.index.json",
                   [&](std::ostream& out) { out << index.dump(2) << "\n"; });
  return n;
}

}  // namespace graft::io
