// Per-site overrides of a method's setting (peft's rank_pattern and alpha_pattern): a site point
// or a glob over site names -> value, the last match winning. Shared by the plugins that have them.
#pragma once

#include <graft/method.h>
#include <graft/params.h>

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace graft::plugins {

template <typename T>
struct SitePatterns {
  std::vector<std::pair<std::string, T>> entries;

  /// Reads the map `key` of `p` (absent: no overrides), each value through `value`.
  template <typename Read>
  static SitePatterns read(const Params& p, const char* key, Read value) {
    SitePatterns out;
    if (!p.has(key)) return out;
    const auto& m = p.at(key);
    if (m.kind() != Params::Kind::map) m.fail("expected a map of site pattern to value");
    for (const auto& [pattern, v] : m.entries()) out.entries.emplace_back(pattern, value(v));
    return out;
  }

  /// The value for `site`: the last pattern that matches it, else `fallback`.
  T at(const Site& site, T fallback) const {
    for (const auto& [pattern, v] : entries)
      if (pattern == site.point || glob_match(pattern, site.name)) fallback = v;
    return fallback;
  }

  bool empty() const { return entries.empty(); }

  /// Adds the map to a method's config under `key` (nothing when empty).
  void write(nlohmann::json& config, const char* key) const {
    if (entries.empty()) return;
    config[key] = nlohmann::json::object();
    for (const auto& [k, v] : entries) config[key][k] = v;
  }
};

/// Value readers for SitePatterns::read.
inline std::int64_t positive_int(const Params& v) { return v.as_positive_int(); }
inline double positive_number(const Params& v) {
  const auto a = v.as_double();
  if (a <= 0) v.fail("expected a positive number, got \"" + v.text() + "\"");
  return a;
}

}  // namespace graft::plugins
