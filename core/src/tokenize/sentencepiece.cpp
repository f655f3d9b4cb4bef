// SentencePiece BPE as llama.cpp and llama2.c run it from a vocabulary with scores: start from
// UTF-8 characters, repeatedly merge the adjacent pair whose concatenation is the highest-scoring
// vocabulary entry (leftmost on ties), and fall back to <0xXX> byte tokens for characters the
// vocabulary lacks.
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <graft/tokenizer.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "tokenize/utf8.h"
#include "tokenize/vocab.h"

namespace graft {
namespace {

constexpr std::int32_t kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6;
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
  std::vector<std::pair<std::string, std::string>> hf_files() const override;
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

// The same tokenizer as transformers' LlamaTokenizerFast holds it: a BPE model whose merges are
// every split of a vocabulary entry into two entries, ranked by the entry's score (highest
// first; within an entry, by the ids of its halves), which is what makes merging the best-ranked
// pair the same as SentencePiece's merging of the best-scoring one. Control, unknown and
// user-defined entries become added tokens; bytes stay in the vocabulary for byte fallback.
std::vector<std::pair<std::string, std::string>> SentencePieceBpe::hf_files() const {
  using json = nlohmann::ordered_json;
  struct Merge {
    float score;
    std::int64_t left, right;
  };
  std::vector<Merge> merges;
  for (std::size_t i = 0; i < v_.pieces.size(); ++i) {
    const auto type = v_.types[i];
    if (type == kControl || type == kUnknown || type == kUnused || type == kByte) continue;
    const auto& piece = v_.pieces[i];
    std::vector<Merge> local;
    for (std::size_t at = tokenize::utf8_length(static_cast<unsigned char>(piece[0]));
         at < piece.size(); at += tokenize::utf8_length(static_cast<unsigned char>(piece[at]))) {
      const auto l = ids_.find(piece.substr(0, at)), r = ids_.find(piece.substr(at));
      if (l != ids_.end() && r != ids_.end()) local.push_back({v_.scores[i], l->second, r->second});
    }
    std::sort(local.begin(), local.end(), [](const Merge& a, const Merge& b) {
      return a.left != b.left ? a.left < b.left : a.right < b.right;
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(),
                   [](const Merge& a, const Merge& b) { return a.score > b.score; });

  json vocab = json::object(), merge_list = json::array(), added = json::array();
  for (std::size_t i = 0; i < v_.pieces.size(); ++i) vocab[v_.pieces[i]] = i;
  for (const auto& m : merges) merge_list.push_back(v_.pieces[m.left] + " " + v_.pieces[m.right]);
  for (std::size_t i = 0; i < v_.pieces.size(); ++i) {
    const auto type = v_.types[i];
    if (type != kControl && type != kUnknown && type != kUserDefined) continue;
    added.push_back({{"id", i},
                     {"content", v_.pieces[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", type == kUserDefined},
                     {"special", type != kUserDefined}});
  }
  const json space = {{"String", " "}}, meta = {{"String", kSpace}};
  json normalizers = json::array();
  if (v_.add_space_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", kSpace}});
  normalizers.push_back({{"type", "Replace"}, {"pattern", space}, {"content", kSpace}});
  json decoders = {{{"type", "Replace"}, {"pattern", meta}, {"content", " "}},
                   {{"type", "ByteFallback"}},
                   {{"type", "Fuse"}}};
  if (v_.add_space_prefix)
    decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  // The template: BOS and EOS where the vocabulary adds them.
  json single = json::array(), pair = json::array(), specials = json::object();
  auto special = [&](bool add, std::int64_t id, int type_id, json& into) {
    if (!add || id < 0) return;
    into.push_back({{"SpecialToken", {{"id", v_.pieces[id]}, {"type_id", type_id}}}});
    specials[v_.pieces[id]] = {{"id", v_.pieces[id]}, {"ids", {id}}, {"tokens", {v_.pieces[id]}}};
  };
  auto sequence = [&](const char* id, int type_id, json& into) {
    special(v_.add_bos, bos_, type_id, into);
    into.push_back({{"Sequence", {{"id", id}, {"type_id", type_id}}}});
    special(v_.add_eos, eos_, type_id, into);
  };
  sequence("A", 0, single);
  sequence("A", 0, pair);
  sequence("B", 1, pair);
  const json tokenizer = {{"version", "1.0"},
                          {"truncation", nullptr},
                          {"padding", nullptr},
                          {"added_tokens", added},
                          {"normalizer", {{"type", "Sequence"}, {"normalizers", normalizers}}},
                          {"pre_tokenizer", nullptr},
                          {"post_processor",
                           {{"type", "TemplateProcessing"},
                            {"single", single},
                            {"pair", pair},
                            {"special_tokens", specials}}},
                          {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
                          {"model",
                           {{"type", "BPE"},
                            {"dropout", nullptr},
                            {"unk_token", unk_ >= 0 ? json(v_.pieces[unk_]) : json(nullptr)},
                            {"continuing_subword_prefix", nullptr},
                            {"end_of_word_suffix", nullptr},
                            {"fuse_unk", true},
                            {"byte_fallback", true},
                            {"ignore_merges", false},
                            {"vocab", vocab},
                            {"merges", merge_list}}}};
  auto name = [&](std::int64_t id) { return id >= 0 ? json(v_.pieces[id]) : json(nullptr); };
  const json config = {{"tokenizer_class", "LlamaTokenizerFast"},
                       {"bos_token", name(bos_)},
                       {"eos_token", name(eos_)},
                       {"unk_token", name(unk_)},
                       {"pad_token", name(pad_)},
                       {"add_bos_token", v_.add_bos},
                       {"add_eos_token", v_.add_eos},
                       {"add_prefix_space", v_.add_space_prefix},
                       {"legacy", true},
                       {"clean_up_tokenization_spaces", false}};
  try {
    return {{"tokenizer.json", tokenizer.dump(2) + "\n"},
            {"tokenizer_config.json", config.dump(2) + "\n"}};
  } catch (const json::exception&) {
    throw Error("a vocabulary entry is not valid UTF-8, which tokenizer.json cannot hold");
  }
}

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
