// Chat templates: conversations rendered as the text a chat model was trained on, the way
// transformers' apply_chat_template renders a tokenizer's Jinja chat_template.
//
// graft has no Jinja engine. It renders three formats natively (ChatML, Llama 2 chat, Llama 3
// chat) and recognises a model's chat_template only when it is, character for character, one of
// the templates those models ship (listed in chat.cpp); any other template is refused in one line
// rather than rendered approximately. A recipe may also name a format outright.
#pragma once

#include <graft/tokenizer.h>

#include <cstdint>
#include <string>
#include <vector>

namespace graft {

struct ChatMessage {
  std::string role;  ///< system, user or assistant
  std::string content;
};

class ChatTemplate {
 public:
  /// A format by name: "chatml", "llama2" or "llama3". Throws graft::Error for another name.
  static ChatTemplate named(const std::string& name);
  /// The format of a Jinja chat_template (tokenizer_config.json, GGUF tokenizer.chat_template).
  /// Throws graft::Error saying that graft does not render it (and what to do) when it is not
  /// one of the known templates.
  static ChatTemplate recognise(const std::string& jinja);
  /// The format names that named() accepts.
  static std::vector<std::string> names();

  /// "chatml", "llama2" or "llama3".
  const std::string& name() const { return name_; }
  /// The system message a template puts first when the conversation has none (Qwen2's ChatML
  /// template); empty when it puts none.
  const std::string& default_system() const { return default_system_; }

  /// The text of the token that ends a turn (<|im_end|>, <|eot_id|>; Llama 2: the EOS token's,
  /// `eos`): where generation of an answer stops.
  std::string end_of_turn(const std::string& eos) const;

  /// The conversation as text, special tokens written as their text (bos and eos are the
  /// tokenizer's texts for them, used where the format has them). With
  /// `add_generation_prompt`, ends with what opens the assistant's turn. Throws graft::Error
  /// for a conversation the format cannot hold (Llama 2: roles not alternating user/assistant).
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                     const std::string& bos, const std::string& eos) const;

  /// The rendered text as token ids: split at the format's special tokens (each its own id, as
  /// transformers' added tokens are), the text between encoded without special tokens. Throws
  /// graft::Error naming a special token the tokenizer's vocabulary lacks.
  std::vector<std::int64_t> encode(const Tokenizer& tokenizer, const std::string& text) const;

  /// render() and encode() with the tokenizer's own BOS and EOS texts.
  std::vector<std::int64_t> encode(const Tokenizer& tokenizer,
                                   const std::vector<ChatMessage>& messages,
                                   bool add_generation_prompt) const;

 private:
  ChatTemplate(std::string name, std::string default_system)
      : name_(std::move(name)), default_system_(std::move(default_system)) {}
  std::vector<std::string> specials(const Tokenizer& tokenizer) const;
  std::string name_, default_system_;
};

}  // namespace graft
