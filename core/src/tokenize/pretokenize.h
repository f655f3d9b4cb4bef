// Pre-tokenisation: splitting text into words before byte-level BPE runs on each word.
#pragma once

#include <string>
#include <vector>

namespace graft::tokenize {

/// The split patterns of the models graft reads, run by hand (no regex engine):
/// gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
/// llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
///         ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
/// qwen2:  as llama3 with \p{N} in place of \p{N}{1,3}
enum class Split { none, gpt2, llama3, qwen2 };

/// Splits UTF-8 `text` into consecutive words by `style`; the words concatenate to `text`.
std::vector<std::string> split_words(const std::string& text, Split style);

}  // namespace graft::tokenize
