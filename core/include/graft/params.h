// Settings for plugins without YAML: a tree of values that remembers where each came from, so
// that every bad value is reported as "recipe.yaml:12:7: methods[0].r: expected a positive
// integer, got "eight"".
#pragma once

#include <graft/error.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace graft {

/// Where a value came from: a file and a 1-based line and column (0 when unknown, e.g. a value
/// given on the command line or a default).
struct Source {
  std::string file;
  int line = 0;
  int column = 0;
  std::string to_string() const;  ///< "file:line:column", "file" or ""
};

/// A bad value: the message reads "<file>:<line>:<col>: <key path>: <what>".
class ParamError : public Error {
 public:
  using Error::Error;
};

/// A node of the settings tree: a scalar (kept as text, parsed on request), a list or a map
/// (keys in the order given). Every node knows its key path ("methods[0].r") and source.
class Params {
 public:
  enum class Kind { null, scalar, list, map };

  Params() = default;
  /// An empty value (YAML's `key:` with nothing after it) that still knows its place.
  static Params null(std::string path, Source source);
  static Params scalar(std::string text, std::string path = "", Source source = {},
                       bool quoted = false);
  static Params list(std::string path = "", Source source = {});
  static Params map(std::string path = "", Source source = {});

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::null; }
  const std::string& path() const { return path_; }
  const Source& source() const { return source_; }
  /// The scalar's text as written.
  const std::string& text() const { return text_; }

  // Building.
  Params& add(Params item);                       ///< appends to a list
  Params& set(const std::string& key, Params v);  ///< sets a map entry (replacing)
  /// A copy whose key path is `path`, and its entries' and items' paths below it (for a tree
  /// read from one file and placed at another path of a recipe); sources stay.
  Params rebased(const std::string& path) const;

  // Maps.
  bool has(const std::string& key) const;
  const Params& at(const std::string& key) const;  ///< throws ParamError naming the missing key
  const std::vector<std::pair<std::string, Params>>& entries() const { return entries_; }
  // Lists.
  const std::vector<Params>& items() const { return items_; }

  // Typed reads of this node; a wrong type throws ParamError with the source and path.
  std::int64_t as_int() const;
  std::int64_t as_positive_int() const;
  std::int64_t as_non_negative_int() const;
  double as_double() const;
  double as_probability() const;  ///< in [0, 1)
  bool as_bool() const;
  std::string as_string() const;
  /// One string or a list of strings.
  std::vector<std::string> as_strings() const;
  /// One of `choices`, else an error listing them.
  std::string as_choice(const std::vector<std::string>& choices) const;

  // Typed reads of a map entry with a default when absent.
  std::int64_t get_int(const std::string& key, std::int64_t fallback) const;
  std::int64_t get_positive_int(const std::string& key, std::int64_t fallback) const;
  double get_double(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;
  std::vector<std::string> get_strings(const std::string& key,
                                       const std::vector<std::string>& fallback) const;
  std::string get_choice(const std::string& key, const std::vector<std::string>& choices,
                         const std::string& fallback) const;

  /// Every key of this map must be one of `allowed`; an unknown key is an error with a
  /// did-you-mean suggestion.
  void check_keys(const std::vector<std::string>& allowed) const;

  /// An error about this node: "<source>: <path>: <what>".
  [[noreturn]] void fail(const std::string& what) const;

 private:
  std::string got() const;
  Kind kind_ = Kind::null;
  std::string text_;
  bool quoted_ = false;
  std::string path_;
  Source source_;
  std::vector<Params> items_;
  std::vector<std::pair<std::string, Params>> entries_;
};

/// The closest of `candidates` to `word` by edit distance, or "" when none is close.
std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace graft
