// example_scale's hook: a learned vector that scales a linear site's output.
#pragma once

#include <graft/hooks.h>

namespace example_scale {

class OutputScale : public graft::LinearScale {
 public:
  OutputScale(std::int64_t width, double init);
  Side side() const override { return Side::output; }
  at::Tensor scale() override { return scale_; }

 private:
  at::Tensor scale_;  ///< [out]
};

}  // namespace example_scale
