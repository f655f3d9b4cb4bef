// Helpers the tokenizers share for writing themselves into GGUF metadata.
#pragma once

#include <graft/tokenizer.h>

#include <string>
#include <utility>
#include <vector>

namespace graft::tokenize {

/// Appends tokenizer.ggml.{bos,eos,unknown,padding}_token_id for the ids `t` has.
void add_special_ids(std::vector<std::pair<std::string, io::GgufValue>>& meta, const Tokenizer& t);

}  // namespace graft::tokenize
