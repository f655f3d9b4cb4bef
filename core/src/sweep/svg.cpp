// SVG charts for sweep reports.
#include "sweep/svg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

namespace graft::svg {
namespace {

constexpr double kWidth = 760, kHeight = 440, kLeft = 78, kRight = 200, kTop = 44;
constexpr const char* kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
constexpr const char* kDashes[] = {"", "6,3", "2,2", "8,3,2,3"};

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

std::string label(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '&')
      out += "&amp;";
    else if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '"')
      out += "&quot;";
    else
      out += c;
  }
  return out;
}

// Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
std::vector<double> ticks(double lo, double hi) {
  const double raw = (hi - lo) / 5, mag = std::pow(10, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) {
      step = m * mag;
      break;
    }
  std::vector<double> out;
  // The first tick even where lo / step lands a rounding error above a whole number.
  for (double t = std::ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step)
    out.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return out;
}

}  // namespace

std::string render(const Chart& c) {
  const bool categorical = !c.categories.empty();
  const double bottom = categorical ? 120 : 60;
  const double plot_w = kWidth - kLeft - kRight, plot_h = kHeight - kTop - bottom;

  double x_lo = std::numeric_limits<double>::infinity(), x_hi = -x_lo, y_lo = x_lo, y_hi = -x_lo;
  for (const auto& s : c.series)
    for (std::size_t i = 0; i < s.y.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      const double e = s.err.empty() || !std::isfinite(s.err[i]) ? 0 : s.err[i];
      const double x = c.log_x ? std::log10(s.x[i]) : s.x[i];
      x_lo = std::min(x_lo, x), x_hi = std::max(x_hi, x);
      y_lo = std::min(y_lo, s.y[i] - e), y_hi = std::max(y_hi, s.y[i] + e);
    }
  if (categorical) x_lo = -0.5, x_hi = static_cast<double>(c.categories.size()) - 0.5;
  if (!std::isfinite(x_lo)) x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;
  if (x_hi == x_lo) x_lo -= 1, x_hi += 1;
  if (y_hi == y_lo) y_lo -= std::max(1e-3, std::abs(y_lo) * 0.05), y_hi += std::abs(y_lo - y_hi);
  const double pad = (y_hi - y_lo) * 0.06;
  y_lo -= pad, y_hi += pad;
  if (!categorical && !c.log_x) {
    const double xp = (x_hi - x_lo) * 0.03;
    x_lo -= xp, x_hi += xp;
  }
  auto px = [&](double x) {
    const double v = c.log_x && !categorical ? std::log10(x) : x;
    return kLeft + (v - x_lo) / (x_hi - x_lo) * plot_w;
  };
  auto py = [&](double y) { return kTop + (y_hi - y) / (y_hi - y_lo) * plot_h; };

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kWidth << "\" height=\"" << kHeight
    << "\" viewBox=\"0 0 " << kWidth << " " << kHeight
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << kWidth / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">"
    << escape(c.title) << "</text>\n";
  // Axes, grid and tick labels.
  for (double t : ticks(y_lo, y_hi)) {
    o << "<line x1=\"" << kLeft << "\" x2=\"" << kLeft + plot_w << "\" y1=\"" << num(py(t))
      << "\" y2=\"" << num(py(t)) << "\" stroke=\"#e5e5e5\"/>\n"
      << "<text x=\"" << kLeft - 6 << "\" y=\"" << num(py(t) + 4) << "\" text-anchor=\"end\">"
      << label(t) << "</text>\n";
  }
  if (categorical) {
    for (std::size_t i = 0; i < c.categories.size(); ++i) {
      const double x = px(static_cast<double>(i)), y = kTop + plot_h + 14;
      o << "<text x=\"" << num(x) << "\" y=\"" << num(y)
        << "\" text-anchor=\"end\" transform=\"rotate(-35 " << num(x) << " " << num(y) << ")\">"
        << escape(c.categories[i]) << "</text>\n";
    }
  } else {
    std::vector<double> xs;
    if (c.log_x)
      for (double e = std::ceil(x_lo); e <= x_hi + 1e-9; ++e) xs.push_back(std::pow(10, e));
    if (xs.size() < 2) {
      xs.clear();
      for (double t : ticks(x_lo, x_hi)) xs.push_back(c.log_x ? std::pow(10, t) : t);
    }
    for (double t : xs)
      o << "<line x1=\"" << num(px(t)) << "\" x2=\"" << num(px(t)) << "\" y1=\"" << kTop
        << "\" y2=\"" << kTop + plot_h << "\" stroke=\"#f0f0f0\"/>\n"
        << "<text x=\"" << num(px(t)) << "\" y=\"" << kTop + plot_h + 18
        << "\" text-anchor=\"middle\">" << label(t) << "</text>\n";
  }
  o << "<rect x=\"" << kLeft << "\" y=\"" << kTop << "\" width=\"" << plot_w << "\" height=\""
    << plot_h << "\" fill=\"none\" stroke=\"#333\"/>\n"
    << "<text x=\"" << kLeft + plot_w / 2 << "\" y=\"" << kHeight - 8
    << "\" text-anchor=\"middle\">" << escape(c.x_label) << (c.log_x ? " (log scale)" : "")
    << "</text>\n"
    << "<text x=\"18\" y=\"" << kTop + plot_h / 2
    << "\" text-anchor=\"middle\" transform=\"rotate(-90 18 " << kTop + plot_h / 2 << ")\">"
    << escape(c.y_label) << "</text>\n";

  // Series: faint ones first, underneath.
  std::size_t colour = 0;
  double legend_y = kTop + 6;
  for (int pass = 0; pass < 2; ++pass)
    for (const auto& s : c.series) {
      if (s.faint != (pass == 0)) continue;
      const std::string stroke = s.faint ? "#b8b8b8" : kPalette[colour % 10];
      const std::string dash = s.faint ? "" : kDashes[(colour / 10) % 4];
      if (!s.faint) ++colour;
      std::string path;
      for (std::size_t i = 0; i < s.y.size(); ++i) {
        if (!std::isfinite(s.y[i])) continue;
        path += (path.empty() ? "M" : " L") + num(px(s.x[i])) + "," + num(py(s.y[i]));
      }
      // A line's spread (the std over seeds) as a band around it; points get error bars.
      if (s.line && !s.err.empty()) {
        std::string upper, lower;
        for (std::size_t i = 0; i < s.y.size(); ++i) {
          if (!std::isfinite(s.y[i])) continue;
          const double e = std::isfinite(s.err[i]) ? s.err[i] : 0;
          upper += (upper.empty() ? "M" : " L") + num(px(s.x[i])) + "," + num(py(s.y[i] + e));
          lower = " L" + num(px(s.x[i])) + "," + num(py(s.y[i] - e)) + lower;
        }
        if (!upper.empty())
          o << "<path d=\"" << upper << lower << " Z\" fill=\"" << stroke
            << "\" fill-opacity=\"0.15\" stroke=\"none\"/>\n";
      }
      if (s.line && !path.empty())
        o << "<path d=\"" << path << "\" fill=\"none\" stroke=\"" << stroke
          << "\" stroke-width=\"1.8\"" << (dash.empty() ? "" : " stroke-dasharray=\"" + dash + "\"")
          << "/>\n";
      for (std::size_t i = 0; i < s.y.size(); ++i) {
        if (!std::isfinite(s.y[i])) continue;
        const double x = px(s.x[i]), y = py(s.y[i]);
        if (!s.line && !s.err.empty() && std::isfinite(s.err[i]) && s.err[i] > 0)
          o << "<path d=\"M" << num(x) << "," << num(py(s.y[i] - s.err[i])) << " L" << num(x) << ","
            << num(py(s.y[i] + s.err[i])) << " M" << num(x - 4) << "," << num(py(s.y[i] - s.err[i]))
            << " L" << num(x + 4) << "," << num(py(s.y[i] - s.err[i])) << " M" << num(x - 4) << ","
            << num(py(s.y[i] + s.err[i])) << " L" << num(x + 4) << "," << num(py(s.y[i] + s.err[i]))
            << "\" stroke=\"" << stroke << "\"/>\n";
        if (!s.line || s.y.size() <= 12)
          o << "<circle cx=\"" << num(x) << "\" cy=\"" << num(y) << "\" r=\""
            << (s.faint ? 2.5 : 3.5) << "\" fill=\"" << stroke << "\"/>\n";
      }
      if (s.faint || s.name.empty()) continue;
      const double lx = kLeft + plot_w + 12;
      o << "<line x1=\"" << lx << "\" x2=\"" << lx + 22 << "\" y1=\"" << num(legend_y) << "\" y2=\""
        << num(legend_y) << "\" stroke=\"" << stroke << "\" stroke-width=\"2\""
        << (dash.empty() ? "" : " stroke-dasharray=\"" + dash + "\"") << "/>\n"
        << "<text x=\"" << lx + 28 << "\" y=\"" << num(legend_y + 4) << "\" font-size=\"11\">"
        << escape(s.name.size() > 26 ? s.name.substr(0, 25) + "…" : s.name) << "</text>\n";
      legend_y += 16;
    }
  o << "</svg>\n";
  return o.str();
}

}  // namespace graft::svg
