// Reading JSON from files that people and other tools wrote, with errors for people.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace graft::io {

/// Parses `text`, which came from `where` (a file, or a place in one). Malformed JSON is a
/// graft::FileError naming `where`, the line and column, and what was wrong:
/// "config.json: not valid JSON at line 3, column 14: unexpected '}'; expected a value".
nlohmann::json parse_json(const std::string& text, const std::string& where);

/// Reads and parses the JSON file at `path` (a regular file of bounded size, read_text_file).
nlohmann::json read_json_file(const std::filesystem::path& path);

/// What a JSON library error says, without the library's codes: "[json.exception.type_error.302]
/// type must be string, but is number" becomes "type must be string, but is number".
std::string json_error_text(const nlohmann::json::exception& e);

}  // namespace graft::io
