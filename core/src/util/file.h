// File helpers shared by the readers and writers: a read-only memory map and atomic writes.
#pragma once

#include <graft/io/file.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

namespace graft::io {

/// A search path: `first`, then the folders of the colon-separated environment variable `env`,
/// then `then`, each folder once (the first time it appears, compared as absolute paths).
std::vector<std::filesystem::path> search_path(const std::vector<std::filesystem::path>& first,
                                               const char* env,
                                               const std::vector<std::filesystem::path>& then);

/// A read-only memory-mapped file. An empty file maps to size() == 0 and data() == nullptr.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace graft::io
