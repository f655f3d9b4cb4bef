// A named set of tensors, the currency of every tensor file format.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace graft::io {

/// Tensors by name, in name order (deterministic iteration for writing files).
using TensorMap = std::map<std::string, at::Tensor>;

/// String metadata stored beside tensors (safetensors' __metadata__).
using Metadata = std::map<std::string, std::string>;

}  // namespace graft::io
