// Named adapters on one base model: load several, choose the active ones, switch them all off,
// unload one, and route the rows of one batch to different adapters (peft's load_adapter,
// set_adapter, disable_adapter, delete_adapter and mixed batches with adapter_names).
//
//   AdapterSet set(model);
//   set.load("math", "runs/math/adapter");
//   set.load("chat", "runs/chat/adapter");
//   set.set_active({"math"});              // only math
//   set.set_active({});                    // the base model, bit for bit
//   set.route({"math", "chat", "__base__"});  // row 0 math, row 1 chat, row 2 the base
//
// The set attaches and detaches the hooks the adapters' methods attached when they were loaded:
// an inactive adapter has nothing attached, so its sites cost nothing and the base is exact.
#pragma once

#include <graft/method.h>
#include <graft/model.h>

#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace graft {

/// What a route names for rows that take no adapter (peft's "__base__"; "base" is taken too).
inline constexpr const char* kBaseRoute = "__base__";

/// Whether `name` may name an adapter: letters, digits, '_', '-' and '.', and not a route's word
/// for no adapter.
bool is_adapter_name(const std::string& name);
/// The name an adapter at `path` goes by when none is given: its folder's name, or its file's
/// without the extension, with any other character as '_'.
std::string default_adapter_name(const std::filesystem::path& path);
/// "NAME=PATH" split into its name and path, or a plain path with its default name. A text
/// that names an existing file or folder is a path, '=' or not.
std::pair<std::string, std::filesystem::path> adapter_name_and_path(const std::string& text);

class AdapterSet {
 public:
  /// A set of adapters on `model`, which must outlive it.
  explicit AdapterSet(Model& model);
  /// Unloads every adapter it holds.
  ~AdapterSet();
  AdapterSet(const AdapterSet&) = delete;
  AdapterSet& operator=(const AdapterSet&) = delete;

  /// Loads the adapter at `path` (any format load_adapter reads) under `name`, in evaluation
  /// mode, and adds it to the active ones. The name must be new and made of letters, digits,
  /// '_', '-' and '.' ("__base__" and "base" are the routes' word for no adapter). An adapter
  /// whose methods change the base model's own tensors (trained norms, full fine-tuning) loads,
  /// but stays on: it cannot be switched off, unloaded or routed, and saying so is an error.
  void load(const std::string& name, const std::filesystem::path& path);
  /// Unloads `name`: its methods are detached and the model is as if it had never been loaded.
  void unload(const std::string& name);

  /// The names loaded, in load order.
  std::vector<std::string> names() const;
  /// The active names, in the order their hooks are attached.
  const std::vector<std::string>& active() const { return active_; }
  /// Makes exactly `names` active, attached in that order (updates at a site are summed; adapters
  /// that follow one another at a site, as bottleneck adapters, run in that order). Empty: every
  /// adapter off, the base model bit for bit.
  void set_active(const std::vector<std::string>& names);
  /// The methods of adapter `name`.
  std::vector<Method*> methods(const std::string& name) const;

  /// Routes the rows of the following forwards: row i takes adapter rows[i] alone, or none for
  /// kBaseRoute, each row computed as if it were alone (within float32 reordering). The batch
  /// stays one set of products for the base; each routed adapter runs once on its rows. The
  /// adapters named must act row by row (low-rank deltas, scales, bottleneck adapters); key/value
  /// prefixes, soft prompts and weight transforms are refused by name. Ends with end_route().
  void route(const std::vector<std::string>& rows);
  /// Ends the routing: the active adapters apply to every row again.
  void end_route();
  bool routed() const { return routed_; }

 private:
  struct Attachment {
    std::string site;
    std::shared_ptr<Hook> hook;
    std::string owner;  // the name attach() knows the hook's method by
    Claim claim = Claim::shared;
  };
  struct Entry {
    std::string name;
    std::vector<std::unique_ptr<Method>> methods;
    std::vector<Attachment> attachments;  // in attach order
    std::string in_place;                 // the base tensors it changes ("" when none)
  };
  Entry& entry(const std::string& name, const char* what);
  const Entry& entry(const std::string& name, const char* what) const;
  // Attaches exactly the hooks of `names`, in that order (a no-op when they already are).
  void attach_only(const std::vector<std::string>& names);
  // An error when `e` changes the base in place and so cannot be `what` (switched off, ...).
  void check_removable(const Entry& e, const std::string& what) const;

  Model& model_;
  std::vector<Entry> entries_;
  std::vector<std::string> active_;    // what set_active() chose
  std::vector<std::string> attached_;  // what is attached now (the route's while routed)
  bool routed_ = false;
};

}  // namespace graft
