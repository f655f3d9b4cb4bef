#include <graft/chat.h>
#include <graft/data.h>
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <graft/tokenizer.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "support.h"
#include "tokenize/pretokenize.h"
#include "tokenizer_files.h"

using namespace graft;
using graft::test::TempDir;
using json = nlohmann::json;
using Ids = std::vector<std::int64_t>;
using Words = std::vector<std::string>;
using graft::test::byte_char;

namespace {

void write_json(const std::filesystem::path& p, const json& j) { std::ofstream(p) << j.dump(); }

}  // namespace

TEST_CASE("pre-tokenisation follows the GPT-2, Llama 3 and Qwen2 patterns") {
  using tokenize::Split;
  using tokenize::split_words;
  CHECK(split_words("Hello world's  end\n", Split::gpt2) ==
        Words{"Hello", " world", "'s", " ", " end", "\n"});
  CHECK(split_words("I have 1234 apples!!", Split::gpt2) ==
        Words{"I", " have", " 1234", " apples", "!!"});
  CHECK(split_words("IT'S", Split::gpt2) == Words{"IT", "'", "S"});
  CHECK(split_words("Grüße, мир", Split::gpt2) == Words{"Grüße", ",", " мир"});
  CHECK(split_words("I have 1234 apples!!\n\nOK", Split::llama3) ==
        Words{"I", " have", " ", "123", "4", " apples", "!!\n\n", "OK"});
  CHECK(split_words("IT'S (hi)", Split::llama3) == Words{"IT", "'S", " (", "hi", ")"});
  CHECK(split_words("a  \n  b", Split::llama3) == Words{"a", "  \n", " ", " b"});
  CHECK(split_words("x 1234", Split::qwen2) == Words{"x", " ", "1", "2", "3", "4"});
  for (auto style : {Split::gpt2, Split::llama3, Split::qwen2}) {
    std::string joined;
    const std::string text = "  Mixed\tText 42 ünïcödé\r\n\n end  ";
    for (const auto& w : split_words(text, style)) joined += w;
    CHECK(joined == text);
  }
}

namespace {

// <unk>, <s>, </s> and the 256 byte pieces <0x00>..<0xFF> (ids 3..258), for vocabularies built
// in a test; `add` appends a piece with its score and GGUF token type.
SentencePieceVocab byte_vocab() {
  SentencePieceVocab v;
  auto add = [&](const std::string& p, int type) {
    v.pieces.push_back(p);
    v.scores.push_back(0);
    v.types.push_back(type);
  };
  add("<unk>", 2);
  add("<s>", 3);
  add("</s>", 3);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    add(name, 6);
  }
  v.unk = 0;
  v.bos = 1;
  v.eos = 2;
  return v;
}

}  // namespace

TEST_CASE("SentencePiece BPE merges by score and falls back to bytes") {
  SentencePieceVocab v = byte_vocab();
  auto add = [&](const std::string& p, float score, int type) {
    v.pieces.push_back(p);
    v.scores.push_back(score);
    v.types.push_back(type);
  };
  const std::int64_t base = static_cast<std::int64_t>(v.pieces.size());
  add("\xE2\x96\x81", -5, 1);  // base + 0: "▁"
  add("a", -5, 1);             // base + 1
  add("b", -5, 1);             // base + 2
  add("c", -5, 1);             // base + 3
  add("\xE2\x96\x81"
      "a",
      -1, 1);        // base + 4: "▁a"
  add("ab", -2, 1);  // base + 5
  add("\xE2\x96\x81"
      "ab",
      -0.5, 1);  // base + 6: "▁ab"
  add("\xE2\x96\x81"
      "c",
      -3, 1);  // base + 7: "▁c"
  auto tok = make_sentencepiece_bpe(v);
  // "ab c" -> "▁ab▁c": "▁a" (-1) merges before "ab" (-2), then "▁ab" (-0.5), then "▁c".
  CHECK(tok->encode("ab c") == Ids{1, base + 6, base + 7});
  CHECK(tok->encode("ab c", false) == Ids{base + 6, base + 7});
  // "é" is not in the vocabulary: its two UTF-8 bytes.
  CHECK(tok->encode("cé", false) == Ids{base + 7, 3 + 0xC3, 3 + 0xA9});
  CHECK(tok->encode("b", false) == Ids{base + 0, base + 2});
  CHECK(tok->decode(tok->encode("ab cé")) == "ab cé");
  CHECK(tok->decode({1, base + 6, 2}, false) == "<s>ab</s>");
  CHECK(tok->decode({1, base + 6, 2}) == "ab");
  CHECK(tok->id("▁ab") == base + 6);
  CHECK(tok->token(base + 1) == "a");
}

TEST_CASE("the stories260K tokenizer round-trips text") {
  GRAFT_MODEL_OR_SKIP(path, "stories260K");
  io::GgufFile f(path);
  auto tok = tokenizer_from_gguf(f);
  CHECK(tok->vocab_size() == 512);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  auto ids = tok->encode("Once upon a time");
  CHECK(ids.front() == 1);
  CHECK(ids.size() < 10);  // merged, not spelled out
  for (const std::string text :
       {"Once upon a time, there was a little girl named Lily.",
        "Lily's mom said, \"Don't worry.\"\nThe end.", "Zebras & café: 42%!"})
    CHECK(tok->decode(tok->encode(text)) == text);
}

TEST_CASE("byte-level BPE from tokenizer.json (GPT-2 style)") {
  TempDir dir;
  const json j = test::gpt2_style_tokenizer();
  write_json(dir / "tokenizer.json", j);
  auto tok = load_tokenizer_json(dir / "tokenizer.json");
  CHECK(tok->vocab_size() == 260);
  // "the" has no leading space: t + he; " the" merges fully; the special token is matched whole.
  CHECK(tok->encode("the the<|endoftext|>") == Ids{'t', 257, 258, 259});
  CHECK(tok->decode({'t', 257, 258, 259}, false) == "the the<|endoftext|>");
  CHECK(tok->decode({'t', 257, 258, 259}) == "the the");
  CHECK(tok->eos_id() == 259);
  const std::string text = "Grüße\n  aus 2024!";
  CHECK(tok->decode(tok->encode(text)) == text);
}

TEST_CASE("SentencePiece-style BPE from tokenizer.json (Llama 2 style)") {
  TempDir dir;
  const json j = test::llama_style_tokenizer();
  write_json(dir / "tokenizer.json", j);
  auto tok = load_tokenizer_json(dir / "tokenizer.json");
  CHECK(tok->encode("ab é") == Ids{1, 263, 259, 3 + 0xC3, 3 + 0xA9});
  CHECK(tok->decode(tok->encode("ab é")) == "ab é");
  CHECK(tok->bos_id() == 1);
}

TEST_CASE("WordPiece from tokenizer.json (BERT style)") {
  TempDir dir;
  const json j = test::bert_style_tokenizer();
  write_json(dir / "tokenizer.json", j);
  auto tok = load_tokenizer_json(dir / "tokenizer.json");
  auto ids = tok->encode("Hello, UNAFFABLE worlds! Café zzz");
  CHECK(ids == Ids{2, 4, 10, 7, 8, 9, 5, 6, 11, 12, 1, 3});
  CHECK(tok->decode(ids) == "hello, unaffable worlds! cafe [UNK]");
  CHECK(tok->pad_id() == 0);
}

TEST_CASE("unsupported tokenizer.json parts are named in the error") {
  TempDir dir;
  write_json(dir / "tokenizer.json", {{"model", {{"type", "Unigram"}, {"vocab", json::object()}}}});
  CHECK_THROWS_WITH_AS(load_tokenizer_json(dir / "tokenizer.json"),
                       doctest::Contains("\"Unigram\" is not supported"), FileError);
  std::ofstream(dir / "bad.json") << "{";
  CHECK_THROWS_WITH_AS(load_tokenizer_json(dir / "bad.json"),
                       doctest::Contains("not valid JSON at line 1, column 2"), FileError);
}

namespace {

// Writes a tokenizer's GGUF keys into a file with no tensors and reads the tokenizer back.
std::shared_ptr<Tokenizer> through_gguf(const Tokenizer& tok, const std::filesystem::path& file) {
  io::write_gguf(file, tok.gguf_metadata(), {});
  return tokenizer_from_gguf(io::GgufFile(file));
}

void check_same_tokenizer(const Tokenizer& a, const Tokenizer& b) {
  CHECK(a.vocab_size() == b.vocab_size());
  CHECK(a.bos_id() == b.bos_id());
  CHECK(a.eos_id() == b.eos_id());
  for (const std::string text : {"the the<|endoftext|>", "Once upon a time, there was Lily.",
                                 "Grüße\n  aus 2024!", "Zebras & café: 42%!"}) {
    CAPTURE(text);
    CHECK(a.encode(text) == b.encode(text));
    CHECK(a.decode(a.encode(text)) == b.decode(b.encode(text)));
  }
}

}  // namespace

TEST_CASE("tokenizers written in llama.cpp's GGUF keys read back the same") {
  TempDir dir;
  SUBCASE("byte-level BPE from tokenizer.json, as llama.cpp's gpt2 model") {
    json vocab = json::object();
    for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
    vocab["\xC4\xA0t"] = 256;
    vocab["he"] = 257;
    vocab["\xC4\xA0the"] = 258;
    json j = {
        {"model",
         {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"\xC4\xA0 t", "h e", "\xC4\xA0t he"}}}},
        {"added_tokens", {{{"id", 259}, {"content", "<|endoftext|>"}, {"special", true}}}},
        {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
        {"decoder", {{"type", "ByteLevel"}}}};
    write_json(dir / "tokenizer.json", j);
    auto tok = load_tokenizer_json(dir / "tokenizer.json");
    auto meta = tok->gguf_metadata();
    CHECK(meta.front().second.s == "gpt2");
    check_same_tokenizer(*tok, *through_gguf(*tok, dir / "t.gguf"));
  }
  SUBCASE("stories260K's SentencePiece vocabulary") {
    GRAFT_MODEL_OR_SKIP(path, "stories260K");
    auto tok = tokenizer_from_gguf(io::GgufFile(path));
    check_same_tokenizer(*tok, *through_gguf(*tok, dir / "s.gguf"));
  }
  SUBCASE("vocabularies llama.cpp has no faithful form for are refused, saying why") {
    json j = {
        {"model",
         {{"type", "WordPiece"}, {"vocab", {{"[UNK]", 0}, {"a", 1}}}, {"unk_token", "[UNK]"}}},
        {"pre_tokenizer", {{"type", "BertPreTokenizer"}}},
        {"decoder", {{"type", "WordPiece"}}}};
    write_json(dir / "tokenizer.json", j);
    CHECK_THROWS_WITH_AS(load_tokenizer_json(dir / "tokenizer.json")->gguf_metadata(),
                         doctest::Contains("WordPiece tokenizer.json has no faithful form"), Error);
  }
}

namespace {

// Writes a tokenizer's Hugging Face files into `dir` and reads them back as graft reads
// tokenizer.json (with its tokenizer_config.json beside it).
std::shared_ptr<Tokenizer> through_tokenizer_json(const Tokenizer& tok,
                                                  const std::filesystem::path& dir) {
  for (const auto& [name, text] : tok.hf_files()) std::ofstream(dir / name) << text;
  return load_tokenizer_json(dir / "tokenizer.json");
}

}  // namespace

TEST_CASE("SentencePiece vocabularies written as tokenizer.json read back the same") {
  TempDir dir;
  SUBCASE("a vocabulary whose scores order the merges against their length") {
    SentencePieceVocab v = byte_vocab();
    auto add = [&](const std::string& p, float score, int type) {
      v.pieces.push_back(p);
      v.scores.push_back(score);
      v.types.push_back(type);
    };
    for (const auto& [piece, score] :
         std::vector<std::pair<std::string, float>>{{"\xE2\x96\x81", -5},
                                                    {"a", -5},
                                                    {"b", -5},
                                                    {"c", -5},
                                                    {"\xE2\x96\x81"
                                                     "a",
                                                     -1},
                                                    {"ab", -2},
                                                    {"\xE2\x96\x81"
                                                     "ab",
                                                     -0.5},
                                                    {"\xE2\x96\x81"
                                                     "c",
                                                     -3},
                                                    {"bc", -0.7},
                                                    {"abc", -0.6}})
      add(piece, score, 1);
    auto tok = make_sentencepiece_bpe(v);
    auto back = through_tokenizer_json(*tok, dir.path());
    check_same_tokenizer(*tok, *back);
    for (const std::string text : {"ab c", "abc abc", " abcab  c", "cé", "bcab", ""}) {
      CAPTURE(text);
      CHECK(tok->encode(text) == back->encode(text));
      CHECK(tok->encode(text, false) == back->encode(text, false));
    }
  }
  SUBCASE("stories260K's vocabulary") {
    GRAFT_MODEL_OR_SKIP(path, "stories260K");
    auto tok = tokenizer_from_gguf(io::GgufFile(path));
    auto back = through_tokenizer_json(*tok, dir.path());
    check_same_tokenizer(*tok, *back);
    // One known difference, as between SentencePiece and transformers: "<s>" typed in the text is
    // the BOS token for a tokenizer.json (an added token), and text for SentencePiece.
    CHECK(back->encode("<s>", false) == Ids{tok->bos_id()});
    CHECK(tok->encode("<s>", false) != Ids{tok->bos_id()});
    for (const std::string text :
         {"Once upon a time, there was a little girl named Lily. She loved to play outside.",
          "  two  spaces, a tab\tand\nnew lines\n", "日本語 🙂 naïve"}) {
      CAPTURE(text);
      CHECK(tok->encode(text) == back->encode(text));
      CHECK(tok->decode(tok->encode(text)) == back->decode(back->encode(text)));
    }
  }
}

// Chat templates, checked against renderings that Jinja (python3-jinja2 3.1, with transformers'
// settings trim_blocks and lstrip_blocks and its raise_exception) made from the same template
// texts, as tokenizer_config.json files hold them.
TEST_CASE("chat templates render as transformers' apply_chat_template does") {
  const std::map<std::string, std::string> jinja = {
      {"chatml",
       "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
       "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
       "'<|im_start|>assistant\\n' }}{% endif %}"},
      {"qwen2",
       "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
       "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif "
       "%}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
       "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif "
       "%}"},
      {"llama2",
       "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
       "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% "
       "set system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
       "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
       "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == "
       "0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
       "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] "
       "%}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() "
       "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + "
       "eos_token }}{% endif %}{% endfor %}"},
      {"llama3",
       "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
       "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
       "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
       "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
       "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"},
  };
  const std::map<std::string, std::vector<ChatMessage>> conversations = {
      {"user", {{"user", "  Hi there\n"}}},
      {"system_user", {{"system", "Be brief."}, {"user", "What is 2+2?"}}},
      {"turns",
       {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", " Hello! "}, {"user", "Bye"}}},
      {"answered", {{"user", "Name a colour."}, {"assistant", "Blue."}}},
  };
  const std::map<std::string, std::pair<std::string, std::string>> bos_eos = {
      {"chatml", {"", "<|im_end|>"}},
      {"qwen2", {"", "<|im_end|>"}},
      {"llama2", {"<s>", "</s>"}},
      {"llama3", {"<|begin_of_text|>", "<|eot_id|>"}}};
  struct Rendering {
    const char* jinja;
    const char* conversation;
    bool generation_prompt;
    const char* text;
  };
  const Rendering renderings[] = {
      {"chatml", "user", false, "<|im_start|>user\n  Hi there\n<|im_end|>\n"},
      {"chatml", "user", true, "<|im_start|>user\n  Hi there\n<|im_end|>\n<|im_start|>assistant\n"},
      {"chatml", "system_user", false,
       "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"},
      {"chatml", "system_user", true,
       "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is "
       "2+2?<|im_end|>\n<|im_start|>assistant\n"},
      {"chatml", "turns", false,
       "<|im_start|>system\nBe "
       "brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! "
       "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"},
      {"chatml", "turns", true,
       "<|im_start|>system\nBe "
       "brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! "
       "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"},
      {"chatml", "answered", false,
       "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"},
      {"chatml", "answered", true,
       "<|im_start|>user\nName a "
       "colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>assistant\n"},
      {"qwen2", "user", false,
       "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n  Hi "
       "there\n<|im_end|>\n"},
      {"qwen2", "user", true,
       "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n  Hi "
       "there\n<|im_end|>\n<|im_start|>assistant\n"},
      {"qwen2", "system_user", false,
       "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"},
      {"qwen2", "system_user", true,
       "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is "
       "2+2?<|im_end|>\n<|im_start|>assistant\n"},
      {"qwen2", "turns", false,
       "<|im_start|>system\nBe "
       "brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! "
       "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"},
      {"qwen2", "turns", true,
       "<|im_start|>system\nBe "
       "brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! "
       "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"},
      {"qwen2", "answered", false,
       "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName a "
       "colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"},
      {"qwen2", "answered", true,
       "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName a "
       "colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>assistant\n"},
      {"llama2", "user", false, "<s>[INST] Hi there [/INST]"},
      {"llama2", "user", true, "<s>[INST] Hi there [/INST]"},
      {"llama2", "system_user", false,
       "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]"},
      {"llama2", "system_user", true,
       "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]"},
      {"llama2", "turns", false,
       "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"},
      {"llama2", "turns", true,
       "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"},
      {"llama2", "answered", false, "<s>[INST] Name a colour. [/INST] Blue. </s>"},
      {"llama2", "answered", true, "<s>[INST] Name a colour. [/INST] Blue. </s>"},
      {"llama3", "user", false,
       "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"},
      {"llama3", "user", true,
       "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi "
       "there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
      {"llama3", "system_user", false,
       "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe "
       "brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"},
      {"llama3", "system_user", true,
       "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe "
       "brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is "
       "2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
      {"llama3", "turns", false,
       "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe "
       "brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>"
       "assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>"
       "\n\nBye<|eot_id|>"},
      {"llama3", "turns", true,
       "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe "
       "brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>"
       "assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>"
       "\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
      {"llama3", "answered", false,
       "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a "
       "colour.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>"},
      {"llama3", "answered", true,
       "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a "
       "colour.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|><|start_"
       "header_id|>assistant<|end_header_id|>\n\n"},
  };
  for (const auto& r : renderings) {
    CAPTURE(r.jinja);
    CAPTURE(r.conversation);
    CAPTURE(r.generation_prompt);
    const auto chat = ChatTemplate::recognise(jinja.at(r.jinja));
    const auto& [bos, eos] = bos_eos.at(r.jinja);
    CHECK(chat.render(conversations.at(r.conversation), r.generation_prompt, bos, eos) == r.text);
  }
  CHECK(ChatTemplate::recognise(jinja.at("qwen2")).default_system() ==
        "You are a helpful assistant.");
  CHECK(ChatTemplate::named("llama3").name() == "llama3");
  // Llama 2 raises on roles out of order; so does graft.
  CHECK_THROWS_WITH_AS(
      ChatTemplate::named("llama2").render({{"user", "a"}, {"user", "b"}}, false, "<s>", "</s>"),
      doctest::Contains("roles alternating user/assistant"), Error);
  // Another template (here: ChatML with its whitespace changed) is refused, never approximated.
  auto other = jinja.at("chatml");
  other.replace(other.find("{{'"), 3, "{{ '");
  CHECK_THROWS_WITH_AS(ChatTemplate::recognise(other),
                       doctest::Contains("is not one graft renders"), Error);
  CHECK_THROWS_WITH_AS(ChatTemplate::named("vicuna"),
                       doctest::Contains("expected one of chatml, llama2, llama3"), Error);
}

TEST_CASE("chat text is tokenized with its special tokens whole, the text between plainly") {
  TempDir dir;
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}},
            {"added_tokens",
             {{{"id", 256}, {"content", "<|endoftext|>"}, {"special", true}},
              {{"id", 257}, {"content", "<|im_start|>"}, {"special", true}},
              {{"id", 258}, {"content", "<|im_end|>"}, {"special", true}}}},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
            {"post_processor", {{"type", "ByteLevel"}}},
            {"decoder", {{"type", "ByteLevel"}}}};
  write_json(dir / "tokenizer.json", j);
  auto tok = load_tokenizer_json(dir / "tokenizer.json");
  const auto chat = ChatTemplate::named("chatml");
  auto plain = [&](const std::string& s) { return tok->encode(s, false); };
  Ids want = {257};
  for (const auto& part :
       {plain("user\nHi"), Ids{258}, plain("\n"), Ids{257}, plain("assistant\n")})
    want.insert(want.end(), part.begin(), part.end());
  CHECK(chat.encode(*tok, {{"user", "Hi"}}, true) == want);
  CHECK(chat.end_of_turn("<|endoftext|>") == "<|im_end|>");
  // A format whose special tokens the vocabulary lacks is refused by name.
  CHECK_THROWS_WITH_AS(ChatTemplate::named("llama3").encode(*tok, {{"user", "Hi"}}, true),
                       doctest::Contains("needs the token <|start_header_id|>"), Error);

  // Instruction data with the template: the conversation's tokens, scored after the prompt.
  std::ofstream(dir / "i.jsonl") << R"({"prompt": "Name a colour.", "response": "Blue."})"
                                 << "\n";
  TaskSpec task;
  task.kind = "instruction";
  task.format = "jsonl";
  task.train = {dir / "i.jsonl"};
  task.eval_fraction = 0;
  task.chat_template = "chatml";
  task.system = "Be brief.";
  const auto data = load_task_data(task, *tok, 0, &chat);
  REQUIRE(data.train.size() == 1);
  const auto& e = data.train[0];
  const std::vector<ChatMessage> prompt = {{"system", "Be brief."}, {"user", "Name a colour."}};
  auto full = prompt;
  full.push_back({"assistant", "Blue."});
  CHECK(e.ids == chat.encode(*tok, full, false));
  const auto n = chat.encode(*tok, prompt, true).size();
  REQUIRE(e.labels.size() == e.ids.size());
  for (std::size_t i = 0; i < e.ids.size(); ++i) CHECK(e.labels[i] == (i < n ? -100 : e.ids[i]));
  CHECK(tok->decode(Ids(e.ids.begin() + static_cast<std::ptrdiff_t>(n), e.ids.end()), false) ==
        "Blue.<|im_end|>\n");
  // Without the template resolved, the task is refused rather than joined plainly.
  CHECK_THROWS_AS(load_task_data(task, *tok, 0), Error);
}
