// Helpers shared by the sweep runner, the store and the report.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace graft::sweep_detail {

/// The trial's summary.json, or nothing when the trial has not finished.
std::optional<nlohmann::json> read_summary(const std::filesystem::path& trial_dir);

/// The metric after training (summary.json's eval_after), or nothing when it was not evaluated.
std::optional<double> metric_of(const nlohmann::json& summary, const std::string& metric);

}  // namespace graft::sweep_detail
