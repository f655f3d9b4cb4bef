#include <graft/adapter.h>
#include <graft/adapter_set.h>
#include <graft/error.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "plugin/site_hooks.h"

namespace graft {

namespace {

// The identity and in-place version of each of the base model's own tensors: a method that
// writes into one (or replaces it) changes its entry.
using BaseTensors = std::map<std::string, std::pair<const void*, std::int64_t>>;

BaseTensors base_tensors(const Model& model) {
  BaseTensors out;
  for (const auto& p : model.named_parameters(true))
    out[p.key()] = {p.value().unsafeGetTensorImpl(), p.value()._version()};
  for (const auto& b : model.named_buffers(true))
    out["buffer " + b.key()] = {b.value().unsafeGetTensorImpl(), b.value()._version()};
  return out;
}

// The base tensors that differ between two snapshots, named for an error ("norm.weight, ...").
std::string changed(const BaseTensors& before, const BaseTensors& after) {
  std::vector<std::string> names;
  for (const auto& [name, id] : after) {
    const auto it = before.find(name);
    if (it == before.end() || it->second != id) names.push_back(name);
  }
  for (const auto& [name, id] : before)
    if (!after.count(name)) names.push_back(name);
  std::string out;
  for (std::size_t i = 0; i < names.size() && i < 3; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > 3) out += " and " + std::to_string(names.size() - 3) + " more";
  return out;
}

bool name_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
}

bool is_base(const std::string& name) { return name == kBaseRoute || name == "base"; }

// Why a hook cannot serve some rows of a batch and not others; empty when it can.
std::string unroutable(const Hook& hook) {
  if (dynamic_cast<const WeightTransform*>(&hook))
    return "transforms the weight, which every row shares";
  if (dynamic_cast<const KvExtension*>(&hook))
    return "adds key/value prefixes, which change the length every row attends over";
  if (dynamic_cast<const EmbeddingExtension*>(&hook))
    return "adds prompt positions, which change every row's length";
  if (const auto* r = dynamic_cast<const ResidualTransform*>(&hook); r && r->closes())
    return "takes over the residual step and its norm for every row";
  return {};
}

}  // namespace

bool is_adapter_name(const std::string& name) {
  return !name.empty() && !is_base(name) && std::all_of(name.begin(), name.end(), name_char);
}

std::string default_adapter_name(const std::filesystem::path& path) {
  auto p = path.lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // "dir/"
  auto name = std::filesystem::is_directory(path) ? p.filename().string() : p.stem().string();
  for (auto& c : name)
    if (!name_char(c)) c = '_';
  return is_adapter_name(name) ? name : "adapter";
}

std::pair<std::string, std::filesystem::path> adapter_name_and_path(const std::string& text) {
  const auto eq = text.find('=');
  if (eq != std::string::npos && eq > 0 && !std::filesystem::exists(text)) {
    const auto name = text.substr(0, eq);
    if (std::all_of(name.begin(), name.end(), name_char)) {
      if (eq + 1 == text.size()) throw Error(text + ": expected NAME=PATH");
      return {name, text.substr(eq + 1)};
    }
  }
  return {default_adapter_name(text), text};
}

AdapterSet::AdapterSet(Model& model) : model_(model) {}

AdapterSet::~AdapterSet() {
  model_.set_routing(nullptr);
  attach_only({});
  for (auto& e : entries_)
    for (auto& m : e.methods) m->detach(model_);
}

AdapterSet::Entry& AdapterSet::entry(const std::string& name, const char* what) {
  return const_cast<Entry&>(std::as_const(*this).entry(name, what));
}

const AdapterSet::Entry& AdapterSet::entry(const std::string& name, const char* what) const {
  for (const auto& e : entries_)
    if (e.name == name) return e;
  std::string loaded;
  for (const auto& e : entries_) loaded += (loaded.empty() ? "" : ", ") + e.name;
  throw Error(std::string(what) + ": no adapter named '" + name + "' is loaded (" +
              (loaded.empty() ? std::string("none is") : "loaded: " + loaded) + ")");
}

std::vector<std::string> AdapterSet::names() const {
  std::vector<std::string> out;
  for (const auto& e : entries_) out.push_back(e.name);
  return out;
}

std::vector<Method*> AdapterSet::methods(const std::string& name) const {
  std::vector<Method*> out;
  for (const auto& m : entry(name, "methods").methods) out.push_back(m.get());
  return out;
}

void AdapterSet::load(const std::string& name, const std::filesystem::path& path) {
  if (!is_adapter_name(name))
    throw Error(path.string() + ": adapter name '" + name +
                "': expected letters, digits, '_', '-' or '.' (and not " + kBaseRoute + ")");
  for (const auto& e : entries_)
    if (e.name == name)
      throw Error(path.string() + ": an adapter named '" + name +
                  "' is loaded already; give this one another name");
  // Load onto the adapters as they are, then find what the load attached and changed.
  const auto attached_before = attached_;
  std::map<std::string, std::set<const Hook*>> before;
  for (const auto& site : model_.sites())
    for (const auto& h : all_hooks(model_.hooks(site.name))) before[site.name].insert(h.get());
  const auto base_before = base_tensors(model_);
  Entry e;
  e.name = name;
  e.methods = load_adapter(path, model_);
  for (auto& m : e.methods) m->set_training(false);
  for (const auto& site : model_.sites()) {
    const auto& h = model_.hooks(site.name);
    for (const auto& hook : all_hooks(h)) {
      if (before[site.name].count(hook.get())) continue;
      // The owner attach() knew it by, kept so that detaching and attaching again is the same.
      const bool exclusive = !h.exclusive_owner.empty();
      e.attachments.push_back({site.name, hook,
                               exclusive ? h.exclusive_owner : "adapter '" + name + "'",
                               exclusive ? Claim::exclusive : Claim::shared});
    }
  }
  e.in_place = changed(base_before, base_tensors(model_));
  entries_.push_back(std::move(e));
  active_.push_back(name);
  attached_.push_back(name);
  if (routed_) attach_only(attached_before);  // a routed batch takes no new adapter
}

void AdapterSet::check_removable(const Entry& e, const std::string& what) const {
  if (!e.in_place.empty())
    throw Error("adapter '" + e.name + "' changed the base model's own tensors (" + e.in_place +
                ") when it loaded, so it cannot be " + what +
                "; load the base again without it instead");
}

void AdapterSet::attach_only(const std::vector<std::string>& names) {
  if (names == attached_) return;
  for (auto it = attached_.rbegin(); it != attached_.rend(); ++it)
    for (const auto& a : entry(*it, "attach").attachments) model_.detach(a.site, a.hook);
  attached_.clear();
  for (const auto& n : names) {
    for (const auto& a : entry(n, "attach").attachments)
      model_.attach(a.site, a.hook, a.owner, a.claim);
    attached_.push_back(n);
  }
}

void AdapterSet::set_active(const std::vector<std::string>& names) {
  std::set<std::string> seen;
  for (const auto& n : names) {
    entry(n, "set_active");
    if (!seen.insert(n).second) throw Error("set_active: adapter '" + n + "' is named twice");
  }
  for (const auto& e : entries_)
    if (!seen.count(e.name)) check_removable(e, "switched off");
  active_ = names;
  if (!routed_) attach_only(active_);
}

void AdapterSet::unload(const std::string& name) {
  auto& e = entry(name, "unload");
  check_removable(e, "unloaded");
  if (routed_) end_route();
  std::vector<std::string> rest;
  for (const auto& n : active_)
    if (n != name) rest.push_back(n);
  attach_only(rest);
  active_ = rest;
  for (auto& m : e.methods) m->detach(model_);
  entries_.erase(std::find_if(entries_.begin(), entries_.end(),
                              [&](const Entry& x) { return x.name == name; }));
}

void AdapterSet::route(const std::vector<std::string>& rows) {
  if (rows.empty())
    throw Error("route: expected one adapter name (or " + std::string(kBaseRoute) +
                ") per row of the batch");
  std::map<std::string, std::vector<std::int64_t>> by_adapter;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (is_base(rows[i])) continue;
    entry(rows[i], "route");
    by_adapter[rows[i]].push_back(static_cast<std::int64_t>(i));
  }
  // Every adapter is off but the routed ones, each on its rows: none may be always on.
  for (const auto& e : entries_) {
    if (!by_adapter.count(e.name) || !e.in_place.empty()) {
      check_removable(e, "routed to some rows only");
      continue;
    }
    for (const auto& a : e.attachments) {
      const auto why = unroutable(*a.hook);
      if (!why.empty())
        throw Error("route: adapter '" + e.name +
                    "' cannot serve some rows of a batch and not "
                    "others: at " +
                    a.site + " it " + why);
    }
  }
  auto routing = std::make_shared<RowRouting>();
  routing->batch = static_cast<std::int64_t>(rows.size());
  std::vector<std::string> order;  // load order, as set_active() of them all would attach
  for (const auto& e : entries_) {
    const auto it = by_adapter.find(e.name);
    if (it == by_adapter.end()) continue;
    order.push_back(e.name);
    // An adapter on every row needs no gathering: it serves the batch as a whole.
    if (it->second.size() == rows.size()) continue;
    const auto index = torch::tensor(it->second, torch::kLong);
    for (const auto& a : e.attachments) routing->rows[a.hook.get()] = index;
  }
  attach_only(order);
  model_.set_routing(std::move(routing));
  routed_ = true;
}

void AdapterSet::end_route() {
  model_.set_routing(nullptr);
  routed_ = false;
  attach_only(active_);
}

}  // namespace graft

namespace graft {

std::unique_ptr<Method> combine_adapters(const std::vector<std::filesystem::path>& sources,
                                         const CombineOptions& options, Model& model) {
  if (sources.size() < 2)
    throw Error("combine: expected two adapters or more, got " + std::to_string(sources.size()));
  if (options.weights.size() != sources.size())
    throw Error("combine: " + std::to_string(options.weights.size()) + " weights for " +
                std::to_string(sources.size()) + " adapters; give one weight per adapter");
  AdapterSet set(model);  // the sources, for this call only
  std::vector<Method*> methods;
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const auto name = "source" + std::to_string(i);
    set.load(name, sources[i]);
    const auto held = set.methods(name);
    if (held.size() != 1) {
      std::string names;
      for (const auto* m : held) names += (names.empty() ? "" : ", ") + m->name();
      throw Error(sources[i].string() + ": holds " + std::to_string(held.size()) + " methods (" +
                  names + "); combine takes adapters of one method each");
    }
    if (!methods.empty() && held[0]->name() != methods[0]->name())
      throw Error(sources[i].string() + ": a " + held[0]->name() + " adapter, but " +
                  sources[0].string() + " is a " + methods[0]->name() +
                  " adapter; combine takes adapters of one method");
    methods.push_back(held[0]);
  }
  const auto& method = methods[0]->name();
  std::string offer;
  for (const auto& r : registered_methods()) {
    if (r.info.name != method) continue;
    if (!r.info.combine) break;
    for (const auto& t : r.info.combinations) {
      if (t == options.type) return r.info.combine(methods, options, model);
      offer += (offer.empty() ? "" : ", ") + t;
    }
    throw Error("combine: '" + options.type + "' is not a way to combine " + method +
                " adapters (" + method + " offers " + offer + ")");
  }
  for (const auto& r : registered_methods())
    if (r.info.combine) offer += (offer.empty() ? "" : ", ") + r.info.name;
  throw Error("combine: " + method + " adapters cannot be combined (methods that can: " +
              (offer.empty() ? std::string("none loaded") : offer) + ")");
}

}  // namespace graft

namespace graft {

Combiner linear_state_combiner() {
  return [](const std::vector<Method*>& sources, const CombineOptions& o,
            Model& model) -> std::unique_ptr<Method> {
    const auto name = sources[0]->name();
    const auto config = sources[0]->config();
    for (std::size_t i = 1; i < sources.size(); ++i) {
      const auto other = sources[i]->config();
      if (other == config) continue;
      std::string key;
      for (const auto& [k, v] : config.items())
        if (!other.contains(k) || other.at(k) != v) key = k;
      for (const auto& [k, v] : other.items())
        if (!config.contains(k)) key = k;
      throw Error(name + " combine: source " + std::to_string(i + 1) + "'s " + key + " (" +
                  (other.contains(key) ? other.at(key).dump() : std::string("unset")) +
                  ") differs from source 1's (" +
                  (config.contains(key) ? config.at(key).dump() : std::string("unset")) +
                  "); linear sums tensors of adapters with the same settings");
    }
    io::TensorMap sum;
    {
      torch::NoGradGuard no_grad;
      for (std::size_t i = 0; i < sources.size(); ++i)
        for (const auto& [key, t] : sources[i]->state()) {
          const auto part = t.detach() * o.weights[i];
          auto it = sum.find(key);
          if (it == sum.end())
            sum.emplace(key, part);
          else
            it->second = it->second + part;
        }
    }
    auto out = make_method(name, params_from_json(config, "combine", ""));
    out->attach(model);
    out->load_state(sum, "combine");
    return out;
  };
}

}  // namespace graft
