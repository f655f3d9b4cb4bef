// Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) with AdapterHub's architecture
// options (adapter.h), and the presets recipes name directly, equal to AdapterHub's defaults:
// `pfeiffer` = SeqBnConfig (after the feed-forward, on the normalised sum, reduction 16, relu),
// `houlsby` = DoubleSeqBnConfig (after attention and the feed-forward, on the sublayer output,
// reduction 16, swish). `bottleneck` starts from pfeiffer. The plugin reads and writes
// AdapterHub's bottleneck configurations (SeqBn, DoubleSeqBn, ParBn and their options).
#include <graft/adapterhub.h>
#include <graft/plugin.h>

#include "adapter.h"

namespace graft::plugins::adapters {
namespace {

void add(Registry& registry, const std::string& name, const std::string& description,
         AdapterConfig preset, std::vector<std::string> targets) {
  MethodInfo info;
  info.name = name;
  info.version = "2.0.0";
  info.description = description;
  info.points = {"attn.out", "ffn.out"};
  info.combinations = {"linear"};  // AdapterHub's average_adapter: sum w_i theta_i
  info.combine = linear_state_combiner();
  registry.add(info, [=](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<Bottleneck>(name, AdapterConfig::from_params(p, preset, targets));
  });
  if (name == "bottleneck")  // one reader for every bottleneck part
    registry.add_format(adapterhub::part_format(name, reads_bottleneck_part, read_bottleneck_part,
                                                write_bottleneck_part));
  else
    registry.add_format(adapterhub::part_format(name, {}, {}, write_bottleneck_part));
}

void register_bottleneck(Registry& registry) {
  AdapterConfig pfeiffer;  // AdapterHub's SeqBnConfig
  pfeiffer.reduction_factor = 16;
  pfeiffer.non_linearity = "relu";
  pfeiffer.original_ln_before = true;
  AdapterConfig houlsby = pfeiffer;  // AdapterHub's DoubleSeqBnConfig
  houlsby.non_linearity = "swish";
  houlsby.original_ln_before = false;
  add(registry, "bottleneck", "sequential or parallel bottleneck adapters (AdapterHub's options)",
      pfeiffer, {"ffn.out"});
  add(registry, "pfeiffer", "AdapterHub seq_bn: after the feed-forward, reduction 16, relu",
      pfeiffer, {"ffn.out"});
  add(registry, "houlsby",
      "AdapterHub double_seq_bn: after attention and feed-forward, reduction 16, swish", houlsby,
      {"attn.out", "ffn.out"});
}

}  // namespace
}  // namespace graft::plugins::adapters

GRAFT_PLUGIN("bottleneck", "2.0.0", graft::plugins::adapters::register_bottleneck)
