// What the peft readers and writers of every plugin share: settings built from adapter_config.json
// (errors naming that file), and the whole modules and biases that peft saves beside a method
// (modules_to_save, bias "all" / "lora_only"), which become, in graft, a layer_select method
// holding those parameters, and go back into peft's files from one.
#pragma once

#include <graft/peft.h>
#include <graft/plugin.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace graft::plugins::peft_shared {

/// A method's settings as a peft reader builds them: every value remembers adapter_config.json.
class Settings {
 public:
  explicit Settings(std::string file) : where_{std::move(file), 0, 0} {
    params_ = Params::map("", where_);
  }
  /// key: value, where `origin` is the adapter_config.json key it came from.
  void set(const std::string& key, const std::string& value, const std::string& origin) {
    params_.set(key, scalar(value, origin));
  }
  void set(const std::string& key, double value, const std::string& origin) {
    params_.set(key, scalar(value, origin));
  }
  void set(const std::string& key, std::int64_t value, const std::string& origin) {
    set(key, std::to_string(value), origin);
  }
  void set(const std::string& key, bool value, const std::string& origin) {
    set(key, std::string(value ? "true" : "false"), origin);
  }
  /// A list of site names, and a map of site name -> value.
  void set_list(const std::string& key, const std::vector<std::string>& items,
                const std::string& origin) {
    auto list = Params::list(origin, where_);
    for (const auto& item : items) list.add(scalar(item, origin));
    params_.set(key, list);
  }
  Params map(const std::string& origin) const { return Params::map(origin, where_); }
  Params scalar(const std::string& value, const std::string& origin) const {
    return Params::scalar(value, origin, where_);
  }
  /// A number written with every digit it has.
  Params scalar(double value, const std::string& origin) const {
    std::ostringstream os;
    os.precision(17);
    os << value;
    return scalar(os.str(), origin);
  }
  void set(const std::string& key, Params value) { params_.set(key, std::move(value)); }
  const Params& params() const { return params_; }

 private:
  Source where_;
  Params params_;
};

/// The method graft holds peft's module copies and trained biases with.
inline const std::string kMethod = "layer_select";

/// Adds to `methods` a layer_select holding `tensors` (the tensors of a peft adapter that its
/// method's reader did not take), attached to `model` with their values loaded; nothing when
/// there are none. Errors name `source`.
inline void read(const io::TensorMap& tensors, Model& model, const std::string& source,
                 std::vector<std::unique_ptr<Method>>& methods) {
  const auto parameters = peft::base_parameters(tensors, model, source);
  if (parameters.empty()) return;
  const Source where{source, 0, 0};
  auto settings = Params::map("", where);
  auto names = Params::list("parameters", where);
  for (const auto& [name, t] : parameters) names.add(Params::scalar(name, "parameters", where));
  settings.set("parameters", names);
  std::unique_ptr<Method> method;
  try {
    method = make_method(kMethod, settings);
  } catch (const Error& e) {
    throw FileError(source, std::string("holds whole modules or biases (modules_to_save, bias), "
                                        "which graft loads with the ") +
                                kMethod + " plugin: " + e.what());
  }
  method->attach(model);
  method->load_state(parameters, source);
  methods.push_back(std::move(method));
}

/// What a peft method's files can hold beside its own tensors.
enum class Extras {
  modules_and_biases,  ///< modules_to_save and a bias setting (LoRA)
  modules,             ///< modules_to_save only (the other tuners)
  prompt_learning,     ///< modules_to_save under prompt learning's names
};

/// The companions of a method being written in peft's format (methods[1..]) as peft saves them.
/// Only whole base parameters trained in place have a place there; `wrapped` are the peft module
/// paths the method adapts (for bias "lora_only").
inline peft::SavedModules write(const std::vector<Method*>& methods, const Model& model,
                                const std::vector<std::string>& wrapped, Extras extras) {
  io::TensorMap parameters;
  for (std::size_t i = 1; i < methods.size(); ++i) {
    if (methods[i]->name() != kMethod)
      throw Error("peft format: an adapter of " + methods[0]->name() + " has no place for " +
                  methods[i]->name() + " (peft keeps one method, with whole modules and biases)");
    for (const auto& [name, t] : methods[i]->state()) parameters[name] = t;
  }
  auto saved = peft::saved_modules(parameters, model, wrapped, extras == Extras::prompt_learning);
  if (saved.bias != "none" && extras != Extras::modules_and_biases)
    throw Error("peft format: peft's " + methods[0]->name() +
                " adapters have no bias setting; the trained biases have no place there");
  return saved;
}

/// The keys every adapter_config.json carries, for a writer: peft_type, task_type,
/// inference_mode, modules_to_save (from `saved`), base_model_name_or_path and revision.
inline nlohmann::json config(const std::string& peft_type, const Model& model,
                             const peft::SavedModules& saved) {
  return {
      {"peft_type", peft_type},
      {"task_type", peft::task_type(model.config())},
      {"inference_mode", true},
      {"modules_to_save",
       saved.modules_to_save.empty() ? nlohmann::json() : nlohmann::json(saved.modules_to_save)},
      {"base_model_name_or_path", model.config().name_or_path.empty()
                                      ? nlohmann::json()
                                      : nlohmann::json(model.config().name_or_path)},
      {"revision", nullptr}};
}

}  // namespace graft::plugins::peft_shared
