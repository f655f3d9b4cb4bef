// safetensors: https://huggingface.co/docs/safetensors (8-byte little-endian header length, a JSON
// header, then the raw little-endian tensor bytes).
#pragma once

#include <graft/io/tensors.h>

#include <cstdint>
#include <filesystem>

namespace graft::io {

/// The contents of one .safetensors file. Tensors keep their stored dtype (F32, F16, BF16, F64,
/// I64, I32, I16, I8, U8, BOOL) and live on the CPU.
struct SafetensorsFile {
  TensorMap tensors;
  Metadata metadata;
};

/// Reads one .safetensors file. Throws graft::FileError naming the file and the problem for a
/// truncated file, a malformed header, overlapping or out-of-range offsets, or an unknown dtype.
SafetensorsFile read_safetensors(const std::filesystem::path& path);

/// Writes tensors (contiguous CPU copies are made as needed) atomically: a temporary file is
/// written and renamed into place.
void write_safetensors(const std::filesystem::path& path, const TensorMap& tensors,
                       const Metadata& metadata = {});

/// Reads every tensor of a Hugging Face model folder: model.safetensors, or the shards listed by
/// model.safetensors.index.json. `path` may also name one .safetensors file or an index file.
TensorMap read_safetensors_model(const std::filesystem::path& path);

/// Writes tensors into `dir` as model.safetensors, or, when they exceed `max_shard_bytes`, as
/// model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json (as transformers
/// does). Returns the number of shards written.
int write_safetensors_model(const std::filesystem::path& dir, const TensorMap& tensors,
                            std::int64_t max_shard_bytes = std::int64_t{5} << 30,
                            const Metadata& metadata = {});

}  // namespace graft::io
