// Tokenizers: the SentencePiece-BPE vocabulary embedded in GGUF files, and Hugging Face
// tokenizer.json files (byte-level BPE as in GPT-2, Llama 3 and Qwen2; SentencePiece-style BPE
// with byte fallback as in Llama 2; WordPiece as in BERT).
#pragma once

#include <graft/io/gguf.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace graft {

/// Text <-> token ids. Implementations are immutable after construction and thread-safe.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// Encodes UTF-8 text. With `add_special`, adds what the model expects around a sequence
  /// (BOS for llama, [CLS] ... [SEP] for BERT, nothing for GPT-2).
  virtual std::vector<std::int64_t> encode(const std::string& text,
                                           bool add_special = true) const = 0;
  /// Decodes ids to UTF-8 text; with `skip_special`, control tokens (BOS, EOS, [CLS], ...) are
  /// left out.
  virtual std::string decode(const std::vector<std::int64_t>& ids,
                             bool skip_special = true) const = 0;
  /// The number of ids (the largest id plus one).
  virtual std::int64_t vocab_size() const = 0;
  /// The vocabulary entry of `id` as stored ("▁the", "Ġthe", "##ing", "<0x0A>").
  virtual std::string token(std::int64_t id) const = 0;
  /// The id of a vocabulary entry, or -1.
  virtual std::int64_t id(const std::string& token) const = 0;
  /// The tokenizer as llama.cpp reads it from a GGUF file (the tokenizer.ggml.* keys), for
  /// writing models; throws graft::Error saying why when llama.cpp has no faithful form for it.
  virtual std::vector<std::pair<std::string, io::GgufValue>> gguf_metadata() const;
  /// The tokenizer as Hugging Face files (file name, contents): tokenizer.json and
  /// tokenizer_config.json, as transformers' fast tokenizers read them, for writing models from
  /// GGUF files; throws graft::Error saying why where there is no faithful form.
  virtual std::vector<std::pair<std::string, std::string>> hf_files() const;

  std::int64_t bos_id() const { return bos_; }  ///< -1 when the vocabulary has none
  std::int64_t eos_id() const { return eos_; }
  std::int64_t pad_id() const { return pad_; }
  std::int64_t unk_id() const { return unk_; }

 protected:
  std::int64_t bos_ = -1, eos_ = -1, pad_ = -1, unk_ = -1;
};

/// The tokenizer embedded in a GGUF file (tokenizer.ggml.model "llama": SentencePiece BPE with
/// scores and byte fallback; "gpt2": byte-level BPE with merges).
std::shared_ptr<Tokenizer> tokenizer_from_gguf(const io::GgufFile& file);

/// A Hugging Face tokenizer.json. Throws graft::FileError naming the file and the unsupported
/// part (model type, normalizer, pre-tokenizer, decoder) when it cannot be read faithfully.
std::shared_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& path);

/// A SentencePiece-BPE vocabulary: pieces, their scores and their types (GGUF token types:
/// 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
struct SentencePieceVocab {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<std::int32_t> types;
  std::int64_t bos = -1, eos = -1, unk = -1, pad = -1;
  bool add_bos = true;
  bool add_eos = false;
  bool add_space_prefix = true;  ///< SentencePiece's dummy prefix: "Hi" encodes as "▁Hi"
};
std::shared_ptr<Tokenizer> make_sentencepiece_bpe(SentencePieceVocab vocab);

}  // namespace graft
