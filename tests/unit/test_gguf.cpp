#include <c10/util/Half.h>
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <fstream>

#include "support.h"

using namespace graft;
using graft::test::TempDir;

namespace {

// Builds GGUF bytes by hand, independently of graft's writer.
struct Bytes {
  std::string s;
  template <typename T>
  Bytes& put(T v) {
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
    return *this;
  }
  Bytes& str(const std::string& v) {
    put<std::uint64_t>(v.size());
    s += v;
    return *this;
  }
  Bytes& align(std::size_t a) {
    while (s.size() % a) s += '\0';
    return *this;
  }
};

void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// One tensor "t" of `type` with innermost dimension `inner` and `rows` rows; `data` its bytes.
std::string one_tensor_file(std::uint32_t version, std::uint32_t type, std::uint64_t inner,
                            std::uint64_t rows, const std::string& data, std::uint64_t offset = 0) {
  Bytes b;
  b.s = "GGUF";
  b.put<std::uint32_t>(version).put<std::uint64_t>(1).put<std::uint64_t>(1);
  b.str("general.architecture").put<std::uint32_t>(8).str("llama");
  b.str("t").put<std::uint32_t>(2).put<std::uint64_t>(inner).put<std::uint64_t>(rows);
  b.put<std::uint32_t>(type).put<std::uint64_t>(offset);
  b.align(32);
  b.s += data;
  return b.s;
}

void check_error(const std::filesystem::path& p, const std::string& expected) {
  try {
    io::GgufFile f(p);
    f.load_all();
    FAIL("expected an error containing: " << expected);
  } catch (const FileError& e) {
    const std::string msg = e.what();
    CHECK_MESSAGE(msg.find(p.string()) == 0, msg);
    CHECK_MESSAGE(msg.find(expected) != std::string::npos, msg);
  }
}

}  // namespace

TEST_CASE("gguf: metadata of every type and F32/F16/BF16 tensors round trip") {
  TempDir dir;
  std::vector<std::pair<std::string, io::GgufValue>> meta = {
      {"general.architecture", io::gguf_string("llama")},
      {"u8", io::gguf_int(200, io::GgufType::u8)},
      {"i8", io::gguf_int(-100, io::GgufType::i8)},
      {"u16", io::gguf_int(60000, io::GgufType::u16)},
      {"i16", io::gguf_int(-30000, io::GgufType::i16)},
      {"u32", io::gguf_int(4000000000, io::GgufType::u32)},
      {"i32", io::gguf_int(-2000000000, io::GgufType::i32)},
      {"u64", io::gguf_int(1ll << 50, io::GgufType::u64)},
      {"i64", io::gguf_int(-(1ll << 50), io::GgufType::i64)},
      {"f32", io::gguf_float(1.5)},
      {"f64", io::gguf_float(2.25, io::GgufType::f64)},
      {"bool", io::gguf_int(1, io::GgufType::boolean)},
      {"strings", io::gguf_strings({"a", "bc", ""})},
      {"floats", io::gguf_floats({0.5, -1.0})},
      {"ints", io::gguf_ints({1, 2, 3})},
  };
  io::TensorMap t{{"a", torch::randn({3, 5})},
                  {"b", torch::randn({7}).to(torch::kHalf)},
                  {"c", torch::randn({2, 3, 4}).to(torch::kBFloat16)}};
  io::write_gguf(dir / "m.gguf", meta, t);

  for (std::uint32_t version : {3u, 2u}) {
    auto bytes = read_bytes(dir / "m.gguf");
    std::memcpy(bytes.data() + 4, &version, 4);  // v2 and v3 share the little-endian layout
    write_bytes(dir / "v.gguf", bytes);
    io::GgufFile f(dir / "v.gguf");
    CHECK(f.version() == version);
    CHECK(f.at("general.architecture").as_string("") == "llama");
    CHECK(f.at("u8").as_int("") == 200);
    CHECK(f.at("i8").as_int("") == -100);
    CHECK(f.at("u16").as_int("") == 60000);
    CHECK(f.at("i16").as_int("") == -30000);
    CHECK(f.at("u32").as_int("") == 4000000000);
    CHECK(f.at("i32").as_int("") == -2000000000);
    CHECK(f.at("u64").as_int("") == (1ll << 50));
    CHECK(f.at("i64").as_int("") == -(1ll << 50));
    CHECK(f.at("f32").as_double("") == 1.5);
    CHECK(f.at("f64").as_double("") == 2.25);
    CHECK(f.at("bool").as_int("") == 1);
    CHECK(f.at("strings").as_strings("") == std::vector<std::string>{"a", "bc", ""});
    CHECK(f.at("floats").as_doubles("") == std::vector<double>{0.5, -1.0});
    CHECK(f.at("ints").as_ints("") == std::vector<std::int64_t>{1, 2, 3});
    CHECK_THROWS_AS(f.at("u8").as_string("u8"), Error);
    CHECK_THROWS_AS(f.at("absent"), FileError);
    REQUIRE(f.tensors().size() == 3);
    for (const auto& [name, x] : t) {
      auto y = f.load(name);
      CHECK((y.scalar_type() == x.scalar_type()));
      CHECK(torch::equal(y, x));
    }
  }
}

TEST_CASE("gguf: shapes are listed innermost first in the file") {
  TempDir dir;
  io::write_gguf(dir / "m.gguf", {}, {{"w", torch::arange(6, torch::kFloat).view({2, 3})}});
  auto bytes = read_bytes(dir / "m.gguf");
  io::GgufFile f(dir / "m.gguf");
  CHECK(f.tensors()[0].shape == std::vector<std::int64_t>{2, 3});
  // The file itself stores [3, 2].
  Bytes expect;
  expect.str("w").put<std::uint32_t>(2).put<std::uint64_t>(3).put<std::uint64_t>(2);
  CHECK(bytes.find(expect.s) != std::string::npos);
}

TEST_CASE("gguf: Q8_0 and Q4_0 tensors are dequantised") {
  TempDir dir;
  // Q8_0: one block of 32, scale 0.5, values -16..15.
  std::string q8;
  std::uint16_t half = c10::Half(0.5f).x;
  q8.append(reinterpret_cast<const char*>(&half), 2);
  for (int j = 0; j < 32; ++j) q8 += static_cast<char>(j - 16);
  write_bytes(dir / "q8.gguf", one_tensor_file(3, 8, 32, 1, q8));
  auto t = io::GgufFile(dir / "q8.gguf").load("t");
  REQUIRE(t.sizes() == c10::IntArrayRef({1, 32}));
  for (int j = 0; j < 32; ++j) CHECK(t[0][j].item<float>() == 0.5f * (j - 16));

  // Q4_0: one block, scale 2; byte j holds element j (low nibble) and element j + 16 (high).
  std::string q4;
  std::uint16_t two = c10::Half(2.0f).x;
  q4.append(reinterpret_cast<const char*>(&two), 2);
  for (int j = 0; j < 16; ++j) q4 += static_cast<char>((j & 0xF) | ((15 - j) << 4));
  write_bytes(dir / "q4.gguf", one_tensor_file(3, 2, 32, 1, q4));
  auto u = io::GgufFile(dir / "q4.gguf").load("t");
  for (int j = 0; j < 16; ++j) {
    CHECK(u[0][j].item<float>() == 2.0f * (j - 8));
    CHECK(u[0][j + 16].item<float>() == 2.0f * (15 - j - 8));
  }
}

TEST_CASE("gguf: Q8_0 written as llama.cpp's reference quantiser writes it") {
  TempDir dir;
  // One block by hand: values j - 16 have max |x| 16, so d = 16/127 and q = round(x * 127/16):
  // -16 -> -127, 1 -> round(7.9375) = 8, 15 -> round(119.0625) = 119.
  auto block = torch::arange(-16, 16, torch::kFloat).view({1, 32});
  const auto bytes = io::quantize_q8_0(block);
  REQUIRE(bytes.size() == 34);
  std::uint16_t dbits;
  std::memcpy(&dbits, bytes.data(), 2);
  CHECK(dbits == c10::Half(16.0f / 127.0f).x);
  CHECK(static_cast<std::int8_t>(bytes[2 + 0]) == -127);
  CHECK(static_cast<std::int8_t>(bytes[2 + 17]) == 8);
  CHECK(static_cast<std::int8_t>(bytes[2 + 31]) == 119);
  CHECK(static_cast<std::int8_t>(bytes[2 + 16]) == 0);

  // Written and read back: each value within half a step (d / 2) of the original, plus the f16
  // rounding of d (relative 2^-11) times |q| <= 127.
  torch::manual_seed(3);
  io::TensorMap t = {{"m", torch::randn({3, 64}) * 5}, {"v", torch::randn({7})}};
  t["m"][1].zero_();  // a block of zeros has d = 0
  io::write_gguf(dir / "q.gguf", {{"general.architecture", io::gguf_string("llama")}}, t, 32,
                 {"m"});
  io::GgufFile f(dir / "q.gguf");
  CHECK(f.find_tensor("m")->type == 8);
  CHECK(f.find_tensor("v")->type == 0);
  CHECK(torch::equal(f.load("v"), t["v"]));
  const auto back = f.load("m");
  const auto blocks = t["m"].view({-1, 32});
  const auto d = std::get<0>(blocks.abs().max(1, true)) / 127;
  const auto bound = d / 2 + 127 * d * std::ldexp(1.0, -11) + 1e-30;
  CHECK(((back.view({-1, 32}) - blocks).abs() <= bound).all().item<bool>());
  CHECK(torch::equal(back[1], t["m"][1]));
  CHECK_THROWS_WITH_AS(
      io::write_gguf(dir / "bad.gguf", {}, {{"w", torch::ones({2, 40})}}, 32, {"w"}),
      doctest::Contains("Q8_0 needs rows a multiple of 32 long, not 40"), FileError);
  CHECK_FALSE(std::filesystem::exists(dir / "bad.gguf"));
}

TEST_CASE("gguf: corrupted files give one clear error") {
  TempDir dir;
  io::write_gguf(dir / "good.gguf",
                 {{"general.architecture", io::gguf_string("llama")},
                  {"tokens", io::gguf_strings({"a", "b"})}},
                 {{"w", torch::randn({4, 8})}});
  const auto good = read_bytes(dir / "good.gguf");
  for (std::size_t len = 0; len < good.size(); ++len) {
    write_bytes(dir / "cut.gguf", good.substr(0, len));
    CHECK_THROWS_AS(io::GgufFile(dir / "cut.gguf").load_all(), FileError);
  }

  write_bytes(dir / "magic.gguf", "GGUX" + good.substr(4));
  check_error(dir / "magic.gguf", "bad magic");

  write_bytes(dir / "v1.gguf", one_tensor_file(1, 0, 4, 1, std::string(16, '\0')));
  check_error(dir / "v1.gguf", "version 1 is not supported");

  write_bytes(dir / "type.gguf", one_tensor_file(3, 99, 4, 1, std::string(16, '\0')));
  check_error(dir / "type.gguf", "unknown ggml type 99");

  write_bytes(dir / "unsupported.gguf", one_tensor_file(3, 12, 256, 1, std::string(144, '\0')));
  check_error(dir / "unsupported.gguf", "Q4_K tensors are not supported");

  write_bytes(dir / "block.gguf", one_tensor_file(3, 8, 30, 1, std::string(34, '\0')));
  check_error(dir / "block.gguf", "not a multiple of the Q8_0 block size");

  write_bytes(dir / "offset.gguf", one_tensor_file(3, 0, 4, 1, std::string(16, '\0'), 64));
  check_error(dir / "offset.gguf", "run past the end of the file");

  write_bytes(dir / "align.gguf", one_tensor_file(3, 0, 4, 1, std::string(64, '\0'), 3));
  check_error(dir / "align.gguf", "not aligned");

  write_bytes(dir / "huge.gguf",
              one_tensor_file(3, 0, 1ull << 39, 1ull << 39, std::string(16, '\0')));
  check_error(dir / "huge.gguf", "absurd dimension");

  Bytes counts;
  counts.s = "GGUF";
  counts.put<std::uint32_t>(3).put<std::uint64_t>(1ull << 60).put<std::uint64_t>(1ull << 60);
  write_bytes(dir / "counts.gguf", counts.s);
  check_error(dir / "counts.gguf", "absurd counts");

  Bytes array;
  array.s = "GGUF";
  array.put<std::uint32_t>(3).put<std::uint64_t>(0).put<std::uint64_t>(1);
  array.str("big").put<std::uint32_t>(9).put<std::uint32_t>(6).put<std::uint64_t>(1ull << 61);
  write_bytes(dir / "array.gguf", array.s);
  check_error(dir / "array.gguf", "cannot fit");

  Bytes rank;
  rank.s = "GGUF";
  rank.put<std::uint32_t>(3).put<std::uint64_t>(1).put<std::uint64_t>(0);
  rank.str("t").put<std::uint32_t>(9);
  rank.s += std::string(64, '\0');
  write_bytes(dir / "rank.gguf", rank.s);
  check_error(dir / "rank.gguf", "rank 9");
}
