#include <graft/chat.h>
#include <graft/error.h>

#include <algorithm>
#include <string_view>

namespace graft {
namespace {

// The chat templates graft recognises, as their tokenizer_config.json holds them (after JSON
// decoding), with the format each renders. Rendering them with Jinja (transformers' settings:
// trim_blocks, lstrip_blocks) gives exactly what render() gives; tests/unit/test_chat.cpp holds
// renderings made so.
struct Known {
  const char* what;
  const char* name;
  const char* default_system;
  std::string_view jinja;
};

// clang-format off
constexpr Known kKnown[] = {
    {"ChatML", "chatml", "",
     R"({% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %})"},
    {"Qwen2 and Qwen1.5 chat (ChatML with a default system message)", "chatml",
     "You are a helpful assistant.",
     R"({% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %})"},
    {"Llama 2 chat", "llama2", "",
     R"({% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %})"},
    {"Llama 3 instruct", "llama3", "",
     R"({% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %})"},
};
// clang-format on

// Python's str.strip() and Jinja's trim over ASCII whitespace.
std::string strip(const std::string& s) {
  constexpr const char* ws = " \t\n\r\f\v";
  const auto a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(ws) - a + 1);
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

}  // namespace

std::vector<std::string> ChatTemplate::names() { return {"chatml", "llama2", "llama3"}; }

ChatTemplate ChatTemplate::named(const std::string& name) {
  const auto all = names();
  if (std::find(all.begin(), all.end(), name) == all.end())
    throw Error("unknown chat format \"" + name + "\" (expected one of " + join(all) + ")");
  return ChatTemplate(name, "");
}

ChatTemplate ChatTemplate::recognise(const std::string& jinja) {
  const auto text = strip(jinja);
  for (const auto& k : kKnown)
    if (text == k.jinja) return ChatTemplate(k.name, k.default_system);
  std::string known;
  for (const auto& k : kKnown) known += std::string(known.empty() ? "" : ", ") + k.what;
  throw Error("its chat_template is not one graft renders (graft has no Jinja engine; it knows " +
              known + "): name the format instead (" + join(names()) + ")");
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt, const std::string& bos,
                                 const std::string& eos) const {
  std::string out;
  if (name_ == "chatml") {
    if (!default_system_.empty() && !messages.empty() && messages[0].role != "system")
      out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
    for (const auto& m : messages)
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
  } else if (name_ == "llama2") {
    // The system message goes inside the first user turn; turns alternate user, assistant.
    // There is no generation prompt: a user turn ends with [/INST].
    std::size_t first = 0;
    std::string system;
    if (!messages.empty() && messages[0].role == "system") system = messages[0].content, first = 1;
    for (std::size_t i = first; i < messages.size(); ++i) {
      const auto& m = messages[i];
      const bool user_turn = (i - first) % 2 == 0;
      if ((m.role == "user") != user_turn)
        throw Error("the llama2 chat format needs roles alternating user/assistant/...; message " +
                    std::to_string(i + 1) + " is \"" + m.role + "\"");
      auto content = m.content;
      if (i == first && first == 1) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
      if (m.role == "user")
        out += bos + "[INST] " + strip(content) + " [/INST]";
      else if (m.role == "assistant")
        out += " " + strip(content) + " " + eos;
    }
  } else {  // llama3
    for (std::size_t i = 0; i < messages.size(); ++i)
      out += (i == 0 ? bos : "") + "<|start_header_id|>" + messages[i].role +
             "<|end_header_id|>\n\n" + strip(messages[i].content) + "<|eot_id|>";
    if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  }
  return out;
}

std::string ChatTemplate::end_of_turn(const std::string& eos) const {
  if (name_ == "chatml") return "<|im_end|>";
  if (name_ == "llama3") return "<|eot_id|>";
  return eos;
}

std::vector<std::string> ChatTemplate::specials(const Tokenizer& tokenizer) const {
  std::vector<std::string> s;
  if (name_ == "chatml") s = {"<|im_start|>", "<|im_end|>"};
  if (name_ == "llama3") s = {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"};
  if (name_ != "chatml") {
    for (const auto id : {tokenizer.bos_id(), tokenizer.eos_id()})
      if (id >= 0) s.push_back(tokenizer.token(id));
  }
  // Longest first, so that a special token that begins another is not matched in its place.
  std::sort(s.begin(), s.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  return s;
}

std::vector<std::int64_t> ChatTemplate::encode(const Tokenizer& tokenizer,
                                               const std::string& text) const {
  const auto special = specials(tokenizer);
  std::vector<std::int64_t> out;
  std::size_t from = 0;
  auto flush = [&](std::size_t to) {
    if (to == from) return;
    const auto ids = tokenizer.encode(text.substr(from, to - from), false);
    out.insert(out.end(), ids.begin(), ids.end());
  };
  for (std::size_t at = 0; at < text.size();) {
    const auto hit = std::find_if(special.begin(), special.end(), [&](const std::string& s) {
      return text.compare(at, s.size(), s) == 0;
    });
    if (hit == special.end()) {
      ++at;
      continue;
    }
    flush(at);
    const auto id = tokenizer.id(*hit);
    if (id < 0)
      throw Error("the " + name_ + " chat format needs the token " + *hit +
                  ", which the tokenizer's vocabulary lacks");
    out.push_back(id);
    at += hit->size();
    from = at;
  }
  flush(text.size());
  return out;
}

std::vector<std::int64_t> ChatTemplate::encode(const Tokenizer& tokenizer,
                                               const std::vector<ChatMessage>& messages,
                                               bool add_generation_prompt) const {
  const auto text_of = [&](std::int64_t id) { return id >= 0 ? tokenizer.token(id) : ""; };
  return encode(tokenizer, render(messages, add_generation_prompt, text_of(tokenizer.bos_id()),
                                  text_of(tokenizer.eos_id())));
}

}  // namespace graft
