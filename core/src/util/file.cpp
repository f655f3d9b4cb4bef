#include "util/file.h"

#include <fcntl.h>
#include <graft/error.h>
#include <graft/io/json.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

namespace graft::io {

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileError(path.string(), std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FileError(path.string(), "not a regular file");
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw SystemError(path.string(), std::string("cannot map: ") + std::strerror(err));
    }
    data_ = static_cast<const std::uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<std::uint8_t*>(data_), size_);
}

void write_atomically(const std::filesystem::path& path,
                      const std::function<void(std::ostream&)>& write) {
  std::random_device rd;
  auto tmp = path;
  tmp += ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(rd());
  try {
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) fail_on(path, "cannot create " + tmp.string(), {errno, std::generic_category()});
      write(out);
      out.flush();
      if (!out) throw SystemError(path.string(), "write failed (disk full?)");
    }
    int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
    std::filesystem::rename(tmp, path);
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw;
  }
}

bool is_machine_failure(const std::error_code& ec) {
  for (const auto e : {std::errc::no_space_on_device, std::errc::io_error,
                       std::errc::read_only_file_system, std::errc::not_enough_memory,
                       std::errc::too_many_files_open, std::errc::too_many_files_open_in_system})
    if (ec == e) return true;
  return ec.value() == EDQUOT && ec.category() == std::generic_category();
}

void fail_on(const std::filesystem::path& path, const std::string& what,
             const std::error_code& ec) {
  const auto why = what + ": " + ec.message();
  if (is_machine_failure(ec)) throw SystemError(path.string(), why);
  throw FileError(path.string(), why);
}

std::vector<std::filesystem::path> search_path(const std::vector<std::filesystem::path>& first,
                                               const char* env,
                                               const std::vector<std::filesystem::path>& then) {
  std::vector<std::filesystem::path> all = first, out;
  if (const char* value = std::getenv(env)) {
    std::stringstream ss(value);
    std::string item;
    while (std::getline(ss, item, ':'))
      if (!item.empty()) all.emplace_back(item);
  }
  all.insert(all.end(), then.begin(), then.end());
  std::vector<std::filesystem::path> seen;
  for (const auto& dir : all) {
    std::error_code ec;
    auto key = std::filesystem::weakly_canonical(dir.empty() ? "." : dir, ec);
    if (ec) key = dir;
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
    seen.push_back(key);
    out.push_back(dir);
  }
  return out;
}

MadeFolder::MadeFolder(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  // The outermost missing folder on the way to `dir` is what a failure must take away.
  fs::path outermost;
  for (auto p = fs::absolute(dir); !p.empty() && !fs::exists(p); p = p.parent_path()) {
    outermost = p;
    if (p == p.parent_path()) break;
  }
  fs::create_directories(dir);
  made_ = outermost;
}

MadeFolder::~MadeFolder() {
  if (made_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(made_, ec);
}

std::size_t not_text_at(const std::string& text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned c = s[i];
    if (c == 0) return i;
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned cp = 0;
    if (c >= 0xC2 && c <= 0xDF)
      len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF)
      len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4)
      len = 4, cp = c & 0x07;
    else
      return i;
    if (i + len > n) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return i;
    i += len;
  }
  return std::string::npos;
}

void require_text(const std::string& text, const std::string& file) {
  const auto at = not_text_at(text);
  if (at == std::string::npos) return;
  const auto line =
      1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(at), '\n');
  throw FileError(file + ":" + std::to_string(line),
                  text[at] == '\0' ? "holds binary data (a NUL byte at byte " + std::to_string(at) +
                                         "), not text"
                                   : "is not UTF-8 text (byte " + std::to_string(at) + ")");
}

std::string read_text_file(const std::filesystem::path& path, std::uintmax_t max_bytes) {
  // Only regular files, of a bounded size: a device (/dev/zero) or a fifo never ends.
  std::error_code ec;
  if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec))
    throw FileError(path.string(), "not a regular file");
  const auto size = std::filesystem::file_size(path, ec);
  if (!ec && size > max_bytes)
    throw FileError(path.string(), "is " + std::to_string(size) + " bytes; graft reads at most " +
                                       std::to_string(max_bytes) + " from a file of this kind");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path.string(), std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string json_error_text(const nlohmann::json::exception& e) {
  std::string what = e.what();
  // "[json.exception.parse_error.101] parse error at line 1, column 3: syntax error while
  // parsing value - invalid literal; last read: 'x'"
  if (what.rfind("[json.exception.", 0) == 0) {
    const auto close = what.find("] ");
    if (close != std::string::npos) what.erase(0, close + 2);
  }
  for (const char* prefix : {"parse error: ", "syntax error while parsing "}) {
    const auto at = what.find(prefix);
    if (at != std::string::npos) what.erase(at, std::string(prefix).size());
  }
  return what;
}

nlohmann::json parse_json(const std::string& text, const std::string& where) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // "parse error at line L, column C: value - invalid literal; ..." -> "not valid JSON at line
    // L, column C: value - invalid literal; ..."
    auto what = json_error_text(e);
    const std::string at = "parse error at ";
    if (what.rfind(at, 0) == 0) what.erase(0, at.size());
    // "line 1, column 3: value - invalid literal" -> "line 1, column 3 (in a value): invalid
    // literal"
    const auto colon = what.find(": "), dash = what.find(" - ");
    if (colon != std::string::npos && dash != std::string::npos && dash > colon) {
      const auto context = what.substr(colon + 2, dash - colon - 2);
      what = what.substr(0, colon) + " (in " +
             (context[0] == 'a' || context[0] == 'o' ? "an " : "a ") + context +
             "): " + what.substr(dash + 3);
    }
    throw FileError(where, "not valid JSON at " + what);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(where, "not valid JSON: " + json_error_text(e));
  }
}

nlohmann::json read_json_file(const std::filesystem::path& path) {
  return parse_json(read_text_file(path), path.string());
}

}  // namespace graft::io
