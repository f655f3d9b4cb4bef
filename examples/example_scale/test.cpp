// Loads the example_scale plugin from its build folder, attaches it to a tiny llama model and trains
// one step: the method's parameters change, the base model does not.
#include <graft/load.h>
#include <graft/plugin.h>

#include <torch/torch.h>

#include <iostream>

int main() {
  int passed = 0, failed = 0;
  auto check = [&](bool ok, const char* what) {
    (ok ? passed : failed)++;
    if (!ok) std::cerr << "FAILED: " << what << "\n";
  };
  for (const auto& r : graft::load_plugins({PLUGIN_DIR}))
    if (!r.error.empty()) std::cerr << r.file << ": " << r.error << "\n";

  graft::ModelConfig c;
  c.family = "llama";
  c.vocab_size = 32;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 32;
  c.max_positions = 32;
  c.hidden_act = "silu";
  auto model = graft::make_model(c);
  graft::init_random(*model, 1, 0.2);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  auto before = model->named_parameters()["layers.0.attn.v.weight"].clone();

  auto method = graft::make_method("example_scale", graft::Params::map());
  method->attach(*model);
  std::cout << graft::trainable_summary(*model, {method.get()}) << "\n";
  std::vector<at::Tensor> params;
  for (const auto& [name, t] : method->trainable_parameters()) params.push_back(t);
  check(params.size() == 2, "one scale per selected site");

  auto ids = torch::randint(c.vocab_size, {2, 8}, torch::kLong);
  auto loss = [&] {
    auto logits = model->forward({ids, {}, {}, {}}, nullptr).logits;
    return torch::cross_entropy_loss(logits.slice(1, 0, -1).reshape({-1, c.vocab_size}),
                                     ids.slice(1, 1).reshape({-1}));
  };
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  const double l0 = loss().item<double>();
  opt.zero_grad();
  loss().backward();
  opt.step();
  check(loss().item<double>() < l0, "one step lowers the loss");
  check(torch::equal(model->named_parameters()["layers.0.attn.v.weight"], before), "the base is unchanged");
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
