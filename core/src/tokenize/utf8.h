// UTF-8 helpers for the tokenizers.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace graft::tokenize {

/// Length in bytes of the UTF-8 sequence that starts with `lead` (1 for invalid lead bytes, so
/// that malformed input is consumed one byte at a time rather than rejected).
inline std::size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

/// Splits `s` into UTF-8 characters (a truncated final sequence becomes its own piece).
inline std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < s.size();) {
    std::size_t n = std::min(utf8_length(static_cast<unsigned char>(s[i])), s.size() - i);
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

/// Decodes one code point at s[i], advancing i; invalid bytes decode as U+FFFD.
char32_t utf8_next(const std::string& s, std::size_t& i);
/// Appends the UTF-8 encoding of `cp`.
void utf8_append(std::string& out, char32_t cp);

}  // namespace graft::tokenize
