// Parallel adapters (He et al. 2022) = AdapterHub's ParBnConfig: beside the sublayer, reading the
// residual stream x (the sublayer's input before any pre-norm),
//   out <- sublayer(x) + s * up(f(down(x)))
// on the feed-forward, reduction 2, relu, scaling 4.0, init `mam` (up = 0, so the model is
// unchanged at the start). The adapter is the bottleneck plugin's (adapter.h), with parallel: true.
#include <graft/adapterhub.h>
#include <graft/plugin.h>

#include "../bottleneck/adapter.h"

namespace graft::plugins::adapters {
namespace {

void register_parallel(Registry& registry) {
  AdapterConfig mam;
  mam.reduction_factor = 2;
  mam.non_linearity = "relu";
  mam.scaling = 4.0;
  mam.init = "mam";
  mam.parallel = true;
  mam.original_ln_before = false;
  MethodInfo info;
  info.name = "parallel";
  info.version = "2.0.0";
  info.description =
      "AdapterHub par_bn: beside the feed-forward, reading its input (reduction 2, s 4)";
  info.points = {"attn.out", "ffn.out"};
  info.combinations = {"linear"};  // AdapterHub's average_adapter: sum w_i theta_i
  info.combine = linear_state_combiner();
  registry.add(info, [=](const Params& p) -> std::unique_ptr<Method> {
    auto c = AdapterConfig::from_params(p, mam, {"ffn.out"});
    if (!c.parallel) p.at("parallel").fail("the parallel method is parallel; use bottleneck");
    return std::make_unique<Bottleneck>("parallel", c);
  });
  registry.add_format(adapterhub::part_format("parallel", {}, {}, write_bottleneck_part));
}

}  // namespace
}  // namespace graft::plugins::adapters

GRAFT_PLUGIN("parallel", "2.0.0", graft::plugins::adapters::register_parallel)
