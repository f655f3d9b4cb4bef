#include "models/common.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/record_function.h>
#include <graft/error.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "models/fused.h"

namespace graft {

const std::vector<std::string>& site_points() {
  static const std::vector<std::string> points = {
      "embed",         "attn.in",     "attn.q",      "attn.k",      "attn.v",        "attn.kv",
      "attn.o",        "attn.out",    "ffn.in",      "ffn.gate",    "ffn.up",        "ffn.act",
      "ffn.down",      "ffn.out",     "norm.embed",  "norm.attn",   "norm.ffn",      "norm.final",
      "bias.attn.q",   "bias.attn.k", "bias.attn.v", "bias.attn.o", "bias.ffn.gate", "bias.ffn.up",
      "bias.ffn.down", "head"};
  return points;
}

LinearImpl::LinearImpl(std::int64_t in, std::int64_t out, bool with_bias)
    : in_features(in), out_features(out) {
  weight = register_parameter("weight", torch::empty({out, in}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({out}));
}

at::Tensor LinearImpl::plain(const at::Tensor& x) const {
  return bias.defined() ? torch::linear(x, weight, bias) : torch::linear(x, weight);
}

at::Tensor LinearImpl::effective_weight() const {
  at::Tensor w = weight;
  if (hooks_)
    for (const auto& t : hooks_->weight_transforms) w = t->transform(w, *this);
  return w;
}

namespace {

// Whether the site's weight is frozen and every transform of it may run again in the backward.
bool recomputes_weight(const SiteHooks& hooks, const at::Tensor& weight) {
  if (hooks.weight_transforms.empty() || weight.requires_grad()) return false;
  for (const auto& t : hooks.weight_transforms)
    if (!t->recomputable()) return false;
  return true;
}

}  // namespace

at::Tensor models::routed_rows(const SiteHooks& site, const Hook* hook, const at::Tensor& x) {
  if (!site.routing) return {};
  auto rows = site.routing->rows_of(hook);
  if (rows.defined() && x.size(0) != site.routing->batch)
    throw Error("per-row routing names " + std::to_string(site.routing->batch) +
                " rows, but the batch has " + std::to_string(x.size(0)));
  return rows.defined() ? rows.to(x.device()) : rows;
}

namespace {

// x times a scale vector, on the rows `rows` only when defined.
at::Tensor scale_rows(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& rows) {
  if (!rows.defined()) return x * scale.to(x.dtype());
  if (rows.numel() == 0) return x;
  return x.index_copy(0, rows, x.index_select(0, rows) * scale.to(x.dtype()));
}

}  // namespace

at::Tensor LinearImpl::hooked(const at::Tensor& x) {
  at::Tensor in = x;
  for (const auto& s : hooks_->scales)
    if (s->side() == LinearScale::Side::input)
      in = scale_rows(in, s->scale(), models::routed_rows(*hooks_, s.get(), in));
  std::shared_ptr<torch::nn::Module> self;  // set when the backward may transform again
  if (recomputes_weight(*hooks_, weight) && torch::GradMode::is_enabled() && in.requires_grad())
    self = weak_from_this().lock();
  at::Tensor y;
  if (self) {
    y = models::linear_recomputing_weight(in, std::static_pointer_cast<LinearImpl>(self));
    if (bias.defined()) y = y + bias;
  } else {
    const auto w = effective_weight();
    y = bias.defined() ? torch::linear(in, w, bias) : torch::linear(in, w);
  }
  // A method's parameters may be float32 over a bfloat16 model: the output keeps the model's dtype.
  // Under per-row routing each delta runs once on its rows, gathered: one product per adapter.
  for (const auto& d : hooks_->deltas) {
    const auto rows = models::routed_rows(*hooks_, d.get(), in);
    if (!rows.defined())
      y = y + d->delta(in, *this).to(y.dtype());
    else if (rows.numel() > 0) {
      auto shape = y.sizes().vec();  // a delta may broadcast (a bias): its rows' full shape
      shape[0] = rows.numel();
      y = y.index_add(0, rows,
                      d->delta(in.index_select(0, rows), *this).to(y.dtype()).expand(shape));
    }
  }
  for (const auto& s : hooks_->scales)
    if (s->side() == LinearScale::Side::output)
      y = scale_rows(y, s->scale(), models::routed_rows(*hooks_, s.get(), y));
  return y;
}

void LinearImpl::tie_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == out_features && w.size(1) == in_features,
              "tie_weight: expected a [", out_features, ", ", in_features, "] matrix, got ",
              w.sizes());
  // The shared matrix stays a parameter of the module that owns it, not of this one.
  if (parameters_.contains("weight")) parameters_.erase("weight");
  weight = shared_ = w;
}

void LinearImpl::untie() {
  if (!tied()) return;
  weight = register_parameter("weight", shared_.detach().clone(), false);
}

void LinearImpl::retie() {
  if (!shared_.defined() || tied()) return;
  parameters_.erase("weight");
  weight = shared_;
}

void LinearImpl::add_bias() {
  if (!bias.defined())
    bias = register_parameter("bias", torch::zeros({out_features}, weight.options()), false);
}

// --- Model: sites and hooks ----------------------------------------------------------------

const std::vector<std::string>& Model::linear_points() {
  static const std::vector<std::string> linear = {"attn.q",   "attn.k", "attn.v",   "attn.o",
                                                  "ffn.gate", "ffn.up", "ffn.down", "head"};
  return linear;
}

bool Model::is_linear_point(const std::string& point) {
  const auto& linear = linear_points();
  return std::find(linear.begin(), linear.end(), point) != linear.end();
}

const Site* Model::find_site(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &sites_[it->second];
}

SiteHooks* Model::add_site(Site site) {
  index_[site.name] = sites_.size();
  sites_.push_back(std::move(site));
  hooks_.push_back(std::make_unique<SiteHooks>());
  return hooks_.back().get();
}

// The most key/value positions any attn.kv site prepends, counting only the prefixes that shift
// the tokens' positions when `shifting_only`.
std::int64_t Model::longest_prefix(bool shifting_only) const {
  std::int64_t longest = 0;
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    const auto& h = *hooks_[i];
    if (!h.active) continue;
    std::int64_t n = 0;
    for (const auto& e : h.kv)
      if (!shifting_only || e->shifts_positions()) n += e->length();
    longest = std::max(longest, n);
  }
  return longest;
}

std::int64_t Model::prefix_keys() const { return longest_prefix(false); }

std::int64_t Model::prefix_length() const { return longest_prefix(true); }

SiteHooks* Model::site_hooks(const std::string& name) {
  auto it = index_.find(name);
  TORCH_CHECK(it != index_.end(), "internal: no site named ", name);
  return hooks_[it->second].get();
}

void Model::connect_sites() {
  for (std::size_t i = 0; i < sites_.size(); ++i)
    if (is_linear_point(sites_[i].point))
      if (auto* l = linear(sites_[i].name)) l->connect(hooks_[i].get());
}

LinearImpl* Model::linear(const std::string& site) {
  auto* s = find_site(site);
  if (!s || !is_linear_point(s->point)) return nullptr;
  auto modules = named_modules("", false);
  if (!modules.contains(site)) return nullptr;
  return dynamic_cast<LinearImpl*>(modules[site].get());
}

void Model::untie(const std::string& site) {
  auto* lin = linear(site);
  if (!lin || !lin->tied()) return;
  lin->untie();
  if (find_site(site)->point == "head") config_.tie_embeddings = false;
}

void Model::retie(const std::string& site) {
  auto* lin = linear(site);
  if (!lin || lin->tied()) return;
  lin->retie();
  if (lin->tied() && find_site(site)->point == "head") config_.tie_embeddings = true;
}

const SiteHooks& Model::hooks(const std::string& site) const {
  auto it = index_.find(site);
  if (it == index_.end())
    throw Error("no site named '" + site + "' in this " + config_.family + " model");
  return *hooks_[it->second];
}

void Model::attach(const std::string& name, std::shared_ptr<Hook> hook, const std::string& method,
                   Claim claim) {
  auto it = index_.find(name);
  if (it == index_.end())
    throw Error(method + ": no site named '" + name + "' in this " + config_.family + " model");
  const auto& site = sites_[it->second];
  auto& h = *hooks_[it->second];
  if (!h.exclusive_owner.empty() && h.exclusive_owner != method)
    throw Error(method + ": site '" + name + "' is claimed exclusively by " + h.exclusive_owner);
  if (claim == Claim::exclusive) {
    for (const auto& owner : h.owners)
      if (owner != method)
        throw Error(method + ": needs site '" + name + "' alone, but " + owner +
                    " is attached there");
  }
  const bool linear_site = is_linear_point(site.point);
  const bool sublayer_site = site.point == "attn.in" || site.point == "attn.out" ||
                             site.point == "ffn.in" || site.point == "ffn.act" ||
                             site.point == "ffn.out";
  auto refuse = [&](const char* kind) {
    throw Error(method + ": a " + std::string(kind) + " cannot attach at site '" + name +
                "' (point " + site.point + ")");
  };
  if (auto w = std::dynamic_pointer_cast<WeightTransform>(hook)) {
    if (!linear_site) refuse("weight transform");
    h.weight_transforms.push_back(w);
  } else if (auto d = std::dynamic_pointer_cast<LinearDelta>(hook)) {
    if (!linear_site) refuse("linear delta");
    h.deltas.push_back(d);
  } else if (auto sc = std::dynamic_pointer_cast<LinearScale>(hook)) {
    if (!linear_site) refuse("linear scale");
    h.scales.push_back(sc);
  } else if (auto t = std::dynamic_pointer_cast<SublayerTransform>(hook)) {
    if (!sublayer_site) refuse("sublayer transform");
    h.transforms.push_back(t);
  } else if (auto r = std::dynamic_pointer_cast<ResidualTransform>(hook)) {
    if (site.point != "attn.out" && site.point != "ffn.out") refuse("residual transform");
    h.residual.push_back(r);
  } else if (auto kv = std::dynamic_pointer_cast<KvExtension>(hook)) {
    if (site.point != "attn.kv") refuse("key/value extension");
    h.kv.push_back(kv);
  } else if (auto e = std::dynamic_pointer_cast<EmbeddingExtension>(hook)) {
    if (site.point != "embed") refuse("embedding extension");
    // Only an encoder with an embedding module of its own (positions, norm) has an "after".
    if (e->after_embedding() && config_.family != "bert")
      throw Error(method +
                  ": prompts placed after the embedding module need a BERT-family "
                  "model (as in AdapterHub); this is a " +
                  config_.family + " model");
    h.embeddings.push_back(e);
  } else {
    throw Error(method + ": hook of unknown kind at site '" + name + "'");
  }
  if (std::find(h.owners.begin(), h.owners.end(), method) == h.owners.end())
    h.owners.push_back(method);
  if (claim == Claim::exclusive) h.exclusive_owner = method;
  h.active = true;
}

void Model::detach(const std::string& name, const std::shared_ptr<Hook>& hook) {
  auto it = index_.find(name);
  if (it == index_.end()) return;
  auto& h = *hooks_[it->second];
  auto drop = [&](auto& list) {
    list.erase(std::remove_if(list.begin(), list.end(),
                              [&](const auto& p) { return p.get() == hook.get(); }),
               list.end());
  };
  drop(h.weight_transforms);
  drop(h.deltas);
  drop(h.scales);
  drop(h.transforms);
  drop(h.residual);
  drop(h.kv);
  drop(h.embeddings);
  h.active = !(h.weight_transforms.empty() && h.deltas.empty() && h.scales.empty() &&
               h.transforms.empty() && h.residual.empty() && h.kv.empty() && h.embeddings.empty());
  if (!h.active) {  // nothing left: no method holds the site any more
    h.owners.clear();
    h.exclusive_owner.clear();
  }
}

void Model::set_routing(std::shared_ptr<const RowRouting> routing) {
  for (auto& h : hooks_) h->routing = routing;
}

nlohmann::json ModelConfig::to_json() const {
  nlohmann::json j = {
      {"family", family},
      {"architecture", architecture},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"num_layers", num_layers},
      {"num_heads", num_heads},
      {"num_kv_heads", num_kv_heads},
      {"head_dim", head_dim},
      {"intermediate_size", intermediate_size},
      {"max_positions", max_positions},
      {"norm_eps", norm_eps},
      {"hidden_act", hidden_act},
      {"tie_embeddings", tie_embeddings},
      {"attention_bias", attention_bias},
  };
  if (family == "llama") {
    j["rope_theta"] = rope_theta;
    if (sliding_window > 0) j["sliding_window"] = sliding_window;
    j["rope_style"] = rope_style == RopeStyle::interleaved ? "interleaved" : "half_split";
  }
  if (family == "bert") {
    j["type_vocab_size"] = type_vocab_size;
    j["roberta_positions"] = roberta_positions;
  }
  if (num_labels) {
    j["num_labels"] = num_labels;
    j["classifier"] = classifier;
  }
  if (pad_token_id >= 0) j["pad_token_id"] = pad_token_id;
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) j["eos_token_id"] = eos_token_id;
  return j;
}

}  // namespace graft

namespace graft::models {

LayerTaps layer_taps(const std::function<SiteHooks*(const std::string&)>& hooks,
                     std::int64_t layer) {
  const std::string p = "layers." + std::to_string(layer) + ".";
  return {hooks(p + "attn.in"), hooks(p + "attn.kv"), hooks(p + "attn.out"),
          hooks(p + "ffn.in"),  hooks(p + "ffn.act"), hooks(p + "ffn.out")};
}

AttentionImpl::AttentionImpl(const ModelConfig& c, bool qkv_bias, bool o_bias) {
  const auto d = c.hidden_size, hd = c.head_dim;
  q = register_module("q", Linear(d, c.num_heads * hd, qkv_bias));
  k = register_module("k", Linear(d, c.num_kv_heads * hd, qkv_bias));
  v = register_module("v", Linear(d, c.num_kv_heads * hd, qkv_bias));
  o = register_module("o", Linear(c.num_heads * hd, d, o_bias));
}

FfnImpl::FfnImpl(const ModelConfig& c, bool gated, bool bias) {
  if (gated) gate = register_module("gate", Linear(c.hidden_size, c.intermediate_size, bias));
  up = register_module("up", Linear(c.hidden_size, c.intermediate_size, bias));
  down = register_module("down", Linear(c.intermediate_size, c.hidden_size, bias));
}

NormImpl::NormImpl(std::int64_t width, double eps_, bool layer_norm_)
    : eps(eps_), layer_norm(layer_norm_) {
  weight = register_parameter("weight", torch::ones({width}));
  if (layer_norm) bias = register_parameter("bias", torch::zeros({width}));
}

at::Tensor NormImpl::forward(const at::Tensor& x) {
  RECORD_USER_SCOPE("graft::norm");
  if (layer_norm) return torch::layer_norm(x, {x.size(-1)}, weight, bias, eps);
  // RMSNorm in float32, as transformers and llama.cpp compute it, whatever the model's dtype.
  auto xf = x.to(torch::kFloat);
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return weight * y.to(x.scalar_type());
}

at::Tensor token_mask(const at::Tensor& input_ids, const at::Tensor& mask) {
  auto m = mask.defined() ? mask.to(torch::kLong)
                          : torch::ones_like(input_ids, input_ids.options().dtype(torch::kLong));
  TORCH_CHECK(m.sizes() == input_ids.sizes(), "attention_mask shape ", m.sizes(),
              " does not match input_ids shape ", input_ids.sizes());
  return m;
}

at::Tensor full_key_mask(const at::Tensor& mask, const KVCache* cache) {
  auto m = mask;
  if (cache && cache->length() > 0) {
    TORCH_CHECK(cache->mask.size(0) == m.size(0), "the cache holds a batch of ",
                cache->mask.size(0), " rows but the input has ", m.size(0));
    m = torch::cat({cache->mask, m}, 1);
  }
  return m;
}

at::Tensor positions_from_mask(const at::Tensor& key_mask, std::int64_t new_tokens) {
  auto pos = (key_mask.cumsum(1) - 1).clamp_min(0);
  return pos.narrow(1, key_mask.size(1) - new_tokens, new_tokens);
}

std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, std::int64_t dim,
                                              double theta) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat).device(positions.device());
  auto exponents = torch::arange(0, dim, 2, opts) / static_cast<double>(dim);
  auto inv_freq = torch::pow(torch::tensor(theta, opts), -exponents);  // [dim/2]
  auto angles = positions.to(torch::kFloat).unsqueeze(-1) * inv_freq;  // [B, T, dim/2]
  angles = angles.unsqueeze(1);                                        // [B, 1, T, dim/2]
  return {angles.cos(), angles.sin()};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      RopeStyle style) {
  RECORD_USER_SCOPE("graft::rope");
  return rotate(x, cos, sin, style);
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& key_mask, bool causal, std::int64_t window) {
  RECORD_USER_SCOPE("graft::attention");
  const auto batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const auto kv_heads = k.size(1), keys = k.size(2);
  TORCH_CHECK(heads % kv_heads == 0, "attention: ", heads, " query heads are not a multiple of ",
              kv_heads, " key/value heads");
  auto kk = k, vv = v;
  if (kv_heads != heads) {
    kk = k.repeat_interleave(heads / kv_heads, 1);
    vv = v.repeat_interleave(heads / kv_heads, 1);
  }
  auto allowed = key_mask.to(torch::kBool).view({batch, 1, 1, keys});
  if (causal) {
    auto opts = torch::TensorOptions().dtype(torch::kLong).device(q.device());
    auto qpos = torch::arange(keys - seq, keys, opts).view({seq, 1});
    auto kpos = torch::arange(0, keys, opts).view({1, keys});
    auto visible = kpos <= qpos;
    if (window > 0) visible = visible & (kpos > qpos - window);
    allowed = allowed & visible.view({1, 1, seq, keys});
  }
  auto out = attention_core(q, kk, vv, allowed);  // [B, H, T, dim]
  return out.transpose(1, 2).reshape({batch, seq, heads * dim});
}

at::Tensor split_heads(const at::Tensor& x, std::int64_t heads, std::int64_t dim) {
  return x.view({x.size(0), x.size(1), heads, dim}).transpose(1, 2);
}

std::pair<at::Tensor, at::Tensor> extend_cache(KVCache* cache, std::int64_t layer, at::Tensor k,
                                               at::Tensor v) {
  if (!cache) return {std::move(k), std::move(v)};
  if (static_cast<std::int64_t>(cache->keys.size()) <= layer) {
    cache->keys.resize(layer + 1);
    cache->values.resize(layer + 1);
    cache->prefix.resize(layer + 1, 0);
  }
  auto& ck = cache->keys[layer];
  auto& cv = cache->values[layer];
  ck = ck.defined() ? torch::cat({ck, k}, 2) : k;
  cv = cv.defined() ? torch::cat({cv, v}, 2) : v;
  return {ck, cv};
}

LayerKeys layer_keys(SiteHooks* kv, const at::Tensor& input, at::Tensor k, at::Tensor v,
                     const at::Tensor& key_mask, KVCache* cache, std::int64_t layer) {
  const bool first_pass = !cache || static_cast<std::int64_t>(cache->keys.size()) <= layer ||
                          !cache->keys[layer].defined();
  // Prefixes with one head per query head (AdapterHub's) need the keys repeated to as many heads
  // first, as transformers' repeat_kv does before AdapterHub concatenates; a cache then holds
  // the repeated keys, and later tokens are repeated to match it.
  auto widen = [](at::Tensor t, std::int64_t heads) {
    return t.size(1) == heads ? t : t.repeat_interleave(heads / t.size(1), 1);
  };
  std::int64_t prefix = 0;
  if (kv && kv->active && first_pass) {
    std::vector<std::pair<at::Tensor, at::Tensor>> prefixes;
    std::int64_t heads = k.size(1);
    for (const auto& e : kv->kv) {
      auto [pk, pv] = e->prefix(input);
      TORCH_CHECK(pk.dim() == 4 && pk.size(3) == k.size(3) && pk.size(1) % k.size(1) == 0,
                  "key/value prefix of shape ", pk.sizes(), " does not fit keys of shape ",
                  k.sizes());
      heads = std::max(heads, pk.size(1));
      prefixes.emplace_back(pk.to(k.dtype()), pv.to(v.dtype()));
      prefix += pk.size(2);
    }
    std::vector<at::Tensor> ks, vs;
    for (auto& [pk, pv] : prefixes) {
      ks.push_back(widen(pk, heads));
      vs.push_back(widen(pv, heads));
    }
    ks.push_back(widen(k, heads));
    vs.push_back(widen(v, heads));
    k = torch::cat(ks, 2);
    v = torch::cat(vs, 2);
  } else if (!first_pass && cache->keys[layer].size(1) != k.size(1)) {
    k = widen(k, cache->keys[layer].size(1));
    v = widen(v, cache->keys[layer].size(1));
  }
  auto [keys, values] = extend_cache(cache, layer, std::move(k), std::move(v));
  if (cache) {
    if (first_pass) cache->prefix[layer] = prefix;
    prefix = cache->prefix[layer];
  }
  auto mask = key_mask;
  if (prefix > 0)
    mask = torch::cat({torch::ones({key_mask.size(0), prefix}, key_mask.options()), key_mask}, 1);
  return {keys, values, mask};
}

at::Tensor given_positions(const at::Tensor& position_ids, const at::Tensor& input_ids,
                           std::int64_t prefix, std::int64_t prompt, std::int64_t added) {
  TORCH_CHECK(position_ids.sizes() == input_ids.sizes(), "position_ids shape ",
              position_ids.sizes(), " does not match input_ids shape ", input_ids.sizes());
  auto pos = position_ids.to(torch::kLong) + (prefix + prompt + added);
  if (added == 0) return pos;
  auto front = torch::arange(prefix + prompt, prefix + prompt + added, pos.options())
                   .expand({pos.size(0), added});
  return torch::cat({front, pos}, 1);
}

DecoderInputs decoder_inputs(at::Tensor embeddings, const ForwardInput& in, SiteHooks* embed_site,
                             KVCache* cache, std::int64_t prefix) {
  DecoderInputs d;
  d.x = std::move(embeddings);
  auto mask = token_mask(in.input_ids, in.attention_mask);
  d.prompt = add_prompts(embed_site, d.x, mask, cache);
  d.key_mask = full_key_mask(mask, cache);
  const std::int64_t earlier_prompt = cache && cache->length() > 0 ? cache->prompt : 0;
  d.positions = in.position_ids.defined() ? given_positions(in.position_ids, in.input_ids, prefix,
                                                            earlier_prompt, d.prompt)
                                          : positions_from_mask(d.key_mask, d.x.size(1)) + prefix;
  if (cache && cache->length() == 0) cache->prompt = d.prompt;
  return d;
}

at::Tensor last_token_index(const at::Tensor& input_ids, const at::Tensor& mask,
                            std::int64_t pad_id) {
  const auto seq = input_ids.size(1);
  if (pad_id >= 0) {
    auto first_pad = input_ids.eq(pad_id).to(torch::kInt).argmax(-1);
    return (first_pad - 1).remainder(seq).to(torch::kLong);
  }
  auto m = token_mask(input_ids, mask);
  auto cols = torch::arange(seq, m.options()).expand_as(m);
  return (cols * m).amax(-1);
}

ForwardOutput decoder_outputs(const at::Tensor& x, const ForwardInput& in, std::int64_t prompt,
                              const ModelConfig& config, LinearImpl& head) {
  RECORD_USER_SCOPE("graft::head");
  ForwardOutput out;
  out.hidden = in.prompt_outputs ? x : x.slice(1, prompt);
  if (config.classifier == "score") {
    auto last = last_token_index(in.input_ids, in.attention_mask, config.pad_token_id) + prompt;
    out.pooled = x.index({torch::arange(x.size(0), last.options()), last});
    out.logits = head.forward(out.pooled);
  } else if (!in.hidden_only) {
    out.logits = head.forward(out.hidden);
  }
  return out;
}

std::int64_t add_prompts(SiteHooks* embed, at::Tensor& x, at::Tensor& mask, const KVCache* cache,
                         bool after_embedding) {
  if (!embed || !embed->active || embed->embeddings.empty() || (cache && cache->length() > 0))
    return 0;
  std::vector<at::Tensor> parts;
  for (const auto& e : embed->embeddings) {
    if (e->after_embedding() != after_embedding) continue;
    auto p = e->prompt(x.size(0));
    TORCH_CHECK(p.dim() == 3 && p.size(0) == x.size(0) && p.size(2) == x.size(2),
                "prompt of shape ", p.sizes(), " does not fit embeddings of shape ", x.sizes());
    parts.push_back(p.to(x.dtype()));
  }
  if (parts.empty()) return 0;
  std::int64_t n = 0;
  for (const auto& p : parts) n += p.size(1);
  parts.push_back(x);
  x = torch::cat(parts, 1);
  mask = torch::cat({torch::ones({mask.size(0), n}, mask.options()), mask}, 1);
  return n;
}

bool is_activation(const std::string& name) {
  for (const char* known :
       {"silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu"})
    if (name == known) return true;
  return false;
}

at::Tensor activate(const at::Tensor& x, const std::string& name) {
  if (name == "silu" || name == "swish") return torch::silu(x);
  if (name == "gelu") return torch::gelu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast")
    return torch::gelu(x, "tanh");
  if (name == "relu") return torch::relu(x);
  throw Error("unsupported activation \"" + name + "\" (graft has silu, gelu, gelu_new, relu)");
}

std::vector<Site> layer_sites(const ModelConfig& c, std::int64_t layer, bool gated, bool biases) {
  const std::string p = "layers." + std::to_string(layer) + ".";
  const auto d = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const auto f = c.intermediate_size;
  std::vector<Site> s = {
      {p + "attn_norm", "norm.attn", layer, d, d}, {p + "attn.in", "attn.in", layer, d, d},
      {p + "attn.q", "attn.q", layer, d, q},       {p + "attn.k", "attn.k", layer, d, kv},
      {p + "attn.v", "attn.v", layer, d, kv},      {p + "attn.kv", "attn.kv", layer, kv, kv},
      {p + "attn.o", "attn.o", layer, q, d},       {p + "attn.out", "attn.out", layer, d, d},
      {p + "ffn_norm", "norm.ffn", layer, d, d},   {p + "ffn.in", "ffn.in", layer, d, d},
  };
  if (gated) s.push_back({p + "ffn.gate", "ffn.gate", layer, d, f});
  s.push_back({p + "ffn.up", "ffn.up", layer, d, f});
  s.push_back({p + "ffn.act", "ffn.act", layer, f, f});
  s.push_back({p + "ffn.down", "ffn.down", layer, f, d});
  s.push_back({p + "ffn.out", "ffn.out", layer, d, d});
  if (biases) {
    std::vector<Site> b;
    for (const auto& site : s)
      if (site.point == "attn.q" || site.point == "attn.k" || site.point == "attn.v" ||
          site.point == "attn.o" || site.point == "ffn.up" || site.point == "ffn.down" ||
          site.point == "ffn.gate")
        b.push_back({site.name + ".bias", "bias." + site.point, layer, site.out_features,
                     site.out_features});
    s.insert(s.end(), b.begin(), b.end());
  }
  return s;
}

namespace {

// Matches `name` against `pattern` where "{L}" stands for a decimal layer index; on success
// stores the index in *layer.
bool match_rule(const std::string& pattern, const std::string& name, std::string* layer) {
  auto at = pattern.find("{L}");
  if (at == std::string::npos) return pattern == name;
  const auto prefix = pattern.substr(0, at), suffix = pattern.substr(at + 3);
  if (name.size() <= prefix.size() + suffix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
    return false;
  auto digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) return false;
  *layer = digits;
  return true;
}

std::string fill_rule(const std::string& pattern, const std::string& layer) {
  auto at = pattern.find("{L}");
  return at == std::string::npos ? pattern : pattern.substr(0, at) + layer + pattern.substr(at + 3);
}

io::TensorMap rename(const io::TensorMap& in, const std::vector<NameRule>& rules, bool to_graft,
                     std::vector<std::string>* unplaced = nullptr) {
  io::TensorMap out;
  for (const auto& [name, t] : in) {
    bool placed = false;
    for (const auto& [graft, ckpt] : rules) {
      std::string layer;
      if (match_rule(to_graft ? ckpt : graft, name, &layer)) {
        out.emplace(fill_rule(to_graft ? graft : ckpt, layer), t);
        placed = true;
        break;
      }
    }
    if (!placed && unplaced) unplaced->push_back(name);
  }
  return out;
}

}  // namespace

io::TensorMap rename_to_graft(const io::TensorMap& checkpoint, const std::vector<NameRule>& rules,
                              const std::vector<std::string>& ignored) {
  std::vector<std::string> unplaced;
  auto out = rename(checkpoint, rules, true, &unplaced);
  for (const auto& name : unplaced) {
    bool benign = false;
    for (const auto& pattern : ignored) {
      std::string layer;
      if (!pattern.empty() && pattern.back() == '*')
        benign |= name.compare(0, pattern.size() - 1, pattern, 0, pattern.size() - 1) == 0;
      else
        benign |= match_rule(pattern, name, &layer);
    }
    if (!benign)
      throw Error("holds tensor '" + name +
                  "', which graft does not implement for this model; refusing to load it "
                  "without it rather than compute something else");
  }
  return out;
}

io::TensorMap rename_from_graft(const io::TensorMap& tensors, const std::vector<NameRule>& rules) {
  std::vector<std::string> unplaced;
  auto out = rename(tensors, rules, false, &unplaced);
  // Every tensor must have a place: dropping one would write a model that differs silently.
  if (!unplaced.empty())
    throw Error("tensor '" + unplaced.front() +
                "' has no place in this format's layout for the family (a bias a method "
                "added when merging?); keep that adapter separate instead of merging it");
  return out;
}

void load_parameters(torch::nn::Module& model, const io::TensorMap& tensors,
                     const std::string& source) {
  torch::NoGradGuard no_grad;
  const auto params = model.named_parameters(true);
  for (const auto& [name, t] : tensors) {
    if (params.contains(name)) continue;
    // A checkpoint may store a tied head as a copy of the embedding it shares.
    if (name == "head.weight" && params.contains("embed.weight") && tensors.count("embed.weight") &&
        t.sizes() == params["embed.weight"].sizes() &&
        torch::equal(t.to(torch::kFloat), tensors.at("embed.weight").to(torch::kFloat)))
      continue;
    throw FileError(source,
                    "tensor '" + name + "' has no place in this " +
                        (name == "head.weight" ? std::string("model (its head is tied to "
                                                             "the embedding, but the file's "
                                                             "head differs from it)")
                                               : std::string("model")));
  }
  for (auto& p : model.named_parameters(true)) {
    auto it = tensors.find(p.key());
    if (it == tensors.end())
      throw FileError(source, "missing tensor for parameter '" + p.key() + "' (shape " +
                                  c10::str(p.value().sizes()) + ")");
    const auto& t = it->second;
    if (t.sizes() != p.value().sizes())
      throw FileError(source, "parameter '" + p.key() + "' has shape " + c10::str(t.sizes()) +
                                  " in the file but the model expects " +
                                  c10::str(p.value().sizes()));
    p.value().copy_(t);
  }
}

void init_parameters(torch::nn::Module& model, std::uint64_t seed, double std) {
  torch::NoGradGuard no_grad;
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& p : model.named_parameters(true)) {
    auto noise = at::normal(0.0, std, p.value().sizes(), gen).to(p.value().dtype());
    const bool gain = p.key().find("norm") != std::string::npos && p.key().size() > 7 &&
                      p.key().compare(p.key().size() - 7, 7, ".weight") == 0;
    p.value().copy_(gain ? noise + 1.0 : noise);
  }
}

}  // namespace graft::models
