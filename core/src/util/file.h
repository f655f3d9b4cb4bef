// File helpers shared by the readers and writers: a read-only memory map and atomic writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <ostream>
#include <string>

namespace graft::io {

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

/// Writes a file atomically: `write` fills a stream opened on a temporary file in the same folder,
/// which is flushed, synced and renamed over `path`. On any failure the temporary file is removed
/// and nothing is left at `path` that was not there before.
void write_atomically(const std::filesystem::path& path,
                      const std::function<void(std::ostream&)>& write);

/// Reads a whole text file; throws graft::FileError when it cannot be read.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace graft::io
