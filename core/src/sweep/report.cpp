// graft report: tables (CSV, Markdown) and SVG charts from a sweep folder's run folders.
#include <graft/io/file.h>
#include <graft/io/json.h>
#include <graft/sweep.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>

#include "sweep/internal.h"
#include "sweep/svg.h"

namespace graft {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct TrialResult {
  const Trial* trial = nullptr;
  std::string status;
  std::optional<json> summary;
  std::optional<double> metric, before;
  std::vector<std::pair<double, double>> train_loss, eval_metric;  // (step, value)
};

struct Stats {
  double mean = NAN, std = NAN;
  std::size_t n = 0;
};

Stats stats(const std::vector<double>& v) {
  Stats s;
  s.n = v.size();
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  if (v.size() > 1) {
    double ss = 0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.std = std::sqrt(ss / static_cast<double>(v.size() - 1));  // sample standard deviation
  }
  return s;
}

struct Setting {
  std::string hash, label;
  std::vector<const TrialResult*> trials;
  Stats metric, before, seconds;
  double peak_mib = NAN;
  std::int64_t trainable = -1, model_parameters = -1;
  std::size_t failed = 0, unfinished = 0;
};

std::string exact(double v) {  // CSV: every bit of the double
  if (!std::isfinite(v)) return "";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

std::string fixed(double v, int digits) {
  if (!std::isfinite(v)) return "-";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string commas(std::int64_t n) {
  if (n < 0) return "-";
  auto s = std::to_string(n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3)
    s.insert(static_cast<std::size_t>(i), ",");
  return s;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::string md_cell(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '|' ? std::string("\\|") : std::string(1, c);
  return out;
}

std::string file_slug(const std::string& key) {
  std::string out;
  for (char c : key) out += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return out;
}

std::optional<double> as_number(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

void read_curves(TrialResult& r, const std::string& metric) {
  const auto file = r.trial->dir / "metrics.jsonl";
  if (!fs::exists(file)) return;
  std::istringstream in(io::read_text_file(file));
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) throw FileError(file.string(), "a line is not valid JSON");
    const auto step = j.value("step", 0.0);
    const auto split = j.value("split", std::string());
    if (split == "train" && j.contains("loss"))
      r.train_loss.emplace_back(step, j["loss"].get<double>());
    if (split == "eval" && j.contains(metric) && j[metric].is_number())
      r.eval_metric.emplace_back(step, j[metric].get<double>());
  }
}

// The mean over a setting's trials at each step that all of them logged.
svg::Series mean_curve(const Setting& s,
                       std::vector<std::pair<double, double>> TrialResult::*curve) {
  std::map<double, std::vector<double>> at;
  std::size_t with = 0;
  for (const auto* t : s.trials) {
    if ((t->*curve).empty() || t->status != "done") continue;
    ++with;
    for (const auto& [step, v] : t->*curve) at[step].push_back(v);
  }
  svg::Series out;
  out.name = s.label;
  for (const auto& [step, values] : at)
    if (values.size() == with) {
      out.x.push_back(step);
      out.y.push_back(stats(values).mean);
    }
  return out;
}

void write_file(const fs::path& path, const std::string& text) {
  io::write_atomically(path, [&](std::ostream& out) { out << text; });
}

}  // namespace

std::string report_sweep(const fs::path& dir) {
  const auto spec_file = dir / "sweep.json";
  if (!fs::exists(spec_file))
    throw FileError(dir.string(),
                    "not a sweep folder (no sweep.json): give the output folder of "
                    "'graft sweep'");
  const json spec = io::read_json_file(spec_file);
  const auto sweep = Sweep::from_json(spec, dir);
  TrialStore store(dir / "sweep.db");
  store.sync(sweep);  // the run folders are the truth: the store follows them
  std::map<std::string, std::string> status, error;
  for (const auto& row : store.rows()) {
    status[row.id] = row.status;
    if (row.status == "failed") error[row.id] = row.error;
  }

  std::vector<TrialResult> results(sweep.trials.size());
  for (std::size_t i = 0; i < sweep.trials.size(); ++i) {
    auto& r = results[i];
    r.trial = &sweep.trials[i];
    r.status = status.count(r.trial->id) ? status[r.trial->id] : "pending";
    r.summary = sweep_detail::read_summary(r.trial->dir);
    if (r.summary) {
      r.metric = sweep_detail::metric_of(*r.summary, sweep.metric);
      const auto b = r.summary->value("eval_before", json::object());
      if (b.contains(sweep.metric) && b[sweep.metric].is_number())
        r.before = b[sweep.metric].get<double>();
    }
    read_curves(r, sweep.metric);
  }

  std::vector<Setting> settings;
  std::map<std::string, std::size_t> where;
  for (const auto& r : results) {
    const auto [it, fresh] = where.emplace(r.trial->setting, settings.size());
    if (fresh) {
      Setting s;
      s.hash = r.trial->setting;
      s.label = r.trial->label;
      settings.push_back(std::move(s));
    }
    settings[it->second].trials.push_back(&r);
  }
  for (auto& s : settings) {
    std::vector<double> metric, before, seconds;
    for (const auto* t : s.trials) {
      if (!t->summary || !t->metric) {
        (t->status == "failed" ? s.failed : s.unfinished) += 1;
        continue;
      }
      metric.push_back(*t->metric);
      if (t->before) before.push_back(*t->before);
      seconds.push_back(t->summary->value("wall_seconds", NAN));
      const double peak = t->summary->value("peak_memory_mib", NAN);
      s.peak_mib = std::isfinite(s.peak_mib) ? std::max(s.peak_mib, peak) : peak;
      s.trainable = t->summary->value("trainable_parameters", std::int64_t{-1});
      s.model_parameters = t->summary->value("model_parameters", std::int64_t{-1});
    }
    s.metric = stats(metric);
    s.before = stats(before);
    s.seconds = stats(seconds);
  }
  const Setting* best = nullptr;
  for (const auto& s : settings)
    if (s.metric.n && (!best || (sweep.lower_is_better ? s.metric.mean < best->metric.mean
                                                       : s.metric.mean > best->metric.mean)))
      best = &s;

  const auto out = dir / "report";
  fs::create_directories(out / "plots");
  const auto& m = sweep.metric;

  // trials.csv: one row per trial.
  std::string trials_csv = "trial,setting,label,seed,status," + m + "," + m +
                           "_before,trainable_parameters,steps,train_seconds,peak_memory_mib\n";
  for (const auto& r : results) {
    const auto& t = *r.trial;
    trials_csv += csv_field(t.id) + "," + t.setting + "," + csv_field(t.label) + "," +
                  std::to_string(t.seed) + "," + r.status + "," + exact(r.metric.value_or(NAN)) +
                  "," + exact(r.before.value_or(NAN)) + ",";
    if (r.summary)
      trials_csv += std::to_string(r.summary->value("trainable_parameters", 0)) + "," +
                    std::to_string(r.summary->value("steps", 0)) + "," +
                    exact(r.summary->value("wall_seconds", NAN)) + "," +
                    exact(r.summary->value("peak_memory_mib", NAN));
    else
      trials_csv += ",,,";
    trials_csv += "\n";
  }
  write_file(out / "trials.csv", trials_csv);

  // results.csv and results.md: one row per setting.
  std::string csv = "setting,label";
  for (const auto& a : sweep.axes) csv += "," + csv_field(a);
  csv += "," + m + "_mean," + m + "_std,count,failed," + m +
         "_before_mean,trainable_parameters,model_parameters,train_seconds_mean,"
         "peak_memory_mib_max,best\n";
  const std::string direction = sweep.lower_is_better ? "lower is better" : "higher is better";
  std::ostringstream md;
  md << "| Setting | Trainable params | % of model | " << m << " (mean ± std) | n | " << m
     << " before | Train time (s) | Peak memory (MiB) |\n"
     << "|---|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const auto& s : settings) {
    csv += s.hash + "," + csv_field(s.label);
    for (const auto& a : sweep.axes) {
      std::string v;
      for (const auto& [k, text] : s.trials.front()->trial->values)
        if (k == a) v = text;
      csv += "," + csv_field(v);
    }
    csv += "," + exact(s.metric.mean) + "," + exact(s.metric.std) + "," +
           std::to_string(s.metric.n) + "," + std::to_string(s.failed) + "," +
           exact(s.before.mean) + "," + (s.trainable >= 0 ? std::to_string(s.trainable) : "") +
           "," + (s.model_parameters >= 0 ? std::to_string(s.model_parameters) : "") + "," +
           exact(s.seconds.mean) + "," + exact(s.peak_mib) + "," + (&s == best ? "yes" : "") + "\n";
    const double pct =
        s.trainable >= 0 && s.model_parameters > 0
            ? 100.0 * static_cast<double>(s.trainable) / static_cast<double>(s.model_parameters)
            : NAN;
    std::string value = fixed(s.metric.mean, 4) + " ± " + fixed(s.metric.std, 4);
    if (&s == best) value = "**" + value + "**";
    std::string n = std::to_string(s.metric.n);
    if (s.failed) n += " (" + std::to_string(s.failed) + " failed)";
    if (s.unfinished) n += " (" + std::to_string(s.unfinished) + " not run)";
    md << "| " << md_cell(s.label) << " | " << commas(s.trainable) << " | " << fixed(pct, 2)
       << " | " << value << " | " << n << " | " << fixed(s.before.mean, 4) << " | "
       << fixed(s.seconds.mean, 1) << " | " << fixed(s.peak_mib, 0) << " |\n";
  }
  write_file(out / "results.csv", csv);
  std::string table = md.str();
  if (best)
    table += "\nBest (" + direction + "): **" + best->label + "**, " + m + " " +
             fixed(best->metric.mean, 4) + " ± " + fixed(best->metric.std, 4) + " over " +
             std::to_string(best->metric.n) + " seed" + (best->metric.n == 1 ? "" : "s") + ".\n";

  // Charts: the metric against each swept key, and learning curves.
  std::vector<std::string> charts;
  for (const auto& axis : sweep.axes) {
    std::vector<std::string> order;
    std::map<std::string, std::vector<double>> by_value;
    bool numeric = true;
    for (const auto& r : results) {
      std::string v;
      for (const auto& [k, text] : r.trial->values)
        if (k == axis) v = text;
      if (!by_value.count(v)) order.push_back(v);
      numeric &= as_number(v).has_value();
      if (r.metric && r.status == "done") by_value[v].push_back(*r.metric);
    }
    svg::Chart chart;
    chart.title = m + " after training, by " + axis;
    chart.x_label = axis;
    chart.y_label = m + " (" + direction + ")";
    svg::Series trials, mean;
    trials.name = "trials";
    trials.line = false;
    trials.faint = true;
    mean.name = "mean ± std over trials";
    mean.line = numeric;
    if (!numeric) chart.categories = order;
    std::vector<std::pair<double, std::string>> xs;
    for (std::size_t i = 0; i < order.size(); ++i)
      xs.emplace_back(numeric ? *as_number(order[i]) : static_cast<double>(i), order[i]);
    std::sort(xs.begin(), xs.end());
    double lo = INFINITY, hi = -INFINITY;
    for (const auto& [x, v] : xs) {
      lo = std::min(lo, x), hi = std::max(hi, x);
      const auto st = stats(by_value[v]);
      for (double y : by_value[v]) trials.x.push_back(x), trials.y.push_back(y);
      mean.x.push_back(x), mean.y.push_back(st.mean), mean.err.push_back(st.std);
    }
    chart.log_x = numeric && lo > 0 && hi / lo >= 20;
    chart.series = {trials, mean};
    const auto name = m + "_vs_" + file_slug(axis) + ".svg";
    write_file(out / "plots" / name, svg::render(chart));
    charts.push_back(name);
  }
  auto curves = [&](std::vector<std::pair<double, double>> TrialResult::*curve,
                    const std::string& name, const std::string& title, const std::string& y) {
    svg::Chart chart;
    chart.title = title;
    chart.x_label = "step";
    chart.y_label = y;
    for (const auto& s : settings) {
      auto series = mean_curve(s, curve);
      if (series.x.size() >= 2) chart.series.push_back(std::move(series));
    }
    if (chart.series.empty()) return;
    write_file(out / "plots" / name, svg::render(chart));
    charts.push_back(name);
  };
  curves(&TrialResult::train_loss, "learning_curves.svg", "training loss (mean over seeds)",
         "train loss");
  curves(&TrialResult::eval_metric, "eval_" + file_slug(m) + ".svg",
         "eval " + m + " during training (mean over seeds)", m);

  std::ostringstream doc;
  doc << "# Sweep results: " << dir.string() << "\n\n"
      << "Base recipe `" << sweep.recipe.string() << "`, metric `" << m << "` on the eval split "
      << "after training (" << direction << "), mean ± sample standard deviation over seeds. "
      << "Train time is the training loop's wall time; peak memory is the trial process's "
      << "resident set.\n\n"
      << table << "\nReproduce: `graft sweep " << sweep.file.string() << "` then `graft report "
      << dir.string() << "`.\n\n";
  for (const auto& c : charts) doc << "![" << c << "](plots/" << c << ")\n\n";
  if (!error.empty()) {
    doc << "## Failed trials\n\n";
    for (const auto& [id, what] : error) doc << "- `" << id << "`: " << what << "\n";
    doc << "\nTheir logs are in " << (dir / "logs").string()
        << "; `graft sweep ... --retry-failed` runs them again.\n";
  }
  write_file(out / "results.md", doc.str());
  return table;
}

}  // namespace graft
