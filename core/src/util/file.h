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

/// Where `text` stops being UTF-8 text: the offset of the first NUL byte or of the first byte of an
/// ill-formed UTF-8 sequence (overlong, surrogate, above U+10FFFF, truncated); npos when it is
/// text.
std::size_t not_text_at(const std::string& text);

/// Throws a FileError naming `file`, the line and the byte when `text` is not UTF-8 text (what a
/// binary file given as text data, or a garbled recipe, gets).
void require_text(const std::string& text, const std::string& file);

/// Whether a failed file operation is the machine's fault (a full disk or quota, an I/O error, a
/// read-only file system, memory or file handles running out) rather than the path's.
bool is_machine_failure(const std::error_code& ec);

/// Throws SystemError (the machine's fault) or FileError (the path's) for a failed operation on
/// `path`: "<path>: <what>: <reason>".
[[noreturn]] void fail_on(const std::filesystem::path& path, const std::string& what,
                          const std::error_code& ec);

/// Creates `dir` (and its parents) if it does not exist, and removes what it created unless
/// keep() is called: a writer that fails part-way (a full disk) leaves no empty or half-written
/// folder behind.
class MadeFolder {
 public:
  explicit MadeFolder(const std::filesystem::path& dir);
  ~MadeFolder();
  MadeFolder(const MadeFolder&) = delete;
  MadeFolder& operator=(const MadeFolder&) = delete;
  void keep() { made_.clear(); }

 private:
  std::filesystem::path made_;  ///< the outermost folder this created; empty: none
};

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
