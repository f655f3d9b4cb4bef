// Hugging Face tokenizer.json (and GGUF "gpt2" vocabularies): byte-level BPE with the GPT-2,
// Llama 3 and Qwen2 pre-tokenisation patterns, SentencePiece-style BPE with byte fallback
// (Llama 2, Mistral), and WordPiece with BERT's normaliser (BERT).
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <graft/io/json.h>
#include <graft/tokenizer.h>
#include <unicode/uchar.h>
#include <unicode/unorm2.h>

#include <algorithm>
#include <array>
#include <climits>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "tokenize/pretokenize.h"
#include "tokenize/utf8.h"
#include "tokenize/vocab.h"
#include "util/file.h"

namespace graft {
namespace {

using json = nlohmann::json;
using tokenize::utf8_append;
using tokenize::utf8_next;

const std::string kMeta = "\xE2\x96\x81";  // U+2581, SentencePiece's space

bool is_letter(char32_t c) {
  auto t = u_charType(static_cast<UChar32>(c));
  return t >= U_UPPERCASE_LETTER && t <= U_OTHER_LETTER;
}
bool is_number(char32_t c) {
  auto t = u_charType(static_cast<UChar32>(c));
  return t == U_DECIMAL_DIGIT_NUMBER || t == U_LETTER_NUMBER || t == U_OTHER_NUMBER;
}
bool is_space(char32_t c) { return u_isUWhiteSpace(static_cast<UChar32>(c)); }
bool is_newline(char32_t c) { return c == '\r' || c == '\n'; }

}  // namespace
}  // namespace graft

namespace graft::tokenize {

std::vector<std::string> split_words(const std::string& s, Split style) {
  if (style == Split::none) return {s};
  // Decode once: code points and their byte offsets (offs has one extra entry for the end).
  std::vector<char32_t> cp;
  std::vector<std::size_t> offs;
  for (std::size_t i = 0; i < s.size();) {
    offs.push_back(i);
    cp.push_back(utf8_next(s, i));
  }
  offs.push_back(s.size());
  const std::size_t n = cp.size();
  auto at = [&](std::size_t i) -> char32_t { return i < n ? cp[i] : 0; };
  auto letter = [&](std::size_t i) { return i < n && is_letter(cp[i]); };
  auto number = [&](std::size_t i) { return i < n && is_number(cp[i]); };
  auto space = [&](std::size_t i) { return i < n && is_space(cp[i]); };
  auto other = [&](std::size_t i) {
    return i < n && !is_space(cp[i]) && !is_letter(cp[i]) && !is_number(cp[i]);
  };
  const bool modern = style != Split::gpt2;

  std::vector<std::string> words;
  std::size_t i = 0;
  while (i < n) {
    std::size_t j = i;
    auto lower = [&](std::size_t k) {
      return k < n && cp[k] < 128 ? std::tolower(static_cast<int>(cp[k])) : -1;
    };
    auto match_contraction = [&]() -> std::size_t {
      if (at(i) != '\'') return 0;
      auto c1 =
          modern ? lower(i + 1) : (i + 1 < n && cp[i + 1] < 128 ? static_cast<int>(cp[i + 1]) : -1);
      auto c2 =
          modern ? lower(i + 2) : (i + 2 < n && cp[i + 2] < 128 ? static_cast<int>(cp[i + 2]) : -1);
      if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
        return 3;
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
      return 0;
    };
    if (auto len = match_contraction()) {
      j = i + len;
    } else if (!modern && ((letter(i)) || (at(i) == ' ' && letter(i + 1)))) {
      j = at(i) == ' ' ? i + 1 : i;
      while (letter(j)) ++j;
    } else if (modern && (letter(i) || (i < n && !is_newline(cp[i]) && !letter(i) && !number(i) &&
                                        letter(i + 1)))) {
      j = letter(i) ? i : i + 1;
      while (letter(j)) ++j;
    } else if (!modern && (number(i) || (at(i) == ' ' && number(i + 1)))) {
      j = at(i) == ' ' ? i + 1 : i;
      while (number(j)) ++j;
    } else if (modern && number(i)) {
      const std::size_t max = style == Split::llama3 ? 3 : 1;
      while (number(j) && j - i < max) ++j;
    } else if (other(i) || (at(i) == ' ' && other(i + 1))) {
      j = at(i) == ' ' ? i + 1 : i;
      while (other(j)) ++j;
      if (modern)
        while (j < n && is_newline(cp[j])) ++j;
    } else {
      // Whitespace.
      std::size_t e = i;
      while (space(e)) ++e;
      std::size_t last_newline = n;
      if (modern)
        for (std::size_t k = i; k < e; ++k)
          if (is_newline(cp[k])) last_newline = k;
      if (last_newline != n) {
        j = last_newline + 1;  // \s*[\r\n]+
      } else if (e == n || e - i == 1) {
        j = e;  // \s+(?!\S) at the end, or \s+ for a single space before a word
      } else {
        j = e - 1;  // \s+(?!\S): leave the last space to the word that follows
      }
      if (j == i) j = i + 1;
    }
    words.push_back(s.substr(offs[i], offs[j] - offs[i]));
    i = j;
  }
  return words;
}

}  // namespace graft::tokenize

namespace graft {
namespace {

using tokenize::Split;
using tokenize::split_words;

// GPT-2's reversible map from bytes to printable characters.
struct ByteMap {
  std::array<std::string, 256> to_char;
  std::unordered_map<char32_t, unsigned char> to_byte;
  ByteMap() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
      utf8_append(to_char[b], c);
      to_byte[c] = static_cast<unsigned char>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

struct AddedToken {
  std::string content;
  std::int64_t id;
  bool special;
};

class HfTokenizer : public Tokenizer {
 public:
  enum class Kind { bpe, wordpiece };
  enum class Decoder { byte_level, wordpiece, metaspace };

  // Model.
  Kind kind = Kind::bpe;
  std::vector<std::string> vocab;
  std::unordered_map<std::string, std::int64_t> ids;
  std::unordered_map<std::string, int> ranks;  // "left\x01right" -> merge rank
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::string unk_token;
  std::string subword_prefix = "##";
  std::size_t max_word_chars = 100;
  // Normalisation and pre-tokenisation.
  bool byte_level = false;
  bool add_prefix_space = false;
  Split split = Split::none;
  bool metaspace = false;     // spaces become U+2581
  bool prepend_meta = false;  // and U+2581 is put in front of the text
  bool bert_normalize = false, lowercase = false, strip_accents = false;
  // Decoding and special tokens.
  Decoder decoder = Decoder::byte_level;
  bool strip_leading_space = false;
  bool cleanup_spaces = false;
  std::vector<std::int64_t> prefix_ids, suffix_ids;
  std::vector<AddedToken> added;
  std::unordered_set<std::int64_t> special;

  void set_specials(std::int64_t bos, std::int64_t eos, std::int64_t pad, std::int64_t unk) {
    bos_ = bos;
    eos_ = eos;
    pad_ = pad;
    unk_ = unk;
  }

  // llama.cpp reads byte-level BPE from GGUF as its "gpt2" model: the vocabulary, the merges in
  // rank order and the pre-tokenizer by name. SentencePiece-style and WordPiece vocabularies from
  // tokenizer.json have no faithful GGUF form (llama.cpp's SentencePiece needs the scores that
  // tokenizer.json does not keep), and are refused.
  std::vector<std::pair<std::string, io::GgufValue>> gguf_metadata() const override {
    if (kind != Kind::bpe || !byte_level)
      throw Error(std::string("a ") +
                  (kind == Kind::wordpiece ? "WordPiece" : "SentencePiece-style") +
                  " tokenizer.json has no faithful form in llama.cpp's GGUF tokenizer keys (its "
                  "SentencePiece tokenizer needs scores that tokenizer.json does not keep)");
    const char* pre = split == Split::gpt2     ? "gpt-2"
                      : split == Split::llama3 ? "llama-bpe"
                      : split == Split::qwen2  ? "qwen2"
                                               : nullptr;
    if (!pre || add_prefix_space)
      throw Error("this byte-level BPE's pre-tokenisation has no name llama.cpp knows");
    if (!suffix_ids.empty() || prefix_ids.size() > 1 ||
        (prefix_ids.size() == 1 && prefix_ids[0] != bos_id()))
      throw Error(
          "this tokenizer adds tokens around a sequence in a way llama.cpp's "
          "add_bos_token cannot say");
    std::vector<std::int64_t> types(vocab.size(), 1);
    for (std::size_t i = 0; i < vocab.size(); ++i)
      if (vocab[i].empty())
        throw Error("the vocabulary has no token with id " + std::to_string(i) +
                    ", and GGUF numbers tokens by position");
    for (const auto& a : added) types[a.id] = a.special ? 3 : 4;
    // In rank order; a merge listed twice keeps its first rank, as when it was read.
    std::vector<std::pair<int, std::string>> ordered;
    for (const auto& [pair, rank] : ranks) {
      auto m = pair;
      m[m.find('\x01')] = ' ';
      ordered.emplace_back(rank, m);
    }
    std::sort(ordered.begin(), ordered.end());
    std::vector<std::string> merges;
    for (auto& [rank, m] : ordered) merges.push_back(std::move(m));
    std::vector<std::pair<std::string, io::GgufValue>> m = {
        {"tokenizer.ggml.model", io::gguf_string("gpt2")},
        {"tokenizer.ggml.pre", io::gguf_string(pre)},
        {"tokenizer.ggml.tokens", io::gguf_strings(vocab)},
        {"tokenizer.ggml.token_type", io::gguf_ints(types)},
        {"tokenizer.ggml.merges", io::gguf_strings(merges)},
        {"tokenizer.ggml.add_bos_token", io::gguf_bool(!prefix_ids.empty())}};
    tokenize::add_special_ids(m, *this);
    return m;
  }

  void finish() {
    for (std::size_t i = 0; i < vocab.size(); ++i)
      if (!vocab[i].empty()) ids.emplace(vocab[i], static_cast<std::int64_t>(i));
    for (const auto& a : added) {
      if (a.id >= static_cast<std::int64_t>(vocab.size())) vocab.resize(a.id + 1);
      vocab[a.id] = a.content;
      ids[a.content] = a.id;
      if (a.special) special.insert(a.id);
    }
    std::sort(added.begin(), added.end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content.size() > b.content.size();
    });
    if (!unk_token.empty() && ids.count(unk_token)) unk_ = ids[unk_token];
  }

  std::vector<std::int64_t> encode(const std::string& text, bool add_special) const override {
    std::vector<std::int64_t> out;
    if (add_special) out = prefix_ids;
    std::size_t start = 0;
    bool first = true;
    // Added tokens are matched in the raw text first (longest first), as transformers does.
    for (std::size_t i = 0; i < text.size();) {
      const AddedToken* hit = nullptr;
      for (const auto& a : added)
        if (!a.content.empty() && text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      if (!hit) {
        ++i;
        continue;
      }
      encode_segment(text.substr(start, i - start), first, out);
      out.push_back(hit->id);
      first = false;
      i += hit->content.size();
      start = i;
    }
    encode_segment(text.substr(start), first, out);
    if (add_special) out.insert(out.end(), suffix_ids.begin(), suffix_ids.end());
    return out;
  }

  std::string decode(const std::vector<std::int64_t>& in, bool skip_special) const override {
    std::vector<std::string> pieces;
    std::vector<bool> is_added;
    for (auto id : in) {
      if (id < 0 || id >= vocab_size()) continue;
      if (skip_special && special.count(id)) continue;
      pieces.push_back(vocab[id]);
      is_added.push_back(
          special.count(id) > 0 ||
          std::any_of(added.begin(), added.end(), [&](const AddedToken& a) { return a.id == id; }));
    }
    std::string out;
    if (decoder == Decoder::byte_level) {
      const auto& m = byte_map();
      for (std::size_t k = 0; k < pieces.size(); ++k) {
        if (is_added[k]) {
          out += pieces[k];
          continue;
        }
        for (std::size_t i = 0; i < pieces[k].size();) {
          char32_t c = utf8_next(pieces[k], i);
          auto it = m.to_byte.find(c);
          if (it != m.to_byte.end())
            out += static_cast<char>(it->second);
          else
            utf8_append(out, c);
        }
      }
    } else if (decoder == Decoder::wordpiece) {
      for (std::size_t k = 0; k < pieces.size(); ++k) {
        const auto& p = pieces[k];
        if (k > 0 && p.compare(0, subword_prefix.size(), subword_prefix) == 0 && !is_added[k]) {
          out += p.substr(subword_prefix.size());
        } else {
          out += (k ? " " : "") + p;
        }
      }
      if (cleanup_spaces) out = cleanup(out);
    } else {
      for (std::size_t k = 0; k < pieces.size(); ++k) {
        const auto& p = pieces[k];
        if (!is_added[k] && p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>') {
          out += static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16));
          continue;
        }
        for (std::size_t i = 0; i < p.size();) {
          if (p.compare(i, kMeta.size(), kMeta) == 0) {
            out += ' ';
            i += kMeta.size();
          } else {
            out += p[i++];
          }
        }
      }
      if (strip_leading_space && !out.empty() && out[0] == ' ') out.erase(0, 1);
    }
    return out;
  }

  std::int64_t vocab_size() const override { return static_cast<std::int64_t>(vocab.size()); }
  std::string token(std::int64_t id) const override {
    return id >= 0 && id < vocab_size() ? vocab[id] : std::string();
  }
  std::int64_t id(const std::string& token) const override {
    auto it = ids.find(token);
    return it == ids.end() ? -1 : it->second;
  }

 private:
  static std::string cleanup(std::string s) {
    static const std::pair<const char*, const char*> kRules[] = {
        {" .", "."},     {" ?", "?"},   {" !", "!"},   {" ,", ","},     {" ' ", "'"},
        {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    for (const auto& [from, to] : kRules) {
      const std::string f = from, t = to;
      for (std::size_t p = s.find(f); p != std::string::npos; p = s.find(f, p + t.size()))
        s.replace(p, f.size(), t);
    }
    return s;
  }

  std::string bert_normal_form(const std::string& s) const {
    std::string out;
    for (std::size_t i = 0; i < s.size();) {
      char32_t c = utf8_next(s, i);
      if (c == 0 || c == 0xFFFD || (u_iscntrl(c) && c != '\t' && c != '\n' && c != '\r')) continue;
      if (is_space(c)) {
        out += ' ';
        continue;
      }
      // CJK ideographs become words of their own.
      const bool cjk = (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
                       (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
                       (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
                       (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
      if (cjk) out += ' ';
      utf8_append(out, lowercase ? static_cast<char32_t>(u_tolower(c)) : c);
      if (cjk) out += ' ';
    }
    if (strip_accents) out = remove_accents(out);
    return out;
  }

  static std::string remove_accents(const std::string& s) {
    UErrorCode err = U_ZERO_ERROR;
    const UNormalizer2* nfd = unorm2_getNFDInstance(&err);
    if (U_FAILURE(err)) return s;
    std::string out;
    for (std::size_t i = 0; i < s.size();) {
      char32_t c = utf8_next(s, i);
      UChar buf[16];
      int32_t len = unorm2_getDecomposition(nfd, static_cast<UChar32>(c), buf, 16, &err);
      if (U_FAILURE(err) || len < 0) {
        err = U_ZERO_ERROR;
        if (u_charType(c) != U_NON_SPACING_MARK) utf8_append(out, c);
        continue;
      }
      for (int32_t k = 0; k < len;) {
        UChar32 d;
        U16_NEXT(buf, k, len, d);
        if (u_charType(d) != U_NON_SPACING_MARK) utf8_append(out, static_cast<char32_t>(d));
      }
    }
    return out;
  }

  static bool bert_punct(char32_t c) {
    if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
        (c >= 123 && c <= 126))
      return true;
    auto t = u_charType(static_cast<UChar32>(c));
    return t >= U_DASH_PUNCTUATION && t <= U_OTHER_PUNCTUATION
               ? true
               : t == U_INITIAL_PUNCTUATION || t == U_FINAL_PUNCTUATION;
  }

  std::vector<std::string> bert_words(const std::string& s) const {
    std::vector<std::string> words;
    std::string cur;
    for (std::size_t i = 0; i < s.size();) {
      char32_t c = utf8_next(s, i);
      if (is_space(c)) {
        if (!cur.empty()) words.push_back(std::move(cur));
        cur.clear();
      } else if (bert_punct(c)) {
        if (!cur.empty()) words.push_back(std::move(cur));
        cur.clear();
        std::string p;
        utf8_append(p, c);
        words.push_back(p);
      } else {
        utf8_append(cur, c);
      }
    }
    if (!cur.empty()) words.push_back(cur);
    return words;
  }

  void encode_segment(const std::string& raw, bool first, std::vector<std::int64_t>& out) const {
    if (raw.empty()) return;
    if (kind == Kind::wordpiece) {
      for (const auto& w : bert_words(bert_normalize ? bert_normal_form(raw) : raw))
        wordpiece(w, out);
      return;
    }
    std::string text = raw;
    if (metaspace) {
      std::string t = prepend_meta && first ? kMeta : "";
      for (char c : text) c == ' ' ? t += kMeta : t += c;
      text = std::move(t);
    }
    if (byte_level && add_prefix_space && first && text[0] != ' ') text = " " + text;
    for (const auto& word : split_words(text, split)) {
      if (!byte_level) {
        bpe(word, out);
        continue;
      }
      std::string mapped;
      for (unsigned char c : word) mapped += byte_map().to_char[c];
      bpe(mapped, out);
    }
  }

  void bpe(const std::string& word, std::vector<std::int64_t>& out) const {
    if (ignore_merges) {
      auto it = ids.find(word);
      if (it != ids.end()) {
        out.push_back(it->second);
        return;
      }
    }
    std::vector<std::string> parts = tokenize::utf8_chars(word);
    while (parts.size() > 1) {
      int best = INT_MAX;
      std::size_t at = 0;
      for (std::size_t k = 0; k + 1 < parts.size(); ++k) {
        auto it = ranks.find(parts[k] + '\x01' + parts[k + 1]);
        if (it != ranks.end() && it->second < best) {
          best = it->second;
          at = k;
        }
      }
      if (best == INT_MAX) break;
      // Merge every occurrence of the best pair, left to right.
      const std::string left = parts[at], right = parts[at + 1];
      std::vector<std::string> merged;
      for (std::size_t k = 0; k < parts.size();) {
        if (k + 1 < parts.size() && parts[k] == left && parts[k + 1] == right) {
          merged.push_back(left + right);
          k += 2;
        } else {
          merged.push_back(parts[k++]);
        }
      }
      parts = std::move(merged);
    }
    for (const auto& p : parts) {
      auto it = ids.find(p);
      if (it != ids.end()) {
        out.push_back(it->second);
      } else if (byte_fallback) {
        for (unsigned char c : p) {
          char name[8];
          std::snprintf(name, sizeof name, "<0x%02X>", c);
          auto b = ids.find(name);
          if (b != ids.end())
            out.push_back(b->second);
          else if (unk_ >= 0)
            out.push_back(unk_);
        }
      } else if (unk_ >= 0) {
        out.push_back(unk_);
      }
    }
  }

  void wordpiece(const std::string& word, std::vector<std::int64_t>& out) const {
    auto chars = tokenize::utf8_chars(word);
    if (chars.size() > max_word_chars) {
      if (unk_ >= 0) out.push_back(unk_);
      return;
    }
    std::vector<std::int64_t> pieces;
    for (std::size_t start = 0; start < chars.size();) {
      std::size_t end = chars.size();
      std::int64_t found = -1;
      for (; end > start; --end) {
        std::string sub = start > 0 ? subword_prefix : "";
        for (std::size_t k = start; k < end; ++k) sub += chars[k];
        auto it = ids.find(sub);
        if (it != ids.end()) {
          found = it->second;
          break;
        }
      }
      if (found < 0) {
        if (unk_ >= 0) out.push_back(unk_);
        return;
      }
      pieces.push_back(found);
      start = end;
    }
    out.insert(out.end(), pieces.begin(), pieces.end());
  }
};

[[noreturn]] void unsupported(const std::string& where, const std::string& part, const json& j) {
  throw FileError(where, part + " " + j.dump().substr(0, 200) + " is not supported");
}

Split split_from_regex(const std::string& where, const std::string& pattern) {
  if (pattern.rfind("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+", 0) == 0) return Split::gpt2;
  if (pattern.find("\\p{N}{1,3}") != std::string::npos) return Split::llama3;
  if (pattern.rfind("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}", 0) == 0)
    return Split::qwen2;
  throw FileError(where, "pre-tokenizer pattern " + json(pattern).dump().substr(0, 120) +
                             " is not one graft knows (GPT-2, Llama 3, Qwen2)");
}

void read_pre_tokenizer(HfTokenizer& t, const json& p, const std::string& where) {
  if (p.is_null()) return;
  const auto type = p.value("type", "");
  if (type == "Sequence") {
    for (const auto& q : p.at("pretokenizers")) read_pre_tokenizer(t, q, where);
  } else if (type == "ByteLevel") {
    t.byte_level = true;
    t.add_prefix_space = p.value("add_prefix_space", false);
    if (p.value("use_regex", true) && t.split == Split::none) t.split = Split::gpt2;
  } else if (type == "Split") {
    if (!p.contains("pattern") || !p.at("pattern").contains("Regex"))
      unsupported(where, "pre-tokenizer", p);
    t.split = split_from_regex(where, p.at("pattern").at("Regex").get<std::string>());
  } else if (type == "Metaspace") {
    t.metaspace = true;
    const auto scheme =
        p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    t.prepend_meta = scheme != "never";
    if (p.value("split", false)) unsupported(where, "pre-tokenizer", p);
  } else if (type == "BertPreTokenizer" || type == "Whitespace" || type == "WhitespaceSplit") {
    // WordPiece splits on whitespace and punctuation itself.
  } else {
    unsupported(where, "pre-tokenizer", p);
  }
}

void read_normalizer(HfTokenizer& t, const json& n, const std::string& where) {
  if (n.is_null()) return;
  const auto type = n.value("type", "");
  if (type == "Sequence") {
    for (const auto& m : n.at("normalizers")) read_normalizer(t, m, where);
  } else if (type == "BertNormalizer") {
    t.bert_normalize = true;
    t.lowercase = n.value("lowercase", true);
    t.strip_accents = n.contains("strip_accents") && !n.at("strip_accents").is_null()
                          ? n.at("strip_accents").get<bool>()
                          : t.lowercase;
  } else if (type == "Prepend" && n.value("prepend", "") == kMeta) {
    t.metaspace = true;
    t.prepend_meta = true;
  } else if (type == "Replace" && n.contains("pattern") &&
             n.at("pattern").value("String", "") == " " && n.value("content", "") == kMeta) {
    t.metaspace = true;
  } else if (type == "NFC" && t.byte_level) {
    // Qwen2 normalises to NFC; text that is already NFC (nearly all) is unchanged.
  } else {
    unsupported(where, "normalizer", n);
  }
}

std::int64_t special_id(const json& entry) {
  // ["[CLS]", 101] in BertProcessing / RobertaProcessing
  return entry.is_array() && entry.size() == 2 ? entry[1].get<std::int64_t>() : -1;
}

void read_post_processor(HfTokenizer& t, const json& p, const std::string& where) {
  if (p.is_null()) return;
  const auto type = p.value("type", "");
  if (type == "Sequence") {
    for (const auto& q : p.at("processors")) read_post_processor(t, q, where);
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    t.prefix_ids = {special_id(p.at("cls"))};
    t.suffix_ids = {special_id(p.at("sep"))};
  } else if (type == "TemplateProcessing") {
    const auto& specials = p.at("special_tokens");
    bool after = false;
    for (const auto& item : p.at("single")) {
      if (item.contains("Sequence")) {
        after = true;
      } else if (item.contains("SpecialToken")) {
        const auto name = item.at("SpecialToken").at("id").get<std::string>();
        if (!specials.contains(name))
          throw FileError(where, "post_processor names unknown special token " + name);
        for (const auto& id : specials.at(name).at("ids"))
          (after ? t.suffix_ids : t.prefix_ids).push_back(id.get<std::int64_t>());
      }
    }
  } else if (type != "ByteLevel") {
    unsupported(where, "post-processor", p);
  }
}

void read_decoder(HfTokenizer& t, const json& d, const std::string& where) {
  if (d.is_null()) return;
  const auto type = d.value("type", "");
  if (type == "ByteLevel") {
    t.decoder = HfTokenizer::Decoder::byte_level;
  } else if (type == "WordPiece") {
    t.decoder = HfTokenizer::Decoder::wordpiece;
    t.subword_prefix = d.value("prefix", "##");
    t.cleanup_spaces = d.value("cleanup", true);
  } else if (type == "Metaspace") {
    t.decoder = HfTokenizer::Decoder::metaspace;
    t.strip_leading_space =
        d.value("prepend_scheme", "always") != "never" && d.value("add_prefix_space", true);
  } else if (type == "Sequence") {
    t.decoder = HfTokenizer::Decoder::metaspace;
    for (const auto& e : d.at("decoders")) {
      const auto et = e.value("type", "");
      if (et == "Strip")
        t.strip_leading_space = e.value("start", 0) > 0;
      else if (et == "ByteLevel")
        t.decoder = HfTokenizer::Decoder::byte_level;
      else if (et != "Replace" && et != "ByteFallback" && et != "Fuse")
        unsupported(where, "decoder", e);
    }
  } else {
    unsupported(where, "decoder", d);
  }
}

// tokenizer_config.json names the BOS/EOS/PAD tokens (as strings or {"content": ...}).
std::int64_t config_token(const HfTokenizer& t, const json& cfg, const char* key) {
  if (!cfg.contains(key) || cfg[key].is_null()) return -1;
  const auto& v = cfg[key];
  const std::string s = v.is_string() ? v.get<std::string>() : v.value("content", "");
  return t.id(s);
}

void add_merge(HfTokenizer& t, const std::string& left, const std::string& right, int rank) {
  t.ranks.emplace(left + '\x01' + right, rank);
}

}  // namespace

std::shared_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& path) {
  const std::string where = path.string();
  const auto text = io::read_text_file(path);
  const json j = io::parse_json(text, where);
  auto t = std::make_shared<HfTokenizer>();
  // Ids index a table: each is below the file's size in bytes (every entry takes several), so
  // a small file cannot ask for a large table.
  const auto id_limit = std::min<std::int64_t>(static_cast<std::int64_t>(text.size()), 10'000'000);
  auto check_id = [&](std::int64_t i, const char* what) {
    if (i < 0 || i >= id_limit)
      throw FileError(where, std::string(what) + " id " + std::to_string(i) +
                                 " is out of range (0 to " + std::to_string(id_limit - 1) +
                                 " in a file of this size)");
    return i;
  };
  try {
    const auto& model = j.at("model");
    const auto type = model.value("type", model.contains("merges") ? "BPE" : "WordPiece");
    for (const auto& [token, id] : model.at("vocab").items()) {
      const auto i = check_id(id.get<std::int64_t>(), "vocab");
      if (i >= static_cast<std::int64_t>(t->vocab.size())) t->vocab.resize(i + 1);
      t->vocab[i] = token;
    }
    if (type == "BPE") {
      t->kind = HfTokenizer::Kind::bpe;
      int rank = 0;
      for (const auto& m : model.at("merges")) {
        if (m.is_string()) {
          const auto s = m.get<std::string>();
          const auto sp = s.find(' ');
          if (sp == std::string::npos) throw FileError(where, "merge \"" + s + "\" has no space");
          add_merge(*t, s.substr(0, sp), s.substr(sp + 1), rank++);
        } else {
          add_merge(*t, m.at(0).get<std::string>(), m.at(1).get<std::string>(), rank++);
        }
      }
      t->byte_fallback = model.value("byte_fallback", false);
      t->ignore_merges = model.value("ignore_merges", false);
      if (model.contains("unk_token") && model.at("unk_token").is_string())
        t->unk_token = model.at("unk_token");
      t->decoder = HfTokenizer::Decoder::byte_level;
    } else if (type == "WordPiece") {
      t->kind = HfTokenizer::Kind::wordpiece;
      t->unk_token = model.value("unk_token", "[UNK]");
      t->subword_prefix = model.value("continuing_subword_prefix", "##");
      t->max_word_chars = model.value("max_input_chars_per_word", 100);
      t->decoder = HfTokenizer::Decoder::wordpiece;
    } else {
      throw FileError(
          where, "model type \"" + type + "\" is not supported (graft reads BPE and WordPiece)");
    }
    if (j.contains("added_tokens"))
      for (const auto& a : j.at("added_tokens"))
        t->added.push_back({a.at("content").get<std::string>(),
                            check_id(a.at("id").get<std::int64_t>(), "added token"),
                            a.value("special", false)});
    read_normalizer(*t, j.value("normalizer", json()), where);
    read_pre_tokenizer(*t, j.value("pre_tokenizer", json()), where);
    read_post_processor(*t, j.value("post_processor", json()), where);
    read_decoder(*t, j.value("decoder", json()), where);
  } catch (const json::exception& e) {
    throw FileError(where, "unexpected structure: " + io::json_error_text(e));
  }
  t->finish();

  json cfg;
  const auto cfg_path = path.parent_path() / "tokenizer_config.json";
  if (std::filesystem::exists(cfg_path)) {
    cfg = io::read_json_file(cfg_path);
  }
  auto pick = [&](const char* key, std::int64_t fallback) {
    auto id = config_token(*t, cfg, key);
    return id >= 0 ? id : fallback;
  };
  const std::int64_t first = t->prefix_ids.empty() ? -1 : t->prefix_ids.front();
  const std::int64_t last = t->suffix_ids.empty() ? -1 : t->suffix_ids.back();
  auto bos = pick("bos_token", first >= 0 ? first : t->id("<s>"));
  auto eos = pick("eos_token", last >= 0            ? last
                               : t->id("</s>") >= 0 ? t->id("</s>")
                                                    : t->id("<|endoftext|>"));
  t->set_specials(bos, eos,
                  pick("pad_token", t->id("[PAD]") >= 0 ? t->id("[PAD]") : t->id("<pad>")),
                  pick("unk_token", t->unk_id()));
  return t;
}

std::shared_ptr<Tokenizer> make_gguf_byte_level_bpe(const io::GgufFile& f) {
  const std::string where = f.path().string();
  auto t = std::make_shared<HfTokenizer>();
  t->kind = HfTokenizer::Kind::bpe;
  t->byte_level = true;
  t->decoder = HfTokenizer::Decoder::byte_level;
  t->vocab = f.at("tokenizer.ggml.tokens").as_strings("tokenizer.ggml.tokens");
  int rank = 0;
  for (const auto& m : f.at("tokenizer.ggml.merges").as_strings("tokenizer.ggml.merges")) {
    const auto sp = m.find(' ');
    if (sp == std::string::npos) throw FileError(where, "merge \"" + m + "\" has no space");
    add_merge(*t, m.substr(0, sp), m.substr(sp + 1), rank++);
  }
  const auto pre =
      f.find("tokenizer.ggml.pre") ? f.at("tokenizer.ggml.pre").as_string("pre") : "gpt-2";
  if (pre == "llama-bpe" || pre == "llama3")
    t->split = Split::llama3;
  else if (pre == "qwen2")
    t->split = Split::qwen2;
  else if (pre == "gpt-2" || pre == "default")
    t->split = Split::gpt2;
  else
    throw FileError(where, "tokenizer.ggml.pre \"" + pre +
                               "\" is not supported (graft reads gpt-2, llama-bpe, qwen2)");
  if (auto* types = f.find("tokenizer.ggml.token_type")) {
    auto ts = types->as_ints("tokenizer.ggml.token_type");
    for (std::size_t i = 0; i < ts.size() && i < t->vocab.size(); ++i)
      if (ts[i] == 3 || ts[i] == 4)
        t->added.push_back({t->vocab[i], static_cast<std::int64_t>(i), ts[i] == 3});
  }
  t->finish();
  auto id = [&](const char* key) { return f.find(key) ? f.at(key).as_int(key) : -1; };
  t->set_specials(id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"),
                  id("tokenizer.ggml.padding_token_id"), id("tokenizer.ggml.unknown_token_id"));
  if (auto* add_bos = f.find("tokenizer.ggml.add_bos_token");
      add_bos && add_bos->i && t->bos_id() >= 0)
    t->prefix_ids = {t->bos_id()};
  return t;
}

}  // namespace graft
