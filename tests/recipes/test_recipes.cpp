// Recipes end to end on a tiny llama saved with a byte-level tokenizer: validation errors with
// file:line:column, includes and overrides, deterministic runs, exact resume, a non-finite loss,
// classification with a task head, instruction masking, and evaluation of a saved adapter.
#include <graft/adapter.h>
#include <graft/data.h>
#include <graft/io/safetensors.h>
#include <torch/torch.h>

#include <csignal>

#include "recipes/workspace.h"

using namespace graft;
using namespace graft::test;

TEST_CASE("recipe errors are one line with file:line:column, before any work starts") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "typo.yaml", "include: lm.yaml\ntrain:\n  stpes: 5\n");
  const auto typo =
      (w.dir / "typo.yaml").string() + ":3:3: train.stpes: unknown key (did you mean \"steps\"?)";
  CHECK_THROWS_WITH_AS(w.recipe("typo.yaml"), typo.c_str(), ParamError);
  write(w.dir / "type.yaml", "include: lm.yaml\ntrain:\n  batch_size: many\n");
  CHECK_THROWS_WITH_AS(
      w.recipe("type.yaml"),
      doctest::Contains(
          "type.yaml:3:3: train.batch_size: expected a positive integer, got \"many\""),
      ParamError);
  write(w.dir / "nofile.yaml", "include: lm.yaml\ntask:\n  train: data/missing.txt\n");
  CHECK_THROWS_WITH_AS(w.recipe("nofile.yaml"),
                       doctest::Contains("task.train: no data file matches \"data/missing.txt\""),
                       ParamError);
  write(w.dir / "method.yaml", "include: lm.yaml\nmethods:\n  - name: lorra\n");
  CHECK_THROWS_WITH_AS(w.recipe("method.yaml"), doctest::Contains("did you mean \"lora\"?"), Error);
  write(w.dir / "mkey.yaml", "include: lm.yaml\nmethods:\n  - name: lora\n    rank: 4\n");
  CHECK_THROWS_WITH_AS(w.recipe("mkey.yaml"),
                       doctest::Contains("mkey.yaml:4:5: methods[0].rank: unknown key"),
                       ParamError);
  CHECK_THROWS_WITH_AS(w.recipe("lm.yaml", {"train.lr=-1"}),
                       doctest::Contains("command line: train.lr: expected a positive number"),
                       ParamError);
  CHECK_THROWS_WITH_AS(w.recipe("lm.yaml", {"train..lr=1"}),
                       doctest::Contains("expected key.path=value"), ParamError);
  write(w.dir / "bad.yaml", "model: [unclosed\n");
  CHECK_THROWS_WITH_AS(w.recipe("bad.yaml"), doctest::Contains("bad.yaml:2:1"), FileError);
  write(w.dir / "self.yaml", "include: self.yaml\n");
  CHECK_THROWS_WITH_AS(w.recipe("self.yaml"), doctest::Contains("includes itself"), FileError);
  // A method whose placement conflicts with one before it is an error at that method.
  auto conflict = w.recipe("lm.yaml", {"methods=[{name: lora, dora: true}, {name: quantize}]"});
  CHECK_THROWS_WITH_AS(run_recipe(conflict, w.quiet()),
                       doctest::Contains("methods[1]: quantize: site 'layers.0.attn.q' already has "
                                         "a weight transform"),
                       ParamError);
  // Combinations no one means: the same method twice at a site, training a weight and adapting it.
  CHECK_THROWS_WITH_AS(
      validate_recipe(
          w.recipe("lm.yaml",
                   {"methods=[{name: lora, targets: [attn.q]}, {name: lora, targets: [attn.q]}]"})),
      doctest::Contains("methods[1]: lora adapts layers.0.attn.q, which methods[0] (lora) adapts "
                        "already"),
      ParamError);
  CHECK(
      validate_recipe(
          w.recipe("lm.yaml",
                   {"methods=[{name: lora, targets: [attn.q]}, {name: lora, targets: [attn.v]}]"}))
          .at("train_examples") > 0);
  for (const auto* methods :
       {"methods=[{name: full}, {name: lora}]", "methods=[{name: lora}, {name: full}]"})
    CHECK_THROWS_WITH_AS(
        validate_recipe(w.recipe("lm.yaml", {methods})),
        doctest::Contains("full trains the base weight of layers.0.attn.q, where "), ParamError);
}

TEST_CASE("includes merge maps and overrides replace values, lists and items") {
  Workspace w;
  write(w.dir / "child.yaml", "include: lm.yaml\ntrain:\n  lr: 0.5\n");
  auto r = w.recipe("child.yaml", {"methods[0].r=2", "eval.metrics=[loss, accuracy]", "seed=3"});
  CHECK(r.train.lr == 0.5);
  CHECK(r.train.steps == 6);  // kept from the included file
  CHECK(r.methods.items()[0].at("r").text() == "2");
  CHECK(r.methods.items()[0].at("dropout").text() == "0.1");
  CHECK(r.eval.metrics == std::vector<std::string>{"loss", "accuracy"});
  CHECK(r.seed == 3);
  CHECK(r.task.train.size() == 1);
  CHECK(to_yaml(r.params).find("lr: 0.5") != std::string::npos);
}

TEST_CASE("building blocks: a method preset included in a list item, a list of methods spliced") {
  Workspace w;
  write(w.dir / "configs/methods/lora-qv.yaml", "name: lora\nr: 4\ntargets: [attn.q, attn.v]\n");
  write(w.dir / "configs/methods/pair.yaml", "- name: ia3\n- include: lora-qv.yaml\n  alpha: 3\n");
  write(w.dir / "configs/data/lm.yaml", "task:\n  max_length: 16\n");
  write(w.dir / "blocks.yaml", R"(include: [lm.yaml, configs/data/lm.yaml]
methods:
  - include: configs/methods/lora-qv.yaml
    r: 8
  - include: configs/methods/pair.yaml
  - name: bitfit
)");
  auto r = w.recipe("blocks.yaml");
  CHECK(r.task.max_length == 16);
  REQUIRE(r.methods.items().size() == 4);
  // The item's own keys win over the preset's; the list preset takes one item's place.
  CHECK(r.methods.items()[0].at("name").text() == "lora");
  CHECK(r.methods.items()[0].at("r").text() == "8");
  CHECK(r.methods.items()[1].at("name").text() == "ia3");
  CHECK(r.methods.items()[2].at("r").text() == "4");
  CHECK(r.methods.items()[2].at("alpha").text() == "3");
  CHECK(r.methods.items()[3].at("name").text() == "bitfit");
  // Errors name the preset's file and the place the value landed.
  write(w.dir / "configs/methods/bad.yaml", "name: lora\nr: eight\n");
  write(w.dir / "bad-block.yaml",
        "include: lm.yaml\nmethods:\n  - name: ia3\n  - include: "
        "configs/methods/bad.yaml\n");
  CHECK_THROWS_WITH_AS(w.recipe("bad-block.yaml"),
                       doctest::Contains("bad.yaml:2:1: methods[1].r: expected a positive integer"),
                       ParamError);
  write(w.dir / "missing.yaml", "include: lm.yaml\nmethods:\n  - include: nowhere.yaml\n");
  CHECK_THROWS_WITH_AS(w.recipe("missing.yaml"), doctest::Contains("no such file"), ParamError);
  write(w.dir / "configs/methods/loop.yaml", "- include: loop.yaml\n");
  write(w.dir / "loop-recipe.yaml",
        "include: lm.yaml\nmethods:\n  - include: configs/methods/loop.yaml\n");
  CHECK_THROWS_WITH_AS(w.recipe("loop-recipe.yaml"), doctest::Contains("includes itself"), Error);
}

TEST_CASE("the same recipe and seed give bit-identical metrics and adapter, and resume is exact") {
  Workspace w;
  InDir in(w.dir);
  auto a = w.recipe("lm.yaml", {"output.dir=runs/a"});
  auto b = w.recipe("lm.yaml", {"output.dir=runs/b"});
  auto c = w.recipe("lm.yaml", {"output.dir=runs/c", "checkpoint.every=2"});
  auto summary = run_recipe(a, w.quiet());
  run_recipe(b, w.quiet());
  CHECK(read("runs/a/metrics.jsonl") == read("runs/b/metrics.jsonl"));
  CHECK(read("runs/a/adapter/adapter.safetensors") == read("runs/b/adapter/adapter.safetensors"));
  CHECK(summary["eval_after"]["loss"].get<double>() < summary["eval_before"]["loss"].get<double>());
  for (const auto* f :
       {"recipe.yaml", "manifest.json", "summary.json", "adapter/adapter_config.json"})
    CHECK_MESSAGE(fs::exists(fs::path("runs/a") / f), f);
  const auto manifest = json::parse(read("runs/a/manifest.json"));
  CHECK(manifest.at("seed") == 7);
  CHECK(manifest.at("libtorch_version").get<std::string>() == TORCH_VERSION);
  CHECK(!manifest.at("plugins").empty());

  // Interrupted after step 3 (dropout and the data position in flight), then resumed.
  auto stop = w.quiet();
  stop.stop_at = 3;
  CHECK(run_recipe(c, stop).at("stopped_at") == 3);
  // Training state is safetensors and JSON only: nothing a pickle loader would read.
  for (const auto& e : fs::directory_iterator("runs/c/checkpoints/step-000003"))
    CHECK_MESSAGE((e.path().extension() == ".safetensors" || e.path().extension() == ".json"),
                  e.path());
  CHECK(fs::exists("runs/c/checkpoints/step-000003/optimizer.safetensors"));
  CHECK_FALSE(fs::exists("runs/c/adapter"));
  auto resume = w.quiet();
  resume.resume = true;
  // A checkpoint holding a pickle (an earlier graft's optimizer.pt, or a crafted one) is refused
  // in one line, never opened.
  write("runs/c/checkpoints/step-000003/optimizer.pt", "PK\x03\x04 a TorchScript zip");
  CHECK_THROWS_WITH_AS(run_recipe(c, resume),
                       doctest::Contains("optimizer.pt: a pickle or TorchScript archive, which "
                                         "can run code when read"),
                       FileError);
  fs::remove("runs/c/checkpoints/step-000003/optimizer.pt");
  run_recipe(c, resume);
  CHECK(read("runs/a/metrics.jsonl") == read("runs/c/metrics.jsonl"));
  CHECK(read("runs/a/adapter/adapter.safetensors") == read("runs/c/adapter/adapter.safetensors"));
  CHECK(fs::exists("runs/c/checkpoints/step-000006"));
  CHECK_FALSE(fs::exists("runs/c/checkpoints/step-000002"));  // keep: 2

  // A finished run is not overwritten; resuming with another recipe is refused.
  CHECK_THROWS_WITH_AS(run_recipe(a, w.quiet()),
                       doctest::Contains("already holds a finished run; add --overwrite"), Error);
  auto other = w.recipe("lm.yaml", {"output.dir=runs/c", "checkpoint.every=2", "train.lr=0.5"});
  CHECK_THROWS_WITH_AS(run_recipe(other, resume), doctest::Contains("differs from the one"), Error);
}

TEST_CASE("model.adapters: a new adapter trains on top of a loaded, frozen one (a Stack)") {
  Workspace w;
  InDir in(w.dir);
  const std::string pfeiffer = "methods=[{name: pfeiffer, reduction_factor: 4, init: mam}]";
  const auto first =
      run_recipe(w.recipe("lm.yaml", {"output.dir=runs/first", pfeiffer}), w.quiet());
  const auto frozen = read("runs/first/adapter/adapter.safetensors");
  const auto second = run_recipe(
      w.recipe("lm.yaml",
               {"output.dir=runs/second", "model.adapters=[runs/first/adapter]", pfeiffer}),
      w.quiet());
  // The new adapter starts as a no-op on top of the first: the model the first one left.
  CHECK(second["eval_before"]["loss"] == first["eval_after"]["loss"]);
  CHECK(second["eval_after"]["loss"].get<double>() < second["eval_before"]["loss"].get<double>());
  // Only the new adapter is saved; the frozen one is untouched.
  const auto cfg = json::parse(read("runs/second/adapter/adapter_config.json"));
  CHECK(cfg["methods"].size() == 1);
  CHECK(read("runs/first/adapter/adapter.safetensors") == frozen);
  // Loaded one after the other, the two give the run's final model.
  auto loaded = load_model((w.dir / "model").string());
  auto a = load_adapter("runs/first/adapter", *loaded.model);
  auto b = load_adapter("runs/second/adapter", *loaded.model);
  CHECK(loaded.model->hooks("layers.0.ffn.out").residual.size() == 2);
  CHECK_THROWS_WITH_AS(
      run_recipe(w.recipe("lm.yaml", {"output.dir=runs/x", "model.adapters=[runs/none]"}),
                 w.quiet()),
      doctest::Contains("runs/none"), Error);
  // Named, and chosen with model.active: none active is the base model the first run started on.
  const auto off = run_recipe(
      w.recipe("lm.yaml", {"output.dir=runs/off", "model.adapters=[one=runs/first/adapter]",
                           "model.active=[]", pfeiffer}),
      w.quiet());
  CHECK(off["eval_before"]["loss"] == first["eval_before"]["loss"]);
  const auto on = run_recipe(
      w.recipe("lm.yaml", {"output.dir=runs/on", "model.adapters=[one=runs/first/adapter]",
                           "model.active=[one]", pfeiffer}),
      w.quiet());
  CHECK(on["eval_before"]["loss"] == first["eval_after"]["loss"]);
  CHECK_THROWS_WITH_AS(
      w.recipe("lm.yaml", {"model.adapters=[one=runs/first/adapter]", "model.active=[two]"}),
      doctest::Contains("model.active: no adapter named 'two' in model.adapters"), ParamError);
  CHECK_THROWS_WITH_AS(
      w.recipe("lm.yaml", {"model.adapters=[x=runs/first/adapter, x=runs/second/adapter]"}),
      doctest::Contains("another adapter is named 'x' already"), ParamError);
}

TEST_CASE("methods[i].from: training continues from a saved adapter") {
  Workspace w;
  InDir in(w.dir);
  const auto first = run_recipe(
      w.recipe("lm.yaml", {"output.dir=runs/first", "methods=[{name: lora, r: 2}]"}), w.quiet());
  const auto saved = read("runs/first/adapter/adapter.safetensors");
  const auto second = run_recipe(
      w.recipe("lm.yaml",
               {"output.dir=runs/second", "methods=[{name: lora, from: runs/first/adapter}]"}),
      w.quiet());
  // It starts where the first run ended, and trains on.
  CHECK(second["eval_before"]["loss"] == first["eval_after"]["loss"]);
  CHECK(second["eval_after"]["loss"].get<double>() < second["eval_before"]["loss"].get<double>());
  CHECK(read("runs/first/adapter/adapter.safetensors") == saved);  // the source is untouched
  const auto cfg = json::parse(read("runs/second/adapter/adapter_config.json"));
  CHECK(cfg["methods"][0]["config"]["r"] == 2);  // the saved adapter's settings
  // Settings beside `from`, another method's name, a missing folder: one line each.
  CHECK_THROWS_WITH_AS(
      w.recipe("lm.yaml", {"methods=[{name: lora, from: runs/first/adapter, r: 4}]"}),
      doctest::Contains("methods[0].r: unknown key"), ParamError);
  CHECK_THROWS_WITH_AS(w.recipe("lm.yaml", {"methods=[{name: lora, from: runs/none}]"}),
                       doctest::Contains("methods[0].from: no adapter at"), ParamError);
  CHECK_THROWS_WITH_AS(
      run_recipe(w.recipe("lm.yaml",
                          {"output.dir=runs/x", "methods=[{name: ia3, from: runs/first/adapter}]"}),
                 w.quiet()),
      doctest::Contains("holds lora; continuing training takes an adapter of one method, ia3"),
      Error);
}

TEST_CASE("train.precision: bf16 trains float32 master weights under autocast, reproducibly") {
  Workspace w;
  InDir in(w.dir);
  CHECK_THROWS_WITH_AS(w.recipe("lm.yaml", {"train.precision=fp16"}),
                       doctest::Contains("train.precision"), ParamError);
  CHECK_THROWS_WITH_AS(w.recipe("lm.yaml", {"train.precision=bf16", "model.dtype=bfloat16"}),
                       doctest::Contains("float32 master weights"), ParamError);
  auto bf16 = w.recipe("lm.yaml", {"output.dir=runs/bf16", "train.precision=bf16"});
  auto again = w.recipe("lm.yaml", {"output.dir=runs/again", "train.precision=bf16"});
  auto f32 = w.recipe("lm.yaml", {"output.dir=runs/f32"});
  const auto summary = run_recipe(bf16, w.quiet());
  run_recipe(again, w.quiet());
  run_recipe(f32, w.quiet());
  CHECK(summary["eval_after"]["loss"].get<double>() < summary["eval_before"]["loss"].get<double>());
  CHECK(read("runs/bf16/metrics.jsonl") == read("runs/again/metrics.jsonl"));
  CHECK(read("runs/bf16/metrics.jsonl") != read("runs/f32/metrics.jsonl"));  // autocast is on
  for (const auto& [name, t] :
       io::read_safetensors("runs/bf16/adapter/adapter.safetensors").tensors)
    CHECK_MESSAGE((t.scalar_type() == torch::kFloat), name);
}

TEST_CASE(
    "SIGINT stops a run at a step boundary with a checkpoint, and --resume continues exactly") {
  Workspace w;
  InDir in(w.dir);
  auto whole = w.recipe("lm.yaml", {"output.dir=runs/whole"});
  run_recipe(whole, w.quiet());
  auto r = w.recipe("lm.yaml", {"output.dir=runs/int"});
  auto o = w.quiet();
  o.handle_signals = true;
  o.on_step = [](std::int64_t step) {
    if (step == 2) std::raise(SIGINT);  // as Ctrl-C in the middle of step 3 would
  };
  const auto stopped = run_recipe(r, o);
  CHECK(stopped.at("interrupted_at") == 2);
  CHECK(stopped.at("signal") == SIGINT);
  CHECK(fs::exists("runs/int/checkpoints/step-000002/trainer.json"));
  CHECK_FALSE(fs::exists("runs/int/summary.json"));
  // The same command again without --resume says what to do.
  CHECK_THROWS_WITH_AS(run_recipe(r, w.quiet()),
                       doctest::Contains("add --resume to continue it, --overwrite to start it "
                                         "again, or choose another folder"),
                       Error);
  auto resume = w.quiet();
  resume.resume = true;
  run_recipe(r, resume);
  CHECK(read("runs/whole/metrics.jsonl") == read("runs/int/metrics.jsonl"));
  CHECK(read("runs/whole/adapter/adapter.safetensors") ==
        read("runs/int/adapter/adapter.safetensors"));
}

TEST_CASE(
    "a run folder without progress starts again, and --overwrite replaces graft's files only") {
  Workspace w;
  InDir in(w.dir);
  auto r = w.recipe("lm.yaml", {"output.dir=runs/x"});
  // A run that failed before its first checkpoint: recipe, manifest and metrics, nothing more.
  write("runs/x/recipe.yaml", "seed: 1\n");
  write("runs/x/metrics.jsonl", "");
  write("runs/x/notes.txt", "mine\n");
  run_recipe(r, w.quiet());  // starts again
  CHECK(fs::exists("runs/x/summary.json"));
  CHECK(read("runs/x/notes.txt") == "mine\n");
  // The same with --resume: there is nothing to continue, so it starts again too (a job script
  // that always passes --resume works after a kill in the first steps).
  write("runs/y/recipe.yaml", "seed: 1\n");
  write("runs/y/metrics.jsonl", "");
  auto resume = w.quiet();
  resume.resume = true;
  run_recipe(w.recipe("lm.yaml", {"output.dir=runs/y"}), resume);
  CHECK(read("runs/y/metrics.jsonl") == read("runs/x/metrics.jsonl"));
  // Finished: only --overwrite starts it again, and a user's file stays.
  CHECK_THROWS_WITH_AS(run_recipe(r, w.quiet()), doctest::Contains("--overwrite"), Error);
  CHECK_THROWS_WITH_AS(run_recipe(r, resume), doctest::Contains("the run finished"), Error);
  auto over = w.quiet();
  over.overwrite = true;
  const auto before = read("runs/x/metrics.jsonl");
  run_recipe(r, over);
  CHECK(read("runs/x/metrics.jsonl") == before);
  CHECK(read("runs/x/notes.txt") == "mine\n");
  over.resume = true;
  CHECK_THROWS_WITH_AS(run_recipe(r, over), doctest::Contains("not both"), Error);
}

TEST_CASE("a non-finite loss stops the run and names the last good checkpoint") {
  Workspace w;
  InDir in(w.dir);
  auto r = w.recipe("lm.yaml", {"output.dir=runs/nan", "train.optimizer=sgd", "train.lr=1e38",
                                "train.max_grad_norm=0", "train.warmup_steps=0",
                                "train.schedule=constant", "checkpoint.every=1", "train.steps=50"});
  CHECK_THROWS_WITH_AS(run_recipe(r, w.quiet()),
                       doctest::Contains("training stopped. The last good checkpoint is"), Error);
  CHECK(fs::exists("runs/nan/metrics.jsonl"));
  CHECK_FALSE(fs::exists("runs/nan/adapter"));
}

TEST_CASE("classification trains a task head with a method and evaluates it again") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "cls.yaml", R"(include: lm.yaml
task:
  kind: sequence_classification
  train: data/labelled.json
  eval: []
  eval_fraction: 0.25
  format: json
  label_field: class
  num_labels: 2
methods:
  - name: ia3
train:
  steps: 12
  lr: 5.0e-2
generate: {prompt: ""}
output:
  dir: runs/cls
)");
  auto r = w.recipe("cls.yaml");
  auto summary = run_recipe(r, w.quiet());
  CHECK(summary["eval_examples"] == 12);
  CHECK(summary["eval_after"].contains("accuracy"));
  CHECK(summary["eval_after"].contains("f1"));
  CHECK(fs::exists("runs/cls/adapter/task_head.safetensors"));
  // ia3 (1 vector per k, v, down and layer) + the head (16 x 2 + 2).
  CHECK(summary["trainable_parameters"] == 2 * (8 + 8 + 24) + 34);
  auto again = evaluate_recipe(r, {"runs/cls/adapter"});
  // The same batches through the same code and weights: the same numbers, to the last bit.
  CHECK(again["metrics"]["accuracy"].get<double>() ==
        summary["eval_after"]["accuracy"].get<double>());
  CHECK(again["metrics"]["loss"].get<double>() == summary["eval_after"]["loss"].get<double>());
}

TEST_CASE("classification on a decoder's sequence-classification folder, exported to peft") {
  Workspace w;
  InDir in(w.dir);
  // The tiny llama as LlamaForSequenceClassification: the same body, a score head of 2 labels.
  {
    auto lm = load_model((w.dir / "model").string());
    auto config = lm.model->config();
    config.architecture = "LlamaForSequenceClassification";
    config.classifier = "score";
    config.num_labels = 2;
    auto cls = make_model(config);
    torch::NoGradGuard ng;
    auto body = lm.model->named_parameters();
    for (auto& p : cls->named_parameters())
      p.value().copy_(p.key() == "head.weight" ? torch::randn(p.value().sizes()) * 0.02
                                               : body[p.key()]);
    save_hf_model(*cls, w.dir / "cls-model");
    fs::copy_file(w.dir / "model" / "tokenizer.json", w.dir / "cls-model" / "tokenizer.json");
  }
  // As peft's SEQ_CLS does, the recipe trains the score head too (layer_select on head).
  write(w.dir / "dcls.yaml", R"(include: lm.yaml
model:
  path: cls-model
task:
  kind: sequence_classification
  train: data/labelled.json
  eval: []
  eval_fraction: 0.25
  format: json
  label_field: class
  num_labels: 2
methods:
  - name: lora
    r: 4
  - name: layer_select
    targets: [head]
train:
  steps: 12
  lr: 5.0e-2
generate: {prompt: ""}
output:
  dir: runs/dcls
)");
  auto r = w.recipe("dcls.yaml");
  auto summary = run_recipe(r, w.quiet());
  // No separate task head: the model's own score head was trained (2 x 16) beside the LoRA.
  CHECK_FALSE(fs::exists("runs/dcls/adapter/task_head.safetensors"));
  CHECK(summary["trainable_parameters"] == 2 * (4 * (16 + 16) + 4 * (16 + 8)) + 2 * 16);
  // Exported to peft: LoRA with modules_to_save ["score"]; loaded again, the same logits.
  auto base = load_model("cls-model");
  auto methods = load_adapter("runs/dcls/adapter", *base.model);
  std::vector<Method*> all;
  for (auto& m : methods) all.push_back(m.get());
  const auto ids = torch::tensor({{5, 9, 12, 7}, {3, 4, 0, 0}}, torch::kLong);
  const auto mask = torch::tensor({{1, 1, 1, 1}, {1, 1, 0, 0}}, torch::kLong);
  torch::NoGradGuard ng;
  const auto trained = base.model->forward({ids, mask, {}, {}}, nullptr).logits;
  CHECK(trained.sizes() == c10::IntArrayRef({2, 2}));
  save_adapter_as("peft", "peft", *base.model, all);
  const auto cfg = json::parse(read("peft/adapter_config.json"));
  CHECK(cfg["task_type"] == "SEQ_CLS");
  CHECK(cfg["modules_to_save"] == json::array({"score"}));
  auto fresh = load_model("cls-model");
  auto back = load_adapter("peft", *fresh.model);
  REQUIRE(back.size() == 2);
  CHECK(back[1]->name() == "layer_select");
  CHECK(torch::equal(fresh.model->forward({ids, mask, {}, {}}, nullptr).logits, trained));
}

TEST_CASE("task data: TSV with a sign rule, CSV quoting, instruction prompts masked") {
  Workspace w;
  auto tok = load_model((w.dir / "model").string()).tokenizer;
  write(w.dir / "r.tsv", "1\t2.5\tfine film\n2\t-1.0\tdull\n3\t0\tmeh\n");
  TaskSpec t;
  t.kind = "sequence_classification";
  t.format = "tsv";
  t.columns = {"id", "rating", "text"};
  t.label_field = "rating";
  t.label_rule = "sign";
  t.train = {w.dir / "r.tsv"};
  t.eval_fraction = 0;
  auto d = load_task_data(t, *tok, 0);
  REQUIRE(d.train.size() == 2);
  CHECK(d.dropped == 1);
  CHECK(d.train[0].label == 1);
  CHECK(d.train[1].label == 0);

  write(w.dir / "c.csv", "text,label\n\"a, \"\"quoted\"\" text\",1\nplain,0\n");
  t.format = "csv";
  t.columns = {};
  t.label_field = "label";
  t.label_rule = "none";
  t.train = {w.dir / "c.csv"};
  d = load_task_data(t, *tok, 0);
  REQUIRE(d.train.size() == 2);
  CHECK(tok->decode(d.train[0].ids) == "a, \"quoted\" text");

  write(w.dir / "bad.csv", "text,label\nx,7\n");
  t.train = {w.dir / "bad.csv"};
  CHECK_THROWS_WITH_AS(load_task_data(t, *tok, 0),
                       doctest::Contains("bad.csv:2: label \"7\" is not an integer in [0, 2)"),
                       FileError);

  write(w.dir / "i.jsonl", R"({"prompt": "Q: hi", "response": " A: yo"})"
                           "\n");
  TaskSpec ins;
  ins.kind = "instruction";
  ins.format = "jsonl";
  ins.train = {w.dir / "i.jsonl"};
  ins.eval_fraction = 0;
  d = load_task_data(ins, *tok, 0);
  REQUIRE(d.train.size() == 1);
  const auto& e = d.train[0];
  const auto prompt_len = tok->encode("Q: hi", true).size();
  for (std::size_t i = 0; i < prompt_len; ++i) CHECK(e.labels[i] == -100);
  CHECK(e.labels[prompt_len] == e.ids[prompt_len]);
  CHECK(e.labels.back() == 256);  // the end-of-text token closes the response
}

TEST_CASE("resume is exact for methods with training-only state: prefix MLP, calibrated sparse") {
  Workspace w;
  InDir in(w.dir);
  for (const std::string methods :
       {"methods=[{name: prefix_tuning, num_virtual_tokens: 2, bottleneck: 8, dropout: 0.1}]",
        "methods=[{name: sparse, selection: gradient, density: 0.05, calibration_batches: 2}]"}) {
    CAPTURE(methods);
    const auto tag = methods.find("prefix") != std::string::npos ? "prefix" : "sparse";
    auto whole = w.recipe("lm.yaml", {methods, std::string("output.dir=runs/whole-") + tag});
    auto parts = w.recipe("lm.yaml", {methods, std::string("output.dir=runs/parts-") + tag});
    run_recipe(whole, w.quiet());
    auto stop = w.quiet();
    stop.stop_at = 4;
    run_recipe(parts, stop);
    auto resume = w.quiet();
    resume.resume = true;
    run_recipe(parts, resume);
    const fs::path a = std::string("runs/whole-") + tag, b = std::string("runs/parts-") + tag;
    CHECK(read(a / "metrics.jsonl") == read(b / "metrics.jsonl"));
    CHECK(read(a / "adapter/adapter.safetensors") == read(b / "adapter/adapter.safetensors"));
  }
}

TEST_CASE(
    "an instruction recipe uses the model's chat template, refused when graft cannot render it") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "data/i.jsonl", R"({"prompt": "Name a colour.", "response": "Blue."})"
                                "\n"
                                R"({"prompt": "Name a fruit.", "response": "Apple."})"
                                "\n");
  write(w.dir / "chat.yaml",
        "include: lm.yaml\ntask:\n  kind: instruction\n  train: "
        "data/i.jsonl\n  eval: []\n  eval_fraction: 0\n  template: chat\n  max_length: 64\n");
  const char* none =
      "chat.yaml:7:3: task.template: model has no chat template: name the format "
      "instead (chatml, llama2, llama3)";
  CHECK_THROWS_WITH_AS(validate_recipe(w.recipe("chat.yaml")), doctest::Contains(none), ParamError);
  // Llama 2's template, as a list entry named "default" (transformers' form for several).
  const std::string llama2 =
      R"({% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %})";
  write(w.dir / "model/tokenizer_config.json", json{{"chat_template",
                                                     {{{"name", "tool_use"}, {"template", "x"}},
                                                      {{"name", "default"}, {"template", llama2}}}}}
                                                   .dump());
  const auto counts = validate_recipe(w.recipe("chat.yaml"));
  CHECK(counts.at("train_examples") == 2);
  auto tok = load_model((w.dir / "model").string()).tokenizer;
  const auto chat = ChatTemplate::named("llama2");
  const auto data = load_task_data(w.recipe("chat.yaml").task, *tok, 0, &chat);
  // This tokenizer has no BOS: the turn opens with [INST]; the answer closes with its EOS.
  CHECK(tok->decode(data.train[0].ids, false).rfind("[INST] Name a", 0) == 0);
  CHECK(data.train[0].ids.back() == tok->eos_id());

  write(w.dir / "model/tokenizer_config.json",
        json{{"chat_template", "{{ messages[0]['content'] }}"}}.dump());
  CHECK_THROWS_WITH_AS(validate_recipe(w.recipe("chat.yaml")),
                       doctest::Contains("its chat_template is not one graft renders"), ParamError);
}

TEST_CASE("resume is exact with SGD's momentum, kept as safetensors") {
  Workspace w;
  InDir in(w.dir);
  const std::vector<std::string> sgd = {"train.optimizer=sgd", "train.momentum=0.9",
                                        "checkpoint.every=2"};
  auto with = [&](const std::string& dir) {
    auto o = sgd;
    o.push_back("output.dir=" + dir);
    return w.recipe("lm.yaml", o);
  };
  run_recipe(with("runs/whole"), w.quiet());
  auto stop = w.quiet();
  stop.stop_at = 3;
  run_recipe(with("runs/parts"), stop);
  const auto moments =
      io::read_safetensors("runs/parts/checkpoints/step-000003/optimizer.safetensors").tensors;
  CHECK(moments.count("0.momentum"));
  auto resume = w.quiet();
  resume.resume = true;
  run_recipe(with("runs/parts"), resume);
  CHECK(read("runs/whole/metrics.jsonl") == read("runs/parts/metrics.jsonl"));
  CHECK(read("runs/whole/adapter/adapter.safetensors") ==
        read("runs/parts/adapter/adapter.safetensors"));
}

TEST_CASE("checkpoint pruning touches only graft's checkpoints, by step number, never via a link") {
  Workspace w;
  InDir in(w.dir);
  // A user's folders beside the checkpoints, one sorting after every step name.
  write("runs/p/checkpoints/notes/todo.txt", "mine");
  write("runs/p/checkpoints/zzz/keep.txt", "mine");
  write("runs/p/checkpoints/step-000001-old/trainer.json", "{}");  // not a step name
  auto r = w.recipe("lm.yaml", {"output.dir=runs/p", "checkpoint.every=2", "checkpoint.keep=1"});
  auto stop = w.quiet();
  stop.stop_at = 4;
  run_recipe(r, stop);
  CHECK(read("runs/p/checkpoints/notes/todo.txt") == "mine");
  CHECK(read("runs/p/checkpoints/zzz/keep.txt") == "mine");
  CHECK(fs::exists("runs/p/checkpoints/step-000001-old/trainer.json"));
  CHECK(fs::exists("runs/p/checkpoints/step-000004/trainer.json"));  // the newest is kept
  CHECK_FALSE(fs::exists("runs/p/checkpoints/step-000002"));
  auto resume = w.quiet();
  resume.resume = true;
  CHECK(run_recipe(r, resume).contains("eval_after"));

  // Steps compare as numbers: step 1,000,000 comes after step 999,999.
  write("runs/n/checkpoints/step-999999/trainer.json", "{}");
  write("runs/n/checkpoints/step-1000000/trainer.json", "{}");
  CHECK(latest_checkpoint("runs/n").filename() == "step-1000000");

  // A link in graft's place inside a run folder is refused; what it points at is untouched.
  write("elsewhere/step-000002/trainer.json", "{}");
  fs::create_directories("runs/l");
  fs::create_directory_symlink(fs::absolute("elsewhere"), "runs/l/checkpoints");
  auto linked = w.recipe("lm.yaml", {"output.dir=runs/l", "checkpoint.every=2"});
  CHECK_THROWS_WITH_AS(run_recipe(linked, w.quiet()),
                       doctest::Contains("runs/l/checkpoints: is a symbolic link; inside a run "
                                         "folder graft writes only files and folders it made"),
                       FileError);
  fs::remove("runs/l/checkpoints");
  fs::create_directory_symlink(fs::absolute("elsewhere"), "runs/l/adapter");
  CHECK_THROWS_WITH_AS(run_recipe(linked, w.quiet()), doctest::Contains("is a symbolic link"),
                       FileError);
  CHECK(fs::exists("elsewhere/step-000002/trainer.json"));
  CHECK_FALSE(fs::exists("elsewhere/adapter_config.json"));
}

TEST_CASE("hostile recipes: YAML aliases that multiply, includes of devices, are refused quickly") {
  Workspace w;
  // Ten levels of nine-fold aliases: 9^10 values if expanded.
  std::string bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n";
  for (int i = 1; i <= 10; ++i) {
    bomb += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int k = 0; k < 9; ++k) bomb += std::string(k ? ", " : "") + "*a" + std::to_string(i - 1);
    bomb += "]\n";
  }
  write(w.dir / "bomb.yaml", bomb);
  // (Expanded, it would not fit in memory: refused as it is read.)
  CHECK_THROWS_WITH_AS(w.recipe("bomb.yaml"),
                       doctest::Contains("values once its YAML aliases are expanded"), FileError);
  write(w.dir / "zero.yaml", "include: /dev/zero\n");
  CHECK_THROWS_WITH_AS(w.recipe("zero.yaml"), doctest::Contains("/dev/zero: not a regular file"),
                       FileError);
}
