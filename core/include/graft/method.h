// PEFT methods: what a plugin provides. A method reads its settings from a graft::Params,
// attaches hooks to the sites it selects, and exposes its trainable parameters and its state.
#pragma once

#include <graft/hooks.h>
#include <graft/io/tensors.h>
#include <graft/model.h>
#include <graft/params.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace graft {

class Method;

/// How several adapters of one method become one (graft combine; peft's add_weighted_adapter).
struct CombineOptions {
  std::string type;             ///< linear, cat, svd, ties, magnitude_prune, dare_linear, ...
  std::vector<double> weights;  ///< one per source
  double density = 1.0;         ///< the share each source keeps (ties, magnitude_prune, dare)
  std::string majority_sign = "total";  ///< ties: the sign of the sum (total) or of the count
  std::int64_t svd_rank = 0;            ///< svd: the new rank (0: the largest source rank)
  double svd_clamp = 0;    ///< svd: clamp the factors to this quantile of their entries (0: none)
  std::uint64_t seed = 0;  ///< dare: the seed of the random masks
};

/// Builds one new method from `sources` (attached methods of the plugin's own method, at least
/// two), attaches it to `model` and gives it the combined state. Errors say what of the sources
/// or options cannot be combined.
using Combiner = std::function<std::unique_ptr<Method>(
    const std::vector<Method*>& sources, const CombineOptions& options, Model& model)>;

/// A Combiner of type "linear" for methods whose sources all have the same settings: the new
/// method, made and attached with those settings, holds sum_i w_i * state_i tensor by tensor
/// (AdapterHub's average_adapter with its weights as given). Sources whose settings differ are
/// refused naming the first difference. A plugin registers it where that sum means something.
Combiner linear_state_combiner();

/// What `graft methods` shows about a method.
struct MethodInfo {
  std::string name;                       ///< the name recipes use ("my_method")
  std::string version;                    ///< the plugin's version
  std::string description;                ///< one line
  bool mergeable = false;                 ///< can fold into the base weights
  std::vector<std::string> points;        ///< the site points it may attach to
  std::vector<std::string> combinations;  ///< the CombineOptions types `combine` offers
  Combiner combine;                       ///< empty: adapters of the method do not combine
};

/// One method instance, configured and (after attach) attached to one model.
class Method {
 public:
  virtual ~Method() = default;
  /// The method's name as registered.
  virtual std::string name() const = 0;
  /// Selects sites and attaches hooks; may also unfreeze base parameters (methods that train them
  /// in place). Throws graft::Error (a selection matching nothing, a site the method cannot use).
  virtual void attach(Model& model) = 0;
  /// Removes everything attach() did.
  virtual void detach(Model& model) = 0;
  /// The tensors the optimizer trains, by stable name ("layers.3.attn.q.<parameter>").
  virtual std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() = 0;
  /// What is saved in an adapter file, by the same names.
  virtual io::TensorMap state() = 0;
  /// Restores state(); every tensor must be present with its shape (errors name `source`).
  virtual void load_state(const io::TensorMap& state, const std::string& source) = 0;
  /// The resolved settings, saved next to the state so that the method can be rebuilt.
  virtual nlohmann::json config() const = 0;
  /// Switches dropout and similar between training and evaluation.
  virtual void set_training(bool /*on*/) {}
  /// Whether the method must see a few training batches after attach() and before training
  /// (a method choosing what it trains from gradient magnitudes).
  virtual bool needs_calibration() const { return false; }
  /// Runs the calibration: `loss` computes the loss of the next training batch (a scalar with
  /// a graph); the method calls it as often as it needs.
  virtual void calibrate(Model& /*model*/, const std::function<at::Tensor()>& /*loss*/) {}
  /// Everything needed to continue training exactly (checkpoints): by default state() plus every
  /// trainable tensor as "train.<name>".
  virtual io::TensorMap checkpoint_state();
  /// Restores checkpoint_state() onto a freshly attached method.
  virtual void load_checkpoint_state(const io::TensorMap& state, const std::string& source);
  /// One line for the run log about what attach() did beyond adding parameters (the memory a
  /// quantised base saves); empty when there is nothing to say.
  virtual std::string report() const { return {}; }
  /// Multiplies the method's update by `scale` (1: as trained), as llama.cpp's scaled adapters
  /// and peft's scale_layer do; the scale is part of the method's settings from then on. A
  /// method whose update has no such scale throws graft::Error.
  virtual void set_scale(double scale);
  /// Folds the method into the base weights; unmerge() takes it out again.
  virtual void merge(Model& model);
  virtual void unmerge(Model& model);
  virtual bool merged() const { return false; }
};

/// A Method built from hooks: keeps (site, hook) pairs, attaches and detaches them, names their
/// parameters "<site>.<parameter>", saves and loads them, and merges linear deltas and mergeable
/// weight transforms. Most plugins derive from it and implement attach() and config().
class HookMethod : public Method {
 public:
  void detach(Model& model) override;
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override;
  io::TensorMap state() override;
  void load_state(const io::TensorMap& state, const std::string& source) override;
  void set_training(bool on) override;
  void merge(Model& model) override;
  void unmerge(Model& model) override;
  bool merged() const override { return merged_; }

 protected:
  /// Attaches `hook` at `site` and remembers it.
  void add_hook(Model& model, const std::string& site, std::shared_ptr<Hook> hook,
                Claim claim = Claim::shared);
  const std::vector<std::pair<std::string, std::shared_ptr<Hook>>>& hook_list() const {
    return hooks_;
  }

 private:
  std::vector<std::pair<std::string, std::shared_ptr<Hook>>> hooks_;
  std::vector<at::Tensor> saved_weights_;  // base weights before merging weight transforms
  std::vector<std::string> untied_;        // sites whose shared weight merging untied
  bool merged_ = false;
};

/// Which sites a method uses: `targets` are site points ("attn.q"), glob patterns over site
/// names ("layers.*.ffn.up", "*.attn.?") or "all-linear" (every linear site but the head);
/// `layers` are indices and ranges ("0-3") or "all"; `leave_out` removes layers.
struct Selection {
  std::vector<std::string> targets;
  std::vector<std::int64_t> layers;  ///< empty: every layer
  std::vector<std::int64_t> leave_out;
  Params where;  ///< the settings they came from, for errors

  /// Reads the keys targets, layers and leave_out of `params`.
  static Selection from_params(const Params& params, std::vector<std::string> default_targets);
  /// The keys targets, layers and leave_out (the last two only when set), for a method's config().
  nlohmann::json to_json() const;
};

/// The sites of `model` a selection picks, in model order. A selection matching nothing is an
/// error listing the points and a few site names that exist.
std::vector<Site> select_sites(const Model& model, const Selection& selection,
                               const std::string& method);

/// Shell-style matching: '*' any run of characters, '?' one character.
bool glob_match(const std::string& pattern, const std::string& text);

/// The keys every method accepts besides its own: name (the method), targets, layers, leave_out.
/// Checks that `params` has no other keys than these and `own` (did-you-mean on a typo).
void check_method_keys(const Params& params, const std::vector<std::string>& own);

/// Counts in the style of peft's print_trainable_parameters:
/// "trainable params: 8,960 || all params: 268,992 || trainable%: 3.3310".
std::string trainable_summary(const Model& model, const std::vector<Method*>& methods);

/// A foreign adapter format a plugin reads and writes for its method (Hugging Face peft's
/// adapter_config.json + adapter_model.safetensors, llama.cpp's GGUF adapters).
struct AdapterFormat {
  std::string name;    ///< "peft", "gguf"
  std::string method;  ///< the method whose adapters it holds
  /// Whether `path` (a folder or file) holds an adapter of this format for this method.
  std::function<bool(const std::filesystem::path&)> detect;
  /// Builds the method from the files, attaches it to `model` and loads its state; the files may
  /// hold more than the method (peft keeps whole modules and biases beside it), which come back
  /// as further methods, attached and loaded. Empty when the format is write-only.
  std::function<std::vector<std::unique_ptr<Method>>(const std::filesystem::path&, Model&)> read;
  /// Writes methods[0] (an attached method made by this plugin) in this format, together with
  /// the other methods of the adapter where the format has a place for them (peft's
  /// modules_to_save); one it has no place for is an error. Empty when read-only.
  std::function<void(const std::vector<Method*>&, const Model&, const std::filesystem::path&)>
      write;

  /// Formats whose one configuration holds the parts of several methods (AdapterHub's
  /// adapter_config.json, whose "config" may be a "union" of configurations; see
  /// graft/adapterhub.h): the core reads the files and hands each part to the plugin that says
  /// it reads it. read_part builds the method(s) of `part`, attaches them to `model` and loads
  /// their state, taking their tensors out of `tensors` (what is left belongs to other parts;
  /// anything left at the end is refused). `name` is the adapter's name inside the tensor names.
  std::function<bool(const nlohmann::json& part)> reads_part;
  std::function<std::vector<std::unique_ptr<Method>>(
      const nlohmann::json& part, const std::string& name, io::TensorMap& tensors, Model& model,
      const std::string& source)>
      read_part;
  /// The other direction: `method` (made by this plugin, attached to `model`) as one part of such
  /// a configuration and the tensors it saves, named for adapter `name`. Errors say what of the
  /// method has no place in the format.
  std::function<std::pair<nlohmann::json, io::TensorMap>(Method& method, const Model& model,
                                                         const std::string& name)>
      write_part;
};

/// Plugins register their methods (and the foreign formats they read and write) here.
using MethodFactory = std::function<std::unique_ptr<Method>(const Params&)>;
class Registry {
 public:
  virtual ~Registry() = default;
  /// Registers a method; a name already registered is an error.
  virtual void add(MethodInfo info, MethodFactory factory) = 0;
  /// Registers a foreign adapter format for one of this plugin's methods.
  virtual void add_format(AdapterFormat format) = 0;
};

}  // namespace graft
