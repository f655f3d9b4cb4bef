// graft ls and graft cp: the shipped recipes and building blocks, to list and to copy for editing.
#include <graft/io/file.h>
#include <graft/params.h>
#include <graft/recipe.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <regex>

#include "cli/options.h"

namespace graft::cli {
namespace fs = std::filesystem;

namespace {

// Every shipped YAML file by its short name: "quickstart", "sweeps/NAME", "configs/methods/NAME".
std::vector<std::pair<std::string, fs::path>> shipped(const fs::path& root) {
  std::vector<std::pair<std::string, fs::path>> out;
  for (const char* top : {"recipes", "configs"}) {
    const auto first = out.size();
    if (!fs::is_directory(root / top)) continue;
    for (const auto& e : fs::recursive_directory_iterator(root / top)) {
      if (!e.is_regular_file() || e.path().extension() != ".yaml") continue;
      auto name = fs::relative(e.path(), root / "recipes").replace_extension().string();
      if (std::string(top) == "configs")
        name = fs::relative(e.path(), root).replace_extension().string();
      out.emplace_back(name, e.path());
    }
    std::sort(out.begin() + static_cast<std::ptrdiff_t>(first), out.end());
  }
  return out;
}

// A recipe's first comment line, as its description.
std::string summary(const fs::path& file) {
  std::istringstream in(io::read_text_file(file));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("# ", 0) == 0) return line.substr(2);
    if (!line.empty() && line[0] != '#') break;
  }
  return "";
}

}  // namespace

int run_ls(const Args& args) {
  po::options_description desc("options");
  po::variables_map vm;
  if (!parse(args, desc, vm, "usage: graft ls")) return 0;
  const auto root = shipped_recipes_root();
  const auto all = shipped(root);
  std::size_t w = 0;
  for (const auto& [name, file] : all) w = std::max(w, name.size());
  std::cout << "recipes (graft run NAME.yaml from " << (root / "recipes").string()
            << ", or graft cp NAME to edit a copy):\n";
  bool configs = false;
  for (const auto& [name, file] : all) {
    if (!configs && name.rfind("configs/", 0) == 0) {
      configs = true;
      std::cout << "\nbuilding blocks that recipes include:\n";
    }
    auto line = summary(file);
    if (line.size() > 90) line = line.substr(0, 87) + "...";
    std::cout << "  " << name << std::string(w - name.size() + 2, ' ') << line << "\n";
  }
  return 0;
}

int run_cp(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("name", po::value<std::string>()->required(),
                     "a shipped recipe or building block, as graft ls names it")(
      "dest", po::value<std::string>()->required(), "the file (or folder) to write");
  po::positional_options_description pos;
  pos.add("name", 1).add("dest", 1);
  po::variables_map vm;
  if (!parse(args, desc, vm, "usage: graft cp NAME DEST", &pos)) return 0;
  const auto root = shipped_recipes_root();
  const auto all = shipped(root);
  auto name = vm["name"].as<std::string>();
  if (fs::path(name).extension() == ".yaml") name = fs::path(name).replace_extension().string();
  if (name.rfind("recipes/", 0) == 0) name = name.substr(8);
  fs::path source;
  std::vector<std::string> names;
  for (const auto& [n, file] : all) {
    names.push_back(n);
    if (n == name) source = file;
  }
  if (source.empty()) {
    const auto near = did_you_mean(name, names);
    throw UsageError("no shipped recipe or building block \"" + name + "\"" +
                     (near.empty() ? "" : " (did you mean \"" + near + "\"?)") +
                     "; graft ls lists them");
  }
  fs::path dest = vm["dest"].as<std::string>();
  if (fs::is_directory(dest)) dest /= source.filename();
  if (fs::exists(dest)) throw UsageError(dest.string() + ": already exists; choose a new name");
  if (dest.extension() != ".yaml") dest += ".yaml";
  // Includes point into the shipped configs/: rewritten to reach them from the copy's folder.
  const auto text = io::read_text_file(source);
  const auto to = fs::absolute(dest).parent_path();
  if (!fs::is_directory(to)) throw UsageError(to.string() + ": no such folder");
  const std::regex path(R"([A-Za-z0-9_./-]+\.yaml)");
  std::string out;
  auto last = text.cbegin();
  for (std::sregex_iterator it(text.begin(), text.end(), path), end; it != end; ++it) {
    const auto target = source.parent_path() / it->str();
    out.append(last, text.cbegin() + it->position());
    if (fs::is_regular_file(target)) {
      // Relative inside the checkout (or install) the recipes came from; absolute elsewhere.
      const auto abs = fs::canonical(target);
      const auto rel = fs::relative(abs, fs::canonical(to));
      const auto inside = fs::relative(fs::canonical(to), fs::canonical(root));
      const bool within = !inside.empty() && *inside.begin() != "..";
      out += within ? rel.string() : abs.string();
    } else
      out += it->str();
    last = text.cbegin() + it->position() + it->length();
  }
  out.append(last, text.cend());
  io::write_atomically(dest, [&](std::ostream& o) { o << out; });
  std::cout << "copied " << name << " to " << dest.string() << "\n";
  return 0;
}

}  // namespace graft::cli
