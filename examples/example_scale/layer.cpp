#include "layer.h"

#include <torch/torch.h>

namespace example_scale {

OutputScale::OutputScale(std::int64_t width, double init) {
  scale_ = register_parameter("scale", torch::full({width}, init));
}

}  // namespace example_scale
