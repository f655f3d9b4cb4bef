// Sweep files: reading, validating and expanding them into trials.
#include <graft/io/file.h>
#include <graft/recipe.h>
#include <graft/sweep.h>

#include <cmath>
#include <cstdio>
#include <set>

namespace graft {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// One value of one axis: the label it adds, its overrides and the swept values it sets.
struct Choice {
  std::string label;
  std::vector<std::string> overrides;
  std::vector<std::pair<std::string, std::string>> values;
};
using Axis = std::vector<Choice>;

std::string override_of(const std::string& key, const Params& value) {
  return key + "=" + to_flow_yaml(value);
}

const Params& list_of(const Params& p) {
  if (p.kind() != Params::Kind::list || p.items().empty())
    p.fail("expected a non-empty list of values, got " +
           std::string(p.kind() == Params::Kind::scalar ? "\"" + p.text() + "\"" : "nothing"));
  return p;
}

const Params& map_of(const Params& p, const std::string& what) {
  if (p.kind() != Params::Kind::map) p.fail("expected a map of " + what);
  return p;
}

// A key path as an override accepts it: checked by applying it to an empty recipe would need the
// recipe; here only its shape ("a.b[0].c") is checked, the base recipe check comes at validation.
void check_key(const Params& where, const std::string& key) {
  if (key.empty() || key.find('=') != std::string::npos || key.find(' ') != std::string::npos)
    where.fail("\"" + key + "\" is not a key path (e.g. train.lr or methods[0].r)");
}

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

double unit(std::uint64_t& state) {  // uniform in [0, 1) with 53 bits
  return static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;
}

std::string number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

// `random: {samples: N, seed: S, keys: {key: {uniform|log_uniform|int_uniform: [a, b]} |
// {choice: [...]}}}`: one axis of N samples, each drawing every key.
Axis random_axis(const Params& r) {
  map_of(r, "samples, seed and keys");
  r.check_keys({"samples", "seed", "keys"});
  const auto samples = r.at("samples").as_positive_int();
  const auto seed = static_cast<std::uint64_t>(r.get_int("seed", 0));
  const auto& keys = map_of(r.at("keys"), "key paths to distributions");
  for (const auto& [key, dist] : keys.entries()) {
    check_key(dist, key);
    map_of(dist, "one distribution: uniform, log_uniform, int_uniform or choice");
    dist.check_keys({"uniform", "log_uniform", "int_uniform", "choice"});
    if (dist.entries().size() != 1)
      dist.fail("give one distribution: uniform, log_uniform, int_uniform or choice");
    const auto& [kind, args] = dist.entries().front();
    if (kind == "choice") {
      list_of(args);
      continue;
    }
    if (args.kind() != Params::Kind::list || args.items().size() != 2)
      args.fail("expected [low, high]");
    const double lo = args.items()[0].as_double(), hi = args.items()[1].as_double();
    if (!(lo < hi) && !(kind == "int_uniform" && lo == hi)) args.fail("expected low < high");
    if (kind == "log_uniform" && lo <= 0) args.fail("log_uniform needs low > 0");
  }
  Axis axis;
  for (std::int64_t s = 0; s < samples; ++s) {
    Choice c;
    std::size_t k = 0;
    for (const auto& [key, dist] : keys.entries()) {
      // Each (sample, key) has its own stream, so adding a key leaves the others' draws alone.
      std::uint64_t state = seed * 0x100000001B3ULL + static_cast<std::uint64_t>(s) * 7919 + k++;
      splitmix64(state);
      const auto& [kind, args] = dist.entries().front();
      std::string text;
      Params value;
      if (kind == "choice") {
        const auto& items = args.items();
        value = items[static_cast<std::size_t>(unit(state) * static_cast<double>(items.size()))];
        text = to_flow_yaml(value);
      } else {
        const double lo = args.items()[0].as_double(), hi = args.items()[1].as_double();
        if (kind == "uniform") {
          text = number_text(lo + (hi - lo) * unit(state));
        } else if (kind == "log_uniform") {
          text = number_text(std::exp(std::log(lo) + (std::log(hi) - std::log(lo)) * unit(state)));
        } else {
          const auto a = static_cast<std::int64_t>(std::ceil(lo)),
                     b = static_cast<std::int64_t>(std::floor(hi));
          text = std::to_string(a + static_cast<std::int64_t>(unit(state) * (b - a + 1)));
        }
        value = Params::scalar(text, key, dist.source());
      }
      c.overrides.push_back(override_of(key, value));
      c.values.emplace_back(key, text);
      c.label += (c.label.empty() ? "" : ", ") + key + "=" + text;
    }
    axis.push_back(std::move(c));
  }
  return axis;
}

std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

std::string slug(const std::string& label) {
  std::string out;
  for (char c : label) {
    const bool keep =
        std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '+';
    if (keep)
      out += c;
    else if (!out.empty() && out.back() != '_')
      out += '_';
  }
  while (!out.empty() && out.back() == '_') out.pop_back();
  if (out.size() > 48) out.resize(48);
  return out.empty() ? "base" : out;
}

}  // namespace

std::vector<std::string> Trial::run_overrides() const {
  auto all = overrides;
  all.push_back("seed=" + std::to_string(seed));
  all.push_back("output.dir=" + dir.string());
  return all;
}

Sweep load_sweep(const fs::path& file, const fs::path& output) {
  const auto p = read_yaml(file);
  map_of(p, "sweep keys");
  p.check_keys({"recipe", "output", "set", "cases", "grid", "paired", "random", "seeds", "metric",
                "lower_is_better", "trial_threads", "trial_nproc", "workers"});
  Sweep s;
  s.file = file;
  const auto& recipe = p.at("recipe");
  s.recipe = (file.parent_path() / recipe.as_string()).lexically_normal();
  if (!fs::exists(s.recipe)) recipe.fail("no recipe at " + s.recipe.string());
  s.dir = !output.empty()   ? output
          : p.has("output") ? fs::path(p.at("output").as_string())
                            : fs::path("runs/sweeps") / file.stem();
  s.dir = s.dir.lexically_normal();
  if (s.dir.filename().empty()) s.dir = s.dir.parent_path();  // "runs/x/" names "runs/x"
  s.metric = p.get_string("metric", "loss");
  const bool lower = s.metric == "loss" || s.metric == "perplexity";
  s.lower_is_better = p.get_bool("lower_is_better", lower);
  s.trial_threads = static_cast<int>(p.get_positive_int("trial_threads", 1));
  s.trial_nproc = static_cast<int>(p.get_positive_int("trial_nproc", 1));
  s.workers = static_cast<int>(p.get_positive_int("workers", 1));

  std::vector<std::string> fixed;
  if (p.has("set"))
    for (const auto& [key, value] : map_of(p.at("set"), "key paths to values").entries()) {
      check_key(value, key);
      fixed.push_back(override_of(key, value));
    }

  std::vector<Axis> axes;
  if (p.has("cases")) {
    Axis axis;
    std::set<std::string> labels;
    for (const auto& c : list_of(p.at("cases")).items()) {
      map_of(c, "label and set");
      c.check_keys({"label", "set"});
      Choice choice;
      choice.label = c.at("label").as_string();
      if (!labels.insert(choice.label).second)
        c.at("label").fail("\"" + choice.label + "\" labels another case already");
      if (c.has("set"))
        for (const auto& [key, value] : map_of(c.at("set"), "key paths to values").entries()) {
          check_key(value, key);
          choice.overrides.push_back(override_of(key, value));
        }
      choice.values.emplace_back("case", choice.label);
      axis.push_back(std::move(choice));
    }
    axes.push_back(std::move(axis));
    s.axes.push_back("case");
  }
  if (p.has("grid"))
    for (const auto& [key, values] : map_of(p.at("grid"), "key paths to lists").entries()) {
      check_key(values, key);
      Axis axis;
      for (const auto& v : list_of(values).items()) {
        const auto text = to_flow_yaml(v);
        axis.push_back({key + "=" + text, {override_of(key, v)}, {{key, text}}});
      }
      axes.push_back(std::move(axis));
      s.axes.push_back(key);
    }
  if (p.has("paired"))
    for (const auto& group : list_of(p.at("paired")).items()) {
      map_of(group, "key paths to lists of equal length");
      std::size_t n = 0;
      for (const auto& [key, values] : group.entries()) {
        check_key(values, key);
        const auto size = list_of(values).items().size();
        if (n && size != n)
          values.fail("paired lists change together, so they need the same length: " +
                      std::to_string(size) + " values here, " + std::to_string(n) +
                      " in the first");
        n = size;
        s.axes.push_back(key);
      }
      Axis axis(n);
      for (const auto& [key, values] : group.entries())
        for (std::size_t i = 0; i < n; ++i) {
          const auto text = to_flow_yaml(values.items()[i]);
          axis[i].label += (axis[i].label.empty() ? "" : ", ") + key + "=" + text;
          axis[i].overrides.push_back(override_of(key, values.items()[i]));
          axis[i].values.emplace_back(key, text);
        }
      axes.push_back(std::move(axis));
    }
  if (p.has("random")) {
    axes.push_back(random_axis(p.at("random")));
    for (const auto& [key, dist] : p.at("random").at("keys").entries()) s.axes.push_back(key);
  }

  std::vector<std::uint64_t> seeds;
  if (p.has("seeds")) {
    std::set<std::int64_t> seen;
    for (const auto& v : list_of(p.at("seeds")).items()) {
      const auto seed = v.as_non_negative_int();
      if (!seen.insert(seed).second) v.fail("seed " + std::to_string(seed) + " is listed twice");
      seeds.push_back(static_cast<std::uint64_t>(seed));
    }
  } else {
    seeds.push_back(static_cast<std::uint64_t>(load_recipe(s.recipe).get_int("seed", 0)));
  }

  // The settings: the product of the axes, the first axis changing slowest.
  std::vector<Choice> settings{Choice{}};
  for (const auto& axis : axes) {
    std::vector<Choice> next;
    for (const auto& base : settings)
      for (const auto& c : axis) {
        Choice merged = base;
        merged.label += (merged.label.empty() ? "" : ", ") + c.label;
        merged.overrides.insert(merged.overrides.end(), c.overrides.begin(), c.overrides.end());
        merged.values.insert(merged.values.end(), c.values.begin(), c.values.end());
        next.push_back(std::move(merged));
      }
    settings = std::move(next);
  }
  std::set<std::string> hashes;
  for (auto& setting : settings) {
    auto overrides = fixed;
    overrides.insert(overrides.end(), setting.overrides.begin(), setting.overrides.end());
    std::string joined;
    for (const auto& o : overrides) joined += o + "\n";
    const auto h = fnv1a(joined);
    char hex[16];
    std::snprintf(hex, sizeof hex, "%08x", static_cast<unsigned>((h ^ (h >> 32)) & 0xffffffffu));
    if (!hashes.insert(hex).second) continue;  // the same overrides twice run once
    for (const auto seed : seeds) {
      Trial t;
      t.index = s.trials.size();
      t.setting = hex;
      t.label = setting.label.empty() ? "base" : setting.label;
      t.seed = seed;
      t.overrides = overrides;
      t.values = setting.values;
      t.id = slug(t.label) + "-" + hex + "-seed" + std::to_string(seed);
      t.dir = s.dir / "trials" / t.id;
      s.trials.push_back(std::move(t));
    }
  }
  return s;
}

void validate_sweep(const Sweep& s) {
  for (const auto& t : s.trials) {
    Recipe r;
    try {
      r = Recipe::from_params(load_recipe(s.recipe, t.run_overrides()), s.recipe);
    } catch (const Error& e) {
      throw ParamError(s.file.string() + ": trial " + t.id + " (" + t.label + "): " + e.what());
    }
    if (!r.eval.metrics.empty() &&
        std::find(r.eval.metrics.begin(), r.eval.metrics.end(), s.metric) == r.eval.metrics.end())
      throw ParamError(s.file.string() + ": metric: the sweep reports \"" + s.metric +
                       "\", but trial " + t.id + "'s recipe evaluates only eval.metrics [" +
                       [&] {
                         std::string m;
                         for (const auto& x : r.eval.metrics) m += (m.empty() ? "" : ", ") + x;
                         return m;
                       }() +
                       "]");
  }
}

json Sweep::to_json() const {
  json trials_json = json::array();
  for (const auto& t : trials) {
    json values = json::array();
    for (const auto& [k, v] : t.values) values.push_back({k, v});
    trials_json.push_back({{"index", t.index},
                           {"id", t.id},
                           {"setting", t.setting},
                           {"label", t.label},
                           {"seed", t.seed},
                           {"overrides", t.overrides},
                           {"values", values}});
  }
  return {{"sweep_file", file.string()},
          {"recipe", recipe.string()},
          {"metric", metric},
          {"lower_is_better", lower_is_better},
          {"trial_threads", trial_threads},
          {"trial_nproc", trial_nproc},
          {"workers", workers},
          {"axes", axes},
          {"trials", trials_json}};
}

Sweep Sweep::from_json(const json& j, const fs::path& dir) {
  Sweep s;
  s.file = j.at("sweep_file").get<std::string>();
  s.recipe = j.at("recipe").get<std::string>();
  s.dir = dir;
  s.metric = j.at("metric").get<std::string>();
  s.lower_is_better = j.at("lower_is_better").get<bool>();
  s.trial_threads = j.at("trial_threads").get<int>();
  s.trial_nproc = j.value("trial_nproc", 1);
  s.workers = j.at("workers").get<int>();
  s.axes = j.at("axes").get<std::vector<std::string>>();
  for (const auto& tj : j.at("trials")) {
    Trial t;
    t.index = tj.at("index").get<std::size_t>();
    t.id = tj.at("id").get<std::string>();
    t.setting = tj.at("setting").get<std::string>();
    t.label = tj.at("label").get<std::string>();
    t.seed = tj.at("seed").get<std::uint64_t>();
    t.overrides = tj.at("overrides").get<std::vector<std::string>>();
    for (const auto& kv : tj.at("values"))
      t.values.emplace_back(kv.at(0).get<std::string>(), kv.at(1).get<std::string>());
    t.dir = dir / "trials" / t.id;
    s.trials.push_back(std::move(t));
  }
  return s;
}

}  // namespace graft
