// What every tokenizer shares: its GGUF form, where it has none of its own.
#include <graft/error.h>
#include <graft/tokenizer.h>

#include "tokenize/vocab.h"

namespace graft {

std::vector<std::pair<std::string, io::GgufValue>> Tokenizer::gguf_metadata() const {
  throw Error("this tokenizer has no form in llama.cpp's GGUF keys");
}

std::vector<std::pair<std::string, std::string>> Tokenizer::hf_files() const {
  throw Error("graft cannot write this tokenizer as a Hugging Face tokenizer.json");
}

namespace tokenize {

void add_special_ids(std::vector<std::pair<std::string, io::GgufValue>>& meta, const Tokenizer& t) {
  for (const auto& [key, id] :
       {std::pair<const char*, std::int64_t>{"tokenizer.ggml.bos_token_id", t.bos_id()},
        {"tokenizer.ggml.eos_token_id", t.eos_id()},
        {"tokenizer.ggml.unknown_token_id", t.unk_id()},
        {"tokenizer.ggml.padding_token_id", t.pad_id()}})
    if (id >= 0) meta.emplace_back(key, io::gguf_int(id));
}

}  // namespace tokenize
}  // namespace graft
