// Writing files safely and reading small text files.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <ostream>
#include <string>

namespace graft::io {

/// Writes a file atomically: `write` fills a stream opened on a temporary file in the same folder,
/// which is flushed, synced and renamed over `path`. On any failure the temporary file is removed
/// and nothing is left at `path` that was not there before.
void write_atomically(const std::filesystem::path& path,
                      const std::function<void(std::ostream&)>& write);

/// Reads a whole text file; throws graft::FileError when it cannot be read, is not a regular file
/// (a device, a fifo) or is larger than `max_bytes`.
std::string read_text_file(const std::filesystem::path& path,
                           std::uintmax_t max_bytes = std::uintmax_t{1} << 30);

}  // namespace graft::io
