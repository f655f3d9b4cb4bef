// The parts of the method API that every plugin shares: hook bookkeeping, state, merging, and
// site selection.
#include <graft/method.h>
#include <torch/torch.h>

#include <algorithm>
#include <set>

namespace graft {

void Method::merge(Model&) {
  throw Error(name() + ": this method cannot be merged into the base weights");
}
void Method::unmerge(Model&) {
  throw Error(name() + ": this method cannot be merged into the base weights");
}

void Method::set_scale(double) {
  throw Error(name() +
              ": its update has no scale to set (a scale applies to additive updates "
              "such as low-rank deltas)");
}

io::TensorMap Method::checkpoint_state() {
  auto out = state();
  for (const auto& [name, t] : trainable_parameters()) out["train." + name] = t;
  return out;
}

void Method::load_checkpoint_state(const io::TensorMap& all, const std::string& source) {
  io::TensorMap state, train;
  for (const auto& [key, t] : all)
    (key.rfind("train.", 0) == 0 ? train[key.substr(6)] : state[key]) = t;
  load_state(state, source);
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : trainable_parameters()) {
    auto it = train.find(name);
    if (it == train.end())
      throw FileError(source, this->name() + ": missing tensor 'train." + name + "'");
    t.copy_(it->second);
  }
}

void HookMethod::add_hook(Model& model, const std::string& site, std::shared_ptr<Hook> hook,
                          Claim claim) {
  model.attach(site, hook, name(), claim);
  hooks_.emplace_back(site, std::move(hook));
}

void HookMethod::detach(Model& model) {
  for (const auto& [site, hook] : hooks_) model.detach(site, hook);
  hooks_.clear();
}

std::vector<std::pair<std::string, at::Tensor>> HookMethod::trainable_parameters() {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [site, hook] : hooks_)
    for (const auto& p : hook->named_parameters(true))
      if (p.value().requires_grad()) out.emplace_back(site + "." + p.key(), p.value());
  return out;
}

io::TensorMap HookMethod::state() {
  io::TensorMap out;
  for (const auto& [site, hook] : hooks_)
    for (const auto& p : hook->named_parameters(true)) out[site + "." + p.key()] = p.value();
  return out;
}

void HookMethod::load_state(const io::TensorMap& state, const std::string& source) {
  torch::NoGradGuard no_grad;
  auto expected = HookMethod::state();  // the hooks' tensors; subclasses load their own first
  for (const auto& [key, t] : state)
    if (!expected.count(key))
      throw FileError(source, name() + ": unexpected tensor '" + key +
                                  "' (an adapter for another method, model or configuration?)");
  for (auto& [key, p] : expected) {
    auto it = state.find(key);
    if (it == state.end()) throw FileError(source, name() + ": missing tensor '" + key + "'");
    if (it->second.sizes() != p.sizes())
      throw FileError(source, name() + ": tensor '" + key + "' has shape " +
                                  c10::str(it->second.sizes()) + " but this model needs " +
                                  c10::str(p.sizes()) + " (was it trained on another base model?)");
    p.copy_(it->second);
  }
}

void HookMethod::set_training(bool on) {
  for (const auto& [site, hook] : hooks_) hook->train(on);
}

void HookMethod::merge(Model& model) {
  if (merged_) return;
  torch::NoGradGuard no_grad;
  // Check everything first, so that a refusal changes nothing.
  for (const auto& [site, hook] : hooks_) {
    auto* lin = model.linear(site);
    auto delta = std::dynamic_pointer_cast<LinearDelta>(hook);
    auto transform = std::dynamic_pointer_cast<WeightTransform>(hook);
    const bool ok =
        lin &&
        ((delta && (delta->delta_weight(*lin).defined() || delta->delta_bias(*lin).defined())) ||
         (transform && transform->mergeable()) || std::dynamic_pointer_cast<LinearScale>(hook));
    if (!ok)
      throw Error(name() + ": cannot merge: the hook at site '" + site +
                  "' does not fold into weights");
    if (lin->weight.numel() != lin->in_features * lin->out_features)
      throw Error(
          name() + ": cannot merge into site '" + site +
          "': its base weight is held by a weight transform of another method; merge that method "
          "first");
  }
  // A weight shared with another module (a head tied to the embedding) gets a copy of its own
  // first: merging into it must leave the other module as it is.
  untied_.clear();
  for (const auto& [site, hook] : hooks_) {
    auto* lin = model.linear(site);
    auto delta = std::dynamic_pointer_cast<LinearDelta>(hook);
    const bool changes_weight = !delta || delta->delta_weight(*lin).defined();
    if (changes_weight && lin->tied()) {
      model.untie(site);
      untied_.push_back(site);
    }
  }
  // Weight transforms and scales are undone by restoring the weights saved here; deltas by
  // subtracting them again.
  saved_weights_.clear();
  auto save = [&](LinearImpl* lin) {
    saved_weights_.push_back(lin->weight.detach().clone());
    saved_weights_.push_back(lin->bias.defined() ? lin->bias.detach().clone() : at::Tensor());
  };
  for (const auto& [site, hook] : hooks_) {
    auto* lin = model.linear(site);
    if (auto t = std::dynamic_pointer_cast<WeightTransform>(hook)) {
      save(lin);
      lin->weight.copy_(t->transform(lin->weight, *lin));
    }
  }
  for (const auto& [site, hook] : hooks_) {
    auto* lin = model.linear(site);
    if (auto d = std::dynamic_pointer_cast<LinearDelta>(hook)) {
      auto dw = d->delta_weight(*lin);
      if (dw.defined()) lin->weight.add_(dw.to(lin->weight.dtype()));
      auto db = d->delta_bias(*lin);
      if (db.defined()) {
        lin->add_bias();
        lin->bias.add_(db.to(lin->bias.dtype()));
      }
    }
  }
  for (const auto& [site, hook] : hooks_) {
    auto* lin = model.linear(site);
    if (auto sc = std::dynamic_pointer_cast<LinearScale>(hook)) {
      save(lin);
      auto s = sc->scale().to(lin->weight.dtype());
      if (sc->side() == LinearScale::Side::input) {
        lin->weight.mul_(s.unsqueeze(0));
      } else {
        lin->weight.mul_(s.unsqueeze(1));
        if (lin->bias.defined()) lin->bias.mul_(s);
      }
    }
  }
  for (const auto& [site, hook] : hooks_) model.detach(site, hook);
  merged_ = true;
}

void HookMethod::unmerge(Model& model) {
  if (!merged_) return;
  torch::NoGradGuard no_grad;
  // Undo in the reverse order of merge(): scales, deltas, weight transforms.
  std::size_t saved = saved_weights_.size();
  auto restore = [&](LinearImpl* lin) {
    auto bias = saved_weights_[--saved];
    lin->weight.copy_(saved_weights_[--saved]);
    if (bias.defined()) lin->bias.copy_(bias);
  };
  for (auto it = hooks_.rbegin(); it != hooks_.rend(); ++it)
    if (std::dynamic_pointer_cast<LinearScale>(it->second)) restore(model.linear(it->first));
  for (const auto& [site, hook] : hooks_) {
    auto* lin = model.linear(site);
    if (auto d = std::dynamic_pointer_cast<LinearDelta>(hook)) {
      auto dw = d->delta_weight(*lin);
      if (dw.defined()) lin->weight.sub_(dw.to(lin->weight.dtype()));
      auto db = d->delta_bias(*lin);
      if (db.defined()) lin->bias.sub_(db.to(lin->bias.dtype()));
    }
  }
  for (auto it = hooks_.rbegin(); it != hooks_.rend(); ++it)
    if (std::dynamic_pointer_cast<WeightTransform>(it->second)) restore(model.linear(it->first));
  for (const auto& site : untied_) model.retie(site);
  untied_.clear();
  for (const auto& [site, hook] : hooks_) model.attach(site, hook, name());
  saved_weights_.clear();
  merged_ = false;
}

// --- selection -----------------------------------------------------------------------------

bool glob_match(const std::string& p, const std::string& t) {
  std::size_t i = 0, j = 0, star = std::string::npos, mark = 0;
  while (j < t.size()) {
    if (i < p.size() && (p[i] == '?' || p[i] == t[j])) {
      ++i;
      ++j;
    } else if (i < p.size() && p[i] == '*') {
      star = i++;
      mark = j;
    } else if (star != std::string::npos) {
      i = star + 1;
      j = ++mark;
    } else {
      return false;
    }
  }
  while (i < p.size() && p[i] == '*') ++i;
  return i == p.size();
}

namespace {

// "3", "0-5", "all" or a list of those.
std::vector<std::int64_t> read_layers(const Params& p, bool allow_all) {
  std::vector<std::int64_t> out;
  auto one = [&](const Params& item) {
    const auto text = item.as_string();
    if (allow_all && text == "all") return;
    const auto dash = text.find('-');
    if (dash != std::string::npos && dash > 0) {
      auto lo = Params::scalar(text.substr(0, dash), item.path(), item.source());
      auto hi = Params::scalar(text.substr(dash + 1), item.path(), item.source());
      std::int64_t a = 0, b = 0;
      try {
        a = lo.as_non_negative_int();
        b = hi.as_non_negative_int();
      } catch (const ParamError&) {
        item.fail("expected a layer index, a range such as 0-3, or all; got \"" + text + "\"");
      }
      if (b < a) item.fail("the range " + text + " is empty");
      for (auto k = a; k <= b; ++k) out.push_back(k);
      return;
    }
    try {
      out.push_back(item.as_non_negative_int());
    } catch (const ParamError&) {
      item.fail("expected a layer index, a range such as 0-3" +
                std::string(allow_all ? ", or all" : "") + "; got \"" + text + "\"");
    }
  };
  if (p.kind() == Params::Kind::list) {
    for (const auto& item : p.items()) one(item);
  } else {
    one(p);
  }
  return out;
}

}  // namespace

std::string trainable_summary(const Model& model, const std::vector<Method*>& methods) {
  std::set<const void*> seen;
  std::int64_t all = 0, trainable = 0;
  auto count = [&](const at::Tensor& t, bool train) {
    if (!seen.insert(t.unsafeGetTensorImpl()).second) return;
    all += t.numel();
    if (train) trainable += t.numel();
  };
  for (auto* m : methods)
    for (const auto& [name, t] : m->trainable_parameters()) count(t, true);
  for (auto* m : methods)
    for (const auto& [name, t] : m->state()) count(t, false);
  for (const auto& p : model.parameters()) count(p, p.requires_grad());
  auto commas = [](std::int64_t n) {
    auto s = std::to_string(n);
    for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(i, ",");
    return s;
  };
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.4f", all ? 100.0 * trainable / all : 0.0);
  return "trainable params: " + commas(trainable) + " || all params: " + commas(all) +
         " || trainable%: " + pct;
}

void check_method_keys(const Params& params, const std::vector<std::string>& own) {
  std::vector<std::string> allowed = {"name", "targets", "layers", "leave_out"};
  allowed.insert(allowed.end(), own.begin(), own.end());
  params.check_keys(allowed);
}

Selection Selection::from_params(const Params& params, std::vector<std::string> default_targets) {
  Selection s;
  s.where = params;
  s.targets = params.get_strings("targets", default_targets);
  if (params.has("layers")) s.layers = read_layers(params.at("layers"), true);
  if (params.has("leave_out")) s.leave_out = read_layers(params.at("leave_out"), false);
  return s;
}

nlohmann::json Selection::to_json() const {
  nlohmann::json j = {{"targets", targets}};
  if (!layers.empty()) j["layers"] = layers;
  if (!leave_out.empty()) j["leave_out"] = leave_out;
  return j;
}

std::vector<Site> select_sites(const Model& model, const Selection& sel,
                               const std::string& method) {
  const auto& points = site_points();
  std::vector<Site> out;
  std::set<std::string> matched_targets;
  for (const auto& site : model.sites()) {
    if (site.layer >= 0) {
      if (!sel.layers.empty() &&
          std::find(sel.layers.begin(), sel.layers.end(), site.layer) == sel.layers.end())
        continue;
      if (std::find(sel.leave_out.begin(), sel.leave_out.end(), site.layer) != sel.leave_out.end())
        continue;
    }
    for (const auto& t : sel.targets) {
      const bool hit =
          t == site.point ||
          (t == "all-linear" && Model::is_linear_point(site.point) && site.point != "head") ||
          glob_match(t, site.name);
      if (hit) {
        matched_targets.insert(t);
        out.push_back(site);
        break;
      }
    }
  }
  auto fail = [&](const std::string& what) {
    std::string pts;
    std::set<std::string> present;
    for (const auto& s : model.sites()) present.insert(s.point);
    for (const auto& p : points)
      if (present.count(p)) pts += (pts.empty() ? "" : ", ") + p;
    const std::string msg = what + "; the points of this " + model.config().family + " model are " +
                            pts + "; site names look like layers.0.attn.q";
    if (sel.where.has("targets")) sel.where.at("targets").fail(msg);
    if (!sel.where.is_null()) sel.where.fail(msg);
    throw Error(method + ": " + msg);
  };
  // A target that is no known point, not all-linear, and matches no site name is a typo.
  for (const auto& t : sel.targets) {
    const bool known =
        t == "all-linear" || std::find(points.begin(), points.end(), t) != points.end();
    if (!known && !matched_targets.count(t)) {
      std::vector<std::string> options(points.begin(), points.end());
      options.push_back("all-linear");
      auto near = did_you_mean(t, options);
      fail("target \"" + t + "\" matches no site" +
           (near.empty() ? std::string() : " (did you mean \"" + near + "\"?)"));
    }
  }
  if (out.empty()) {
    std::string ts;
    for (const auto& t : sel.targets) ts += (ts.empty() ? "" : ", ") + t;
    fail("targets [" + ts + "] match no site" +
         (sel.layers.empty() && sel.leave_out.empty() ? "" : " in the selected layers"));
  }
  return out;
}

}  // namespace graft
