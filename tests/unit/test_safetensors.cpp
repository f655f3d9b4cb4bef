#include <graft/error.h>
#include <graft/io/safetensors.h>
#include <torch/torch.h>

#include <fstream>

#include "support.h"
#include "util/file.h"

using namespace graft;
using graft::test::TempDir;

namespace {

std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

// A hand-made file: the 8-byte header length, the header, then `data`.
std::string make_file(const std::string& header, const std::string& data) {
  std::uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + data;
}

void check_error(const std::filesystem::path& p, const std::string& expected) {
  try {
    io::read_safetensors(p);
    FAIL("expected an error containing: " << expected);
  } catch (const FileError& e) {
    const std::string msg = e.what();
    CHECK_MESSAGE(msg.find(p.string()) == 0, msg);
    CHECK_MESSAGE(msg.find(expected) != std::string::npos, msg);
  }
}

}  // namespace

TEST_CASE("safetensors: round trip of every dtype, with metadata") {
  TempDir dir;
  io::TensorMap t;
  t["f32"] = torch::randn({3, 4});
  t["f16"] = torch::randn({5}).to(torch::kHalf);
  t["bf16"] = torch::randn({2, 2, 2}).to(torch::kBFloat16);
  t["i64"] = torch::arange(7, torch::kLong);
  t["u8"] = torch::arange(3, torch::kByte);
  t["scalar"] = torch::tensor(3.5);
  t["empty"] = torch::zeros({0, 3});
  io::write_safetensors(dir / "a.safetensors", t, {{"format", "pt"}});
  auto back = io::read_safetensors(dir / "a.safetensors");
  CHECK(back.metadata.at("format") == "pt");
  REQUIRE(back.tensors.size() == t.size());
  for (const auto& [name, x] : t) {
    INFO(name);
    CHECK((back.tensors[name].scalar_type() == x.scalar_type()));
    CHECK(back.tensors[name].sizes() == x.sizes());
    CHECK(torch::equal(back.tensors[name], x));
  }
  // The data section starts 8-byte aligned, as the format recommends.
  auto bytes = read_bytes(dir / "a.safetensors");
  std::uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  // Nothing but the file itself is left behind.
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), {}) == 1);
}

TEST_CASE("safetensors: sharded folders with an index") {
  TempDir dir;
  io::TensorMap t;
  for (int i = 0; i < 5; ++i) t["layer." + std::to_string(i)] = torch::full({100}, float(i));
  const int shards = io::write_safetensors_model(dir.path(), t, /*max_shard_bytes=*/900);
  CHECK(shards == 3);
  CHECK(std::filesystem::exists(dir / "model.safetensors.index.json"));
  CHECK(std::filesystem::exists(dir / "model-00001-of-00003.safetensors"));
  auto back = io::read_safetensors_model(dir.path());
  REQUIRE(back.size() == 5);
  for (const auto& [name, x] : t) CHECK(torch::equal(back.at(name), x));

  TempDir single;
  CHECK(io::write_safetensors_model(single.path(), t) == 1);
  CHECK(io::read_safetensors_model(single.path()).size() == 5);

  // An index that points at a tensor its shard lacks is an error naming the index.
  write_bytes(dir / "model.safetensors.index.json",
              R"({"weight_map": {"missing": "model-00001-of-00003.safetensors"}})");
  CHECK_THROWS_WITH_AS(io::read_safetensors_model(dir.path()),
                       doctest::Contains("that shard does not hold it"), FileError);
  TempDir empty;
  CHECK_THROWS_AS(io::read_safetensors_model(empty.path()), FileError);
}

TEST_CASE("safetensors: corrupted files give one clear error") {
  TempDir dir;
  io::TensorMap t{{"w", torch::randn({4, 4})}};
  io::write_safetensors(dir / "good.safetensors", t);
  const auto good = read_bytes(dir / "good.safetensors");

  // Every truncation of a valid file is an error, never a crash.
  for (std::size_t len = 0; len < good.size(); len += (len < 200 ? 1 : 7)) {
    write_bytes(dir / "cut.safetensors", good.substr(0, len));
    CHECK_THROWS_AS(io::read_safetensors(dir / "cut.safetensors"), FileError);
  }

  write_bytes(dir / "short.safetensors", "abc");
  check_error(dir / "short.safetensors", "truncated");

  std::string huge(8, '\xff');
  write_bytes(dir / "absurd.safetensors", huge + "{}");
  check_error(dir / "absurd.safetensors", "absurd");

  write_bytes(dir / "json.safetensors", make_file("{not json", ""));
  check_error(dir / "json.safetensors",
              "header: not valid JSON at line 1, column 3 (in an object key)");

  write_bytes(dir / "dtype.safetensors",
              make_file(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", "x"));
  check_error(dir / "dtype.safetensors", "unknown dtype \"F8\"");

  write_bytes(dir / "offset.safetensors",
              make_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", "12345678"));
  check_error(dir / "offset.safetensors", "fall outside");

  write_bytes(dir / "shape.safetensors",
              make_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"));
  check_error(dir / "shape.safetensors", "needs 12 bytes");

  write_bytes(
      dir / "bigshape.safetensors",
      make_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})",
                "12345678"));
  check_error(dir / "bigshape.safetensors", "absurd shape");

  write_bytes(dir / "negative.safetensors",
              make_file(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "1234"));
  check_error(dir / "negative.safetensors", "non-negative");

  write_bytes(dir / "overlap.safetensors",
              make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        "123456789012"));
  check_error(dir / "overlap.safetensors", "overlap");

  CHECK_THROWS_WITH_AS(io::read_safetensors(dir / "absent.safetensors"),
                       doctest::Contains("cannot open"), FileError);
}

TEST_CASE("a writer's folder is gone again when the writing fails, and kept when it succeeds") {
  TempDir dir;
  const auto deep = dir / "a" / "b" / "c";
  {
    io::MadeFolder made(deep);
    CHECK(std::filesystem::is_directory(deep));
  }  // not kept: as when a write throws
  CHECK_FALSE(std::filesystem::exists(dir / "a"));
  {
    io::MadeFolder made(deep);
    made.keep();
  }
  CHECK(std::filesystem::is_directory(deep));
  std::ofstream(deep / "mine.txt") << "x";
  {
    io::MadeFolder made(deep / "d");  // only what it created goes
  }
  CHECK(std::filesystem::exists(deep / "mine.txt"));
  CHECK_FALSE(std::filesystem::exists(deep / "d"));
  // A failed checkpoint-style write: the exception passes, the folder does not stay.
  try {
    io::MadeFolder made(dir / "x" / "step.tmp");
    io::write_safetensors(dir / "x" / "step.tmp" / "state.safetensors", {{"t", torch::ones({2})}});
    throw std::runtime_error("disk full");
  } catch (const std::runtime_error&) {
  }
  CHECK_FALSE(std::filesystem::exists(dir / "x"));
}
