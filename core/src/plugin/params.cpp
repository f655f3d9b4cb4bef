#include <graft/params.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace graft {

std::string Source::to_string() const {
  if (file.empty()) return line ? "line " + std::to_string(line) : "";
  if (!line) return file;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column);
}

Params Params::null(std::string path, Source source) {
  Params p;
  p.path_ = std::move(path);
  p.source_ = std::move(source);
  return p;
}

Params Params::scalar(std::string text, std::string path, Source source, bool quoted) {
  Params p;
  p.kind_ = Kind::scalar;
  p.text_ = std::move(text);
  p.quoted_ = quoted;
  p.path_ = std::move(path);
  p.source_ = std::move(source);
  return p;
}

Params Params::list(std::string path, Source source) {
  Params p;
  p.kind_ = Kind::list;
  p.path_ = std::move(path);
  p.source_ = std::move(source);
  return p;
}

Params Params::map(std::string path, Source source) {
  Params p;
  p.kind_ = Kind::map;
  p.path_ = std::move(path);
  p.source_ = std::move(source);
  return p;
}

Params& Params::add(Params item) {
  if (kind_ == Kind::null) kind_ = Kind::list;
  if (kind_ != Kind::list) fail("expected a list");
  items_.push_back(std::move(item));
  return items_.back();
}

Params Params::rebased(const std::string& path) const {
  Params out = *this;
  out.path_ = path;
  for (auto& [key, v] : out.entries_) v = v.rebased(path.empty() ? key : path + "." + key);
  for (std::size_t i = 0; i < out.items_.size(); ++i)
    out.items_[i] = out.items_[i].rebased(path + "[" + std::to_string(i) + "]");
  return out;
}

Params& Params::set(const std::string& key, Params v) {
  if (kind_ == Kind::null) kind_ = Kind::map;
  if (kind_ != Kind::map) fail("expected a map");
  for (auto& [k, old] : entries_)
    if (k == key) {
      old = std::move(v);
      return old;
    }
  entries_.emplace_back(key, std::move(v));
  return entries_.back().second;
}

bool Params::has(const std::string& key) const {
  if (kind_ != Kind::map) return false;
  for (const auto& [k, v] : entries_)
    if (k == key) return !v.is_null();
  return false;
}

const Params& Params::at(const std::string& key) const {
  for (const auto& [k, v] : entries_)
    if (k == key) return v;
  fail("missing key \"" + key + "\"");
}

void Params::fail(const std::string& what) const {
  std::string where = source_.to_string();
  std::string msg;
  if (!where.empty()) msg += where + ": ";
  if (!path_.empty()) msg += path_ + ": ";
  throw ParamError(msg + what);
}

std::string Params::got() const {
  switch (kind_) {
    case Kind::null:
      return "nothing";
    case Kind::list:
      return "a list";
    case Kind::map:
      return "a map";
    case Kind::scalar:
      return "\"" + text_ + "\"";
  }
  return "";
}

std::int64_t Params::as_int() const {
  if (kind_ == Kind::scalar && !quoted_ && !text_.empty()) {
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(text_.c_str(), &end, 10);
    if (errno == 0 && end && *end == '\0') return v;
  }
  fail("expected an integer, got " + got());
}

std::int64_t Params::as_positive_int() const {
  try {
    auto v = as_int();
    if (v > 0) return v;
  } catch (const ParamError&) {
  }
  fail("expected a positive integer, got " + got());
}

std::int64_t Params::as_non_negative_int() const {
  try {
    auto v = as_int();
    if (v >= 0) return v;
  } catch (const ParamError&) {
  }
  fail("expected a non-negative integer, got " + got());
}

double Params::as_double() const {
  if (kind_ == Kind::scalar && !quoted_ && !text_.empty()) {
    errno = 0;
    char* end = nullptr;
    double v = std::strtod(text_.c_str(), &end);
    if (errno == 0 && end && *end == '\0' && std::isfinite(v)) return v;
  }
  fail("expected a number, got " + got());
}

double Params::as_probability() const {
  try {
    auto v = as_double();
    if (v >= 0 && v < 1) return v;
  } catch (const ParamError&) {
  }
  fail("expected a number in [0, 1), got " + got());
}

bool Params::as_bool() const {
  if (kind_ == Kind::scalar && !quoted_) {
    if (text_ == "true" || text_ == "True" || text_ == "yes") return true;
    if (text_ == "false" || text_ == "False" || text_ == "no") return false;
  }
  fail("expected true or false, got " + got());
}

std::string Params::as_string() const {
  if (kind_ != Kind::scalar) fail("expected a string, got " + got());
  return text_;
}

std::vector<std::string> Params::as_strings() const {
  if (kind_ == Kind::scalar) return {text_};
  if (kind_ != Kind::list) fail("expected a string or a list of strings, got " + got());
  std::vector<std::string> out;
  for (const auto& i : items_) out.push_back(i.as_string());
  return out;
}

std::string Params::as_choice(const std::vector<std::string>& choices) const {
  auto s = as_string();
  if (std::find(choices.begin(), choices.end(), s) != choices.end()) return s;
  std::string list;
  for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
  auto near = did_you_mean(s, choices);
  fail("expected one of " + list + ", got \"" + s + "\"" +
       (near.empty() ? "" : " (did you mean \"" + near + "\"?)"));
}

std::int64_t Params::get_int(const std::string& key, std::int64_t fallback) const {
  return has(key) ? at(key).as_int() : fallback;
}
std::int64_t Params::get_positive_int(const std::string& key, std::int64_t fallback) const {
  return has(key) ? at(key).as_positive_int() : fallback;
}
double Params::get_double(const std::string& key, double fallback) const {
  return has(key) ? at(key).as_double() : fallback;
}
bool Params::get_bool(const std::string& key, bool fallback) const {
  return has(key) ? at(key).as_bool() : fallback;
}
std::string Params::get_string(const std::string& key, const std::string& fallback) const {
  return has(key) ? at(key).as_string() : fallback;
}
std::vector<std::string> Params::get_strings(const std::string& key,
                                             const std::vector<std::string>& fallback) const {
  return has(key) ? at(key).as_strings() : fallback;
}
std::string Params::get_choice(const std::string& key, const std::vector<std::string>& choices,
                               const std::string& fallback) const {
  return has(key) ? at(key).as_choice(choices) : fallback;
}

void Params::check_keys(const std::vector<std::string>& allowed) const {
  if (kind_ == Kind::null) return;
  if (kind_ != Kind::map) fail("expected a map of settings, got " + got());
  std::string unknown;  // every unknown key of the map, one line each
  for (const auto& [k, v] : entries_) {
    if (std::find(allowed.begin(), allowed.end(), k) != allowed.end()) continue;
    auto near = did_you_mean(k, allowed);
    Params at_key = v;
    if (at_key.source_.line == 0 && at_key.source_.file.empty()) at_key.source_ = source_;
    at_key.path_ = path_.empty() ? k : path_ + "." + k;
    try {
      at_key.fail("unknown key" +
                  (near.empty() ? std::string() : " (did you mean \"" + near + "\"?)"));
    } catch (const ParamError& e) {
      unknown += (unknown.empty() ? "" : "\n") + std::string(e.what());
    }
  }
  if (!unknown.empty()) throw ParamError(unknown);
}

std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates) {
  // What Hugging Face peft and transformers, torchtune and AdapterHub call graft's keys.
  static const std::pair<const char*, const char*> kSpellings[] = {
      {"lora_alpha", "alpha"},
      {"lora_rank", "r"},
      {"rank", "r"},
      {"lora_r", "r"},
      {"target_modules", "targets"},
      {"lora_attn_modules", "targets"},
      {"lora_dropout", "dropout"},
      {"use_rslora", "rslora"},
      {"init_lora_weights", "init"},
      {"layers_to_transform", "layers"},
      {"learning_rate", "lr"},
      {"max_steps", "steps"},
      {"max_steps_per_epoch", "steps"},
      {"num_train_epochs", "epochs"},
      {"per_device_train_batch_size", "batch_size"},
      {"gradient_accumulation_steps", "gradient_accumulation"},
      {"lr_scheduler_type", "schedule"},
      {"lr_scheduler", "schedule"},
      {"num_warmup_steps", "warmup_steps"},
      {"clip_grad_norm", "max_grad_norm"},
      {"optim", "optimizer"},
      {"adam_beta1", "beta1"},
      {"adam_beta2", "beta2"},
      {"adam_epsilon", "eps"},
      {"logging_steps", "log_every"},
      {"log_every_n_steps", "log_every"},
      {"eval_steps", "every"},
      {"save_steps", "every"},
      {"save_total_limit", "keep"},
      {"output_dir", "dir"},
      {"model_name_or_path", "path"},
      {"checkpoint_dir", "path"},
      {"max_seq_len", "max_length"},
      {"max_seq_length", "max_length"},
      {"prefix_length", "num_virtual_tokens"},
  };
  for (const auto& [foreign, ours] : kSpellings)
    if (word == foreign &&
        std::find(candidates.begin(), candidates.end(), ours) != candidates.end())
      return ours;
  std::string best;
  std::size_t best_d = std::max<std::size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    std::vector<std::size_t> prev(c.size() + 1), cur(c.size() + 1);
    for (std::size_t j = 0; j <= c.size(); ++j) prev[j] = j;
    for (std::size_t i = 1; i <= word.size(); ++i) {
      cur[0] = i;
      for (std::size_t j = 1; j <= c.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (word[i - 1] != c[j - 1])});
      std::swap(prev, cur);
    }
    if (prev[c.size()] < best_d) {
      best_d = prev[c.size()];
      best = c;
    }
  }
  return best;
}

}  // namespace graft
