// Small, dependency-free SVG charts for sweep reports: lines, points and error bars over a
// numeric (linear or log) or categorical x axis.
#pragma once

#include <string>
#include <vector>

namespace graft::svg {

struct Series {
  std::string name;
  std::vector<double> x, y;
  std::vector<double> err;  ///< optional: +- error bars (same length as y)
  bool line = true;         ///< false: points only
  bool faint = false;       ///< drawn light grey, left out of the legend (individual trials)
};

struct Chart {
  std::string title, x_label, y_label;
  bool log_x = false;
  std::vector<std::string> categories;  ///< categorical x: series x values index these
  std::vector<Series> series;
};

/// The chart as a standalone SVG document. Same chart, same bytes.
std::string render(const Chart& chart);

}  // namespace graft::svg
