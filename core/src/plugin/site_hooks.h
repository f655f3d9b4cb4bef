// Every hook at a site, whatever its kind (core-internal).
#pragma once

#include <graft/hooks.h>

#include <memory>
#include <vector>

namespace graft {

/// The hooks attached at a site, kind by kind, each kind in attach order.
inline std::vector<std::shared_ptr<Hook>> all_hooks(const SiteHooks& h) {
  std::vector<std::shared_ptr<Hook>> all;
  auto add = [&](const auto& list) { all.insert(all.end(), list.begin(), list.end()); };
  add(h.weight_transforms);
  add(h.deltas);
  add(h.scales);
  add(h.transforms);
  add(h.residual);
  add(h.kv);
  add(h.embeddings);
  return all;
}

}  // namespace graft
