// Task data: reading records, tokenizing, splitting and batching.
#include <graft/data.h>
#include <graft/error.h>
#include <graft/io/file.h>
#include <graft/io/json.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "util/file.h"

namespace graft {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One record: named fields as text, and where it came from.
struct Record {
  std::map<std::string, std::string> fields;
  std::string where;  // file:line
};

// Splits one CSV line (RFC 4180 quoting; a quoted field may not span lines here) or TSV line.
std::vector<std::string> split_row(const std::string& line, char sep, const std::string& where) {
  std::vector<std::string> out;
  if (sep == '\t') {
    std::string field;
    std::stringstream ss(line);
    while (std::getline(ss, field, '\t')) out.push_back(field);
    if (!line.empty() && line.back() == '\t') out.emplace_back();
    return out;
  }
  std::string field;
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        field += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.push_back(field);
      field.clear();
    } else {
      field += c;
    }
  }
  if (quoted) throw FileError(where, "a quoted CSV field is not closed on its line");
  out.push_back(field);
  return out;
}

std::string json_text(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

std::vector<Record> read_records(const fs::path& file, const TaskSpec& task) {
  std::vector<Record> out;
  const auto name = file.string();
  // Text, all of it: a binary file given as data (a model, an archive) is refused naming the
  // line, not tokenized as bytes.
  const auto text = io::read_text_file(file);
  io::require_text(text, name);
  // An empty file is a mistake (a failed download, the wrong path), never a document of nothing.
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    throw FileError(name,
                    "is empty: expected " +
                        (task.format == "text" ? std::string("text") : task.format + " records"));
  if (task.format == "text") {
    out.push_back({{{task.text_field, text}}, name});
    return out;
  }
  if (task.format == "json") {
    const json j = io::parse_json(text, name);
    if (!j.is_array() || j.empty())
      throw FileError(name, j.is_array() ? "holds no records (an empty array)"
                                         : "expected a JSON array of records");
    for (std::size_t i = 0; i < j.size(); ++i) {
      if (!j[i].is_object())
        throw FileError(name, "record " + std::to_string(i) + " is not a JSON object");
      Record r{{}, name + ": record " + std::to_string(i)};
      for (const auto& [k, v] : j[i].items()) r.fields[k] = json_text(v);
      out.push_back(std::move(r));
    }
    return out;
  }
  std::istringstream in(text);
  std::string line;
  std::int64_t n = 0;
  std::vector<std::string> header = task.columns;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const auto where = name + ":" + std::to_string(n);
    if (task.format == "jsonl") {
      const json j = io::parse_json(line, where);
      if (!j.is_object()) throw FileError(where, "expected a JSON object per line");
      Record r{{}, where};
      for (const auto& [k, v] : j.items()) r.fields[k] = json_text(v);
      out.push_back(std::move(r));
      continue;
    }
    auto cells = split_row(line, task.format == "tsv" ? '\t' : ',', where);
    if (header.empty()) {
      header = cells;
      continue;
    }
    if (cells.size() != header.size())
      throw FileError(where, "has " + std::to_string(cells.size()) + " columns, expected " +
                                 std::to_string(header.size()) +
                                 (task.columns.empty() ? " (from the header line)" : ""));
    Record r{{}, where};
    for (std::size_t i = 0; i < cells.size(); ++i) r.fields[header[i]] = cells[i];
    out.push_back(std::move(r));
  }
  if (out.empty()) throw FileError(name, "holds no records (only a header line)");
  return out;
}

const std::string& field(const Record& r, const std::string& key) {
  auto it = r.fields.find(key);
  if (it == r.fields.end()) {
    std::string have;
    for (const auto& [k, v] : r.fields) have += (have.empty() ? "" : ", ") + k;
    throw FileError(r.where, "has no field \"" + key + "\" (it has " + have +
                                 "); set task.text_field / label_field / prompt_field / "
                                 "response_field");
  }
  return it->second;
}

// The label of a record, or -1 when it has none (JSON null) or the label rule drops it.
std::int64_t label_of(const Record& r, const TaskSpec& task) {
  const auto& text = field(r, task.label_field);
  if (text == "null" && (task.format == "json" || task.format == "jsonl")) return -1;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0')
    throw FileError(r.where, "label \"" + text + "\" is not a number");
  if (task.label_rule == "sign") return v > 0 ? 1 : v < 0 ? 0 : -1;
  if (v != std::floor(v) || v < 0 || v >= static_cast<double>(task.num_labels))
    throw FileError(r.where, "label \"" + text + "\" is not an integer in [0, " +
                                 std::to_string(task.num_labels) + ") (task.num_labels)");
  return static_cast<std::int64_t>(v);
}

// Cuts token streams into training sequences.
void chunk(const std::vector<std::int64_t>& ids, std::int64_t n, std::vector<Example>& out) {
  for (std::size_t at = 0; at + 1 < ids.size(); at += n) {
    const auto end = std::min(ids.size(), at + static_cast<std::size_t>(n));
    Example e;
    e.ids.assign(ids.begin() + at, ids.begin() + end);
    e.labels = e.ids;
    out.push_back(std::move(e));
  }
}

std::vector<Example> lm_examples(const std::vector<Record>& docs, const TaskSpec& task,
                                 const Tokenizer& tok) {
  std::vector<Example> out;
  std::vector<std::int64_t> stream;
  for (const auto& d : docs) {
    auto ids = tok.encode(field(d, task.text_field), true);
    if (tok.eos_id() >= 0) ids.push_back(tok.eos_id());
    if (task.packing)
      stream.insert(stream.end(), ids.begin(), ids.end());
    else
      chunk(ids, task.max_length, out);
  }
  if (task.packing) chunk(stream, task.max_length, out);
  return out;
}

// Without a chat template: prompt (with BOS) then response (without BOS, with EOS), joined as
// token ids with nothing between. With one: the conversation (the task's system message, the
// prompt as the user's turn, the response as the assistant's) rendered and tokenized as
// transformers' apply_chat_template(tokenize=True) does; the prompt is the same conversation
// without the answer, with the generation prompt, and what the two share at the start is not
// scored. The loss is taken on the response only, cut at max_length. A prompt of max_length
// tokens or more leaves no response to learn from: such records are counted and dropped.
std::vector<Example> instruction_examples(const std::vector<Record>& docs, const TaskSpec& task,
                                          const Tokenizer& tok, const ChatTemplate* chat,
                                          std::int64_t* dropped) {
  std::vector<Example> out;
  for (const auto& d : docs) {
    Example e;
    std::size_t prompt_size = 0;
    if (chat) {
      std::vector<ChatMessage> messages;
      if (!task.system.empty()) messages.push_back({"system", task.system});
      messages.push_back({"user", field(d, task.prompt_field)});
      const auto prompt = chat->encode(tok, messages, true);
      messages.push_back({"assistant", field(d, task.response_field)});
      e.ids = chat->encode(tok, messages, false);
      while (prompt_size < std::min(prompt.size(), e.ids.size()) &&
             prompt[prompt_size] == e.ids[prompt_size])
        ++prompt_size;
    } else {
      e.ids = tok.encode(field(d, task.prompt_field), true);
      prompt_size = e.ids.size();
      const auto response = tok.encode(field(d, task.response_field), false);
      e.ids.insert(e.ids.end(), response.begin(), response.end());
      if (tok.eos_id() >= 0) e.ids.push_back(tok.eos_id());
    }
    if (static_cast<std::int64_t>(prompt_size) >= task.max_length || prompt_size == e.ids.size()) {
      ++*dropped;
      continue;
    }
    e.labels = e.ids;  // the loss is taken on the response only
    std::fill(e.labels.begin(), e.labels.begin() + static_cast<std::ptrdiff_t>(prompt_size), -100);
    if (static_cast<std::int64_t>(e.ids.size()) > task.max_length) {
      e.ids.resize(task.max_length);
      e.labels.resize(task.max_length);
    }
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<Example> classification_examples(const std::vector<Record>& docs, const TaskSpec& task,
                                             const Tokenizer& tok, std::int64_t* dropped) {
  std::vector<Example> out;
  for (const auto& d : docs) {
    const auto label = label_of(d, task);
    if (label < 0) {
      ++*dropped;
      continue;
    }
    Example e;
    e.ids = tok.encode(field(d, task.text_field), true);
    if (static_cast<std::int64_t>(e.ids.size()) > task.max_length) e.ids.resize(task.max_length);
    e.label = label;
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace

std::string dropped_reason(const TaskSpec& task) {
  if (task.kind == "instruction")
    return "a prompt of task.max_length (" + std::to_string(task.max_length) +
           ") tokens or more leaves no response";
  return "no label, or the label rule";
}

std::vector<std::size_t> shuffled(std::size_t n, std::uint64_t seed, std::uint64_t epoch) {
  std::vector<std::size_t> idx(n);
  for (std::size_t i = 0; i < n; ++i) idx[i] = i;
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + epoch + 1;
  for (std::size_t i = n; i > 1; --i) std::swap(idx[i - 1], idx[splitmix(s) % i]);
  return idx;
}

TaskData load_task_data(const TaskSpec& task, const Tokenizer& tok, std::uint64_t seed,
                        const ChatTemplate* chat) {
  if (task.chat_template != "none" && !chat)
    throw Error("task.template: " + task.chat_template + " needs the chat template resolved");
  auto read_all = [&](const std::vector<fs::path>& files) {
    std::vector<Record> records;
    for (const auto& f : files) {
      auto r = read_records(f, task);
      records.insert(records.end(), std::make_move_iterator(r.begin()),
                     std::make_move_iterator(r.end()));
    }
    return records;
  };
  TaskData data;
  auto train_records = read_all(task.train);
  if (task.max_documents > 0 &&
      static_cast<std::int64_t>(train_records.size()) > task.max_documents)
    train_records.resize(task.max_documents);
  std::vector<Record> eval_records = read_all(task.eval);
  data.documents = static_cast<std::int64_t>(train_records.size() + eval_records.size());
  // Without eval files, hold out a fraction of the records, chosen from the seed.
  if (task.eval.empty() && task.eval_fraction > 0) {
    auto order = shuffled(train_records.size(), seed, 1u << 30);
    const auto n_eval = static_cast<std::size_t>(
        std::llround(task.eval_fraction * static_cast<double>(train_records.size())));
    std::vector<Record> kept;
    std::vector<bool> is_eval(train_records.size(), false);
    for (std::size_t i = 0; i < n_eval && i < order.size(); ++i) is_eval[order[i]] = true;
    for (std::size_t i = 0; i < train_records.size(); ++i)
      (is_eval[i] ? eval_records : kept).push_back(std::move(train_records[i]));
    train_records = std::move(kept);
  }
  auto examples = [&](const std::vector<Record>& records) {
    if (task.kind == "causal_lm") return lm_examples(records, task, tok);
    if (task.kind == "instruction")
      return instruction_examples(records, task, tok, chat, &data.dropped);
    return classification_examples(records, task, tok, &data.dropped);
  };
  data.train = examples(train_records);
  data.eval = examples(eval_records);
  const auto why = [&] {
    return data.dropped ? " (" + std::to_string(data.dropped) +
                              " records dropped: " + dropped_reason(task) + ")"
                        : std::string();
  };
  if (!eval_records.empty() && data.eval.empty())
    throw FileError(
        task.eval.empty() ? std::string("task.eval_fraction") : task.eval.front().string(),
        "holds no eval examples after tokenizing" + why());
  if (data.train.empty())
    throw FileError(task.train.empty() ? std::string("task.train") : task.train.front().string(),
                    "holds no training examples after tokenizing" + why());
  return data;
}

Batch make_batch(const std::vector<Example>& examples, const std::vector<std::size_t>& which,
                 std::int64_t pad_id, bool classification) {
  std::size_t longest = 0;
  for (auto i : which) longest = std::max(longest, examples[i].ids.size());
  const auto B = static_cast<std::int64_t>(which.size()), T = static_cast<std::int64_t>(longest);
  auto ids = torch::full({B, T}, pad_id < 0 ? 0 : pad_id, torch::kLong);
  auto mask = torch::zeros({B, T}, torch::kLong);
  auto labels =
      classification ? torch::empty({B}, torch::kLong) : torch::full({B, T}, -100, torch::kLong);
  auto ids_a = ids.accessor<std::int64_t, 2>();
  auto mask_a = mask.accessor<std::int64_t, 2>();
  Batch b;
  for (std::int64_t r = 0; r < B; ++r) {
    const auto& e = examples[which[r]];
    for (std::size_t t = 0; t < e.ids.size(); ++t) {
      ids_a[r][t] = e.ids[t];
      mask_a[r][t] = 1;
    }
    b.tokens += static_cast<std::int64_t>(e.ids.size());
    if (classification) {
      labels[r] = e.label;
    } else {
      auto lab = labels.accessor<std::int64_t, 2>();
      for (std::size_t t = 0; t < e.labels.size(); ++t) lab[r][t] = e.labels[t];
    }
  }
  b.input_ids = ids;
  b.attention_mask = mask;
  b.labels = labels;
  return b;
}

}  // namespace graft
