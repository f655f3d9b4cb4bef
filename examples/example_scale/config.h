// example_scale's settings.
#pragma once

#include <graft/method.h>

#include <nlohmann/json.hpp>

namespace example_scale {

struct Config {
  double init = 1.0;    ///< the scale's starting value (1 = the base model, unchanged)
  graft::Selection selection;  ///< default targets: attn.v

  static Config from_params(const graft::Params& p) {
    graft::check_method_keys(p, {"init"});
    Config c;
    c.init = p.get_double("init", c.init);
    c.selection = graft::Selection::from_params(p, {"attn.v"});
    return c;
  }
  nlohmann::json to_json() const { return {{"init", init}, {"targets", selection.targets}}; }
};

}  // namespace example_scale
