// SentencePiece BPE as llama.cpp and llama2.c run it from a vocabulary with scores: start from
// UTF-8 characters, repeatedly merge the adjacent pair whose concatenation is the highest-scoring
// vocabulary entry (leftmost on ties), and fall back to <0xXX> byte tokens for characters the
// vocabulary lacks.
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <graft/tokenizer.h>

#include <queue>
#include <unordered_map>

#include "tokenize/utf8.h"
#include "tokenize/vocab.h"

namespace graft {
namespace {

constexpr std::int32_t kControl = 3, kUnused = 5, kByte = 6;
const std::string kSpace = "\xE2\x96\x81";  // U+2581 LOWER ONE EIGHTH BLOCK

class SentencePieceBpe : public Tokenizer {
 public:
  explicit SentencePieceBpe(SentencePieceVocab v) : v_(std::move(v)) {
    if (v_.scores.size() != v_.pieces.size()) v_.scores.assign(v_.pieces.size(), 0.0f);
    if (v_.types.size() != v_.pieces.size()) v_.types.assign(v_.pieces.size(), 1);
    for (std::size_t i = 0; i < v_.pieces.size(); ++i) {
      ids_.emplace(v_.pieces[i], static_cast<std::int64_t>(i));
      if (v_.types[i] == kByte && v_.pieces[i].size() == 6) {
        byte_ids_[std::stoi(v_.pieces[i].substr(3, 2), nullptr, 16)] = static_cast<std::int64_t>(i);
      }
    }
    bos_ = v_.bos;
    eos_ = v_.eos;
    unk_ = v_.unk;
    pad_ = v_.pad;
  }

  std::vector<std::int64_t> encode(const std::string& text, bool add_special) const override {
    std::vector<std::int64_t> out;
    if (add_special && v_.add_bos && bos_ >= 0) out.push_back(bos_);
    if (!text.empty()) {
      std::string s = v_.add_space_prefix ? " " + text : text;
      std::string norm;
      for (char c : s) c == ' ' ? norm += kSpace : norm += c;
      merge(norm, out);
    }
    if (add_special && v_.add_eos && eos_ >= 0) out.push_back(eos_);
    return out;
  }

  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special) const override {
    std::string out;
    bool first_text = true;
    for (auto id : ids) {
      if (id < 0 || id >= vocab_size()) continue;
      const auto type = v_.types[id];
      if (type == kByte) {
        out += static_cast<char>(std::stoi(v_.pieces[id].substr(3, 2), nullptr, 16));
        first_text = false;
        continue;
      }
      if (type == kControl || type == kUnused) {
        if (!skip_special) out += v_.pieces[id];
        continue;
      }
      std::string piece = v_.pieces[id];
      std::string text;
      for (std::size_t i = 0; i < piece.size();) {
        if (piece.compare(i, kSpace.size(), kSpace) == 0) {
          text += ' ';
          i += kSpace.size();
        } else {
          text += piece[i++];
        }
      }
      // The dummy prefix added at encoding is not part of the text.
      if (first_text && v_.add_space_prefix && !text.empty() && text[0] == ' ') text.erase(0, 1);
      first_text = false;
      out += text;
    }
    return out;
  }

  std::int64_t vocab_size() const override { return static_cast<std::int64_t>(v_.pieces.size()); }
  std::vector<std::pair<std::string, io::GgufValue>> gguf_metadata() const override {
    std::vector<double> scores(v_.scores.begin(), v_.scores.end());
    std::vector<std::int64_t> types(v_.types.begin(), v_.types.end());
    std::vector<std::pair<std::string, io::GgufValue>> m = {
        {"tokenizer.ggml.model", io::gguf_string("llama")},
        {"tokenizer.ggml.tokens", io::gguf_strings(v_.pieces)},
        {"tokenizer.ggml.scores", io::gguf_floats(scores)},
        {"tokenizer.ggml.token_type", io::gguf_ints(types)},
        {"tokenizer.ggml.add_bos_token", io::gguf_bool(v_.add_bos)},
        {"tokenizer.ggml.add_eos_token", io::gguf_bool(v_.add_eos)},
        {"tokenizer.ggml.add_space_prefix", io::gguf_bool(v_.add_space_prefix)}};
    tokenize::add_special_ids(m, *this);
    return m;
  }
  std::string token(std::int64_t id) const override {
    return id >= 0 && id < vocab_size() ? v_.pieces[id] : std::string();
  }
  std::int64_t id(const std::string& token) const override {
    auto it = ids_.find(token);
    return it == ids_.end() ? -1 : it->second;
  }

 private:
  struct Symbol {
    std::size_t start, len;
    int prev, next;
  };
  struct Bigram {
    float score;
    int left;
    std::size_t len;  // combined length when queued: stale entries no longer match
    bool operator<(const Bigram& o) const {
      return score < o.score || (score == o.score && left > o.left);
    }
  };

  void merge(const std::string& s, std::vector<std::int64_t>& out) const {
    std::vector<Symbol> sym;
    for (std::size_t i = 0; i < s.size();) {
      std::size_t n =
          std::min(tokenize::utf8_length(static_cast<unsigned char>(s[i])), s.size() - i);
      const int k = static_cast<int>(sym.size());
      sym.push_back({i, n, k - 1, k + 1});
      i += n;
    }
    sym.back().next = -1;
    std::priority_queue<Bigram> queue;
    auto try_pair = [&](int left, int right) {
      if (left < 0 || right < 0) return;
      const std::size_t len = sym[left].len + sym[right].len;
      auto it = ids_.find(s.substr(sym[left].start, len));
      if (it == ids_.end() || v_.types[it->second] == kUnused) return;
      queue.push({v_.scores[it->second], left, len});
    };
    for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) try_pair(i, i + 1);
    while (!queue.empty()) {
      auto b = queue.top();
      queue.pop();
      auto& left = sym[b.left];
      if (left.len == 0 || left.next < 0) continue;
      auto& right = sym[left.next];
      if (left.len + right.len != b.len) continue;  // one side changed since it was queued
      left.len += right.len;
      right.len = 0;
      left.next = right.next;
      if (right.next >= 0) sym[right.next].prev = b.left;
      try_pair(left.prev, b.left);
      try_pair(b.left, left.next);
    }
    for (int i = 0; i != -1 && !sym.empty(); i = sym[i].next) {
      auto piece = s.substr(sym[i].start, sym[i].len);
      auto it = ids_.find(piece);
      if (it != ids_.end()) {
        out.push_back(it->second);
        continue;
      }
      for (unsigned char c : piece) {
        auto b = byte_ids_.find(c);
        if (b != byte_ids_.end()) {
          out.push_back(b->second);
        } else if (unk_ >= 0) {
          out.push_back(unk_);
          break;
        }
      }
    }
  }

  SentencePieceVocab v_;
  std::unordered_map<std::string, std::int64_t> ids_;
  std::unordered_map<int, std::int64_t> byte_ids_;
};

}  // namespace

std::shared_ptr<Tokenizer> make_sentencepiece_bpe(SentencePieceVocab vocab) {
  return std::make_shared<SentencePieceBpe>(std::move(vocab));
}

std::shared_ptr<Tokenizer> make_gguf_byte_level_bpe(const io::GgufFile& file);

std::shared_ptr<Tokenizer> tokenizer_from_gguf(const io::GgufFile& f) {
  const std::string where = f.path().string();
  auto* model = f.find("tokenizer.ggml.model");
  if (!model) throw FileError(where, "no tokenizer embedded (tokenizer.ggml.model is missing)");
  const auto kind = model->as_string("tokenizer.ggml.model");
  if (kind == "gpt2") return make_gguf_byte_level_bpe(f);
  if (kind != "llama")
    throw FileError(where, "tokenizer.ggml.model \"" + kind +
                               "\" is not supported (graft reads \"llama\" and \"gpt2\")");
  SentencePieceVocab v;
  v.pieces = f.at("tokenizer.ggml.tokens").as_strings("tokenizer.ggml.tokens");
  if (auto* s = f.find("tokenizer.ggml.scores"))
    for (double x : s->as_doubles("tokenizer.ggml.scores"))
      v.scores.push_back(static_cast<float>(x));
  if (auto* t = f.find("tokenizer.ggml.token_type"))
    for (auto x : t->as_ints("tokenizer.ggml.token_type"))
      v.types.push_back(static_cast<std::int32_t>(x));
  if (!v.scores.empty() && v.scores.size() != v.pieces.size())
    throw FileError(where, "tokenizer.ggml.scores has " + std::to_string(v.scores.size()) +
                               " entries for " + std::to_string(v.pieces.size()) + " tokens");
  if (!v.types.empty() && v.types.size() != v.pieces.size())
    throw FileError(where, "tokenizer.ggml.token_type has " + std::to_string(v.types.size()) +
                               " entries for " + std::to_string(v.pieces.size()) + " tokens");
  auto id = [&](const char* key, std::int64_t fallback) {
    auto* x = f.find(key);
    if (!x) return fallback;
    auto v = x->as_int(key);
    return v == 0xFFFFFFFF ? -1 : v;  // llama.cpp writes (uint32)-1 for "none"
  };
  v.bos = id("tokenizer.ggml.bos_token_id", 1);
  v.eos = id("tokenizer.ggml.eos_token_id", 2);
  v.unk = id("tokenizer.ggml.unknown_token_id", 0);
  v.pad = id("tokenizer.ggml.padding_token_id", -1);
  if (auto* x = f.find("tokenizer.ggml.add_bos_token")) v.add_bos = x->i != 0;
  if (auto* x = f.find("tokenizer.ggml.add_eos_token")) v.add_eos = x->i != 0;
  if (auto* x = f.find("tokenizer.ggml.add_space_prefix")) v.add_space_prefix = x->i != 0;
  const auto n = static_cast<std::int64_t>(v.pieces.size());
  for (auto* x : {&v.bos, &v.eos, &v.unk, &v.pad})
    if (*x >= n)
      throw FileError(where, "special token id " + std::to_string(*x) + " is outside the " +
                                 std::to_string(n) + "-token vocabulary");
  return make_sentencepiece_bpe(std::move(v));
}

}  // namespace graft
