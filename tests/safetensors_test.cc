// checkpoint/safetensors and checkpoint/hf_gpt2: round trips in every dtype, one clear error for
// each kind of malformed file, the HF GPT-2 name/layout mapping, and parity with an independent
// PyTorch GPT-2 (tests/safetensors_torch.py) that reads the exported file with json + numpy and
// writes one back the way HF checkpoints look (no prefix, tied lm_head, attention buffers).
#include "checkpoint/safetensors.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "checkpoint/hf_gpt2.h"
#include "model/dtype.h"
#include "model/gpt.h"
#include "tests/test_util.h"

namespace strata::checkpoint {
namespace {

using strata::testing::MakeTempDir;

std::string Le64(uint64_t n) {
  std::string s(8, '\0');
  for (int k = 0; k < 8; ++k) s[k] = static_cast<char>(n >> (8 * k));
  return s;
}

std::string FloatBytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

std::string WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// A file made of an explicit header length, header and data.
std::string WriteFile(const std::string& path, const std::string& header, const std::string& data) {
  return WriteRaw(path, Le64(header.size()) + header + data);
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::vector<float> RandomValues(size_t n, unsigned seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---------------------------------------------------------------------------------------------
// Format round trips

TEST(Safetensors, F32RoundTripKeepsOrderShapesValuesAndMetadata) {
  const std::string dir = MakeTempDir("f32");
  std::vector<NamedTensor> ts = {
      {"b.weight", {3, 5}, TensorDType::kF32, RandomValues(15, 1)},
      {"scalar", {}, TensorDType::kF32, {42.5f}},
      {"empty", {0, 7}, TensorDType::kF32, {}},
      {"a \"quoted\"\n\u00e9", {4}, TensorDType::kF32, {1.f, -0.f, INFINITY, -1e-40f}},
  };
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"note", "tab\there \"q\" \\ \u20ac"}, {"empty", ""}};
  const std::string path = dir + "/m.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, ts, meta).ok());

  // The data starts 8-byte aligned, as the reference writer pads it.
  const std::string raw = ReadAll(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);

  auto f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->metadata(), meta);
  ASSERT_EQ(f->tensors().size(), ts.size());
  uint64_t offset = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const SafetensorsEntry& e = f->tensors()[i];
    EXPECT_EQ(e.name, ts[i].name);  // written in the given order, read back in offset order
    EXPECT_EQ(e.shape, ts[i].shape);
    EXPECT_EQ(e.dtype, TensorDType::kF32);
    EXPECT_EQ(e.begin, offset);
    offset = e.end;
    EXPECT_EQ(f->Find(ts[i].name), &e);
    const std::vector<float> got = f->ToFloat(e);
    ASSERT_EQ(got.size(), ts[i].values.size());
    for (size_t k = 0; k < got.size(); ++k) EXPECT_EQ(Bits(got[k]), Bits(ts[i].values[k]));
  }
  EXPECT_EQ(f->Find("nope"), nullptr);
  EXPECT_EQ(offset + 8 + n, raw.size());
}

class SafetensorsHalf : public ::testing::TestWithParam<TensorDType> {};

// bf16/f16 are rounded to nearest even on write exactly like model/dtype.h, and read back
// exactly (also inf, NaN, subnormals and overflow).
TEST_P(SafetensorsHalf, RoundTripMatchesModelConversions) {
  const TensorDType dt = GetParam();
  const std::string dir = MakeTempDir(TensorDTypeName(dt));
  std::vector<float> v = RandomValues(5000, 7, 3.f);
  const float specials[] = {0.f,       -0.f,  1.f,     65504.f, 65519.f, 65520.f,    1e6f,
                            -1e6f,     1e-5f, 6e-8f,   3e-8f,   1e-10f,  1e-40f,     INFINITY,
                            -INFINITY, NAN,   3.4e38f, -2.5f,   0.1f,    1.00390625f};
  v.insert(v.end(), std::begin(specials), std::end(specials));
  std::mt19937 rng(11);
  for (int i = 0; i < 20000; ++i) v.push_back(std::bit_cast<float>(static_cast<uint32_t>(rng())));
  const std::string path = dir + "/h.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"x", {static_cast<int64_t>(v.size())}, dt, v}}).ok());

  auto f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const SafetensorsEntry* e = f->Find("x");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->dtype, dt);
  const auto bytes = f->Bytes(*e);
  ASSERT_EQ(bytes.size(), v.size() * 2);
  const std::vector<float> got = f->ToFloat(*e);
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t bits = static_cast<uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));
    const bool nan = std::isnan(v[i]);
    if (dt == TensorDType::kBF16) {
      if (!nan) {
        ASSERT_EQ(bits, model::FloatToBf16(v[i]).bits) << v[i];
      }
      const float want = model::ToFloat(model::bf16{bits});
      ASSERT_EQ(Bits(got[i]), Bits(want)) << i;
    } else {
      if (!nan) {
        ASSERT_EQ(bits, model::FloatToHalfBits(v[i])) << v[i];
      }
      const float want = model::HalfBitsToFloat(bits);
      ASSERT_EQ(Bits(got[i]), Bits(want)) << i;
    }
    if (nan) {
      ASSERT_TRUE(std::isnan(got[i]));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, SafetensorsHalf,
                         ::testing::Values(TensorDType::kBF16, TensorDType::kF16),
                         [](const auto& info) { return std::string(TensorDTypeName(info.param)); });

TEST(Safetensors, HeaderIsTheDocumentedJson) {
  const std::string dir = MakeTempDir("json");
  const std::string path = dir + "/j.safetensors";
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"w", {2}, TensorDType::kF32, {1, 2}},
                                {"v", {1, 3}, TensorDType::kBF16, {1, 2, 3}}},
                               {{"format", "pt"}})
                  .ok());
  const std::string raw = ReadAll(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  std::string header = raw.substr(8, n);
  while (!header.empty() && header.back() == ' ') header.pop_back();
  EXPECT_EQ(header,
            R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],)"
            R"("data_offsets":[0,8]},"v":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]}})");
}

TEST(Safetensors, WriterRejectsBadTensorsAndLeavesTheOldFile) {
  const std::string dir = MakeTempDir("writer");
  const std::string path = dir + "/w.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"old", {1}, TensorDType::kF32, {7}}}).ok());
  const std::string before = ReadAll(path);
  struct Case {
    std::vector<NamedTensor> ts;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {{{"a", {2}, TensorDType::kF32, {1, 2}}, {"a", {1}, TensorDType::kF32, {3}}},
       "tensor 'a': duplicate name"},
      {{{"", {1}, TensorDType::kF32, {1}}}, "empty name"},
      {{{"__metadata__", {1}, TensorDType::kF32, {1}}}, "reserved"},
      {{{"s", {2, 3}, TensorDType::kF32, {1, 2, 3}}}, "tensor 's': shape [2, 3] has 6 elements"},
      {{{"neg", {-1}, TensorDType::kF32, {}}}, "tensor 'neg': negative dimension"},
      {{{"bad\xff", {1}, TensorDType::kF32, {1}}}, "not valid UTF-8"},
  };
  for (const Case& c : cases) {
    Status st = WriteSafetensors(path, c.ts);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << c.needle;
    EXPECT_HAS(st.message(), c.needle);
    EXPECT_HAS(st.message(), path);
  }
  EXPECT_EQ(ReadAll(path), before);
  // Overwriting works and leaves no temporary file behind.
  ASSERT_TRUE(WriteSafetensors(path, {{"new", {2}, TensorDType::kF16, {1, 2}}}).ok());
  auto f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok());
  EXPECT_NE(f->Find("new"), nullptr);
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    ++files;
    EXPECT_EQ(entry.path().filename(), "w.safetensors");
  }
  EXPECT_EQ(files, 1);
  // A directory that does not exist: IO_ERROR.
  Status st = WriteSafetensors(dir + "/no/such/dir/x.safetensors", {});
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
}

// ---------------------------------------------------------------------------------------------
// Malformed files: each gives its own error, naming the file (and the tensor when there is one).

struct Malformed {
  const char* label;
  std::string header;
  std::string data;
  StatusCode code;
  const char* needle;
};

std::vector<Malformed> MalformedCases() {
  const std::string d16(16, '\0');
  using SC = StatusCode;
  const SC kInv = SC::kInvalidArgument;
  return {
      {"bad_json_trailing_comma", R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},})",
       d16, kInv, "malformed JSON header: expected a string key"},
      {"bad_json_unterminated", R"({"a":{"dtype":"F32)", d16, kInv, "unterminated string"},
      {"bad_json_garbage_after", R"({} x)", "", kInv, "unexpected characters after"},
      {"bad_json_single_quotes", R"({'a':1})", "", kInv, "malformed JSON header"},
      {"bad_json_control_char", "{\"a\n\":1}", "", kInv, "control character"},
      {"bad_json_lone_surrogate", R"({"\udc00":1})", "", kInv, "unpaired low surrogate"},
      {"not_utf8", "{\"\xc3\x28\":1}", "", kInv, "not valid UTF-8"},
      {"not_an_object", R"([1, 2])", "", kInv, "does not start with '{'"},
      {"deep_nesting", "{\"__metadata__\":" + std::string(100, '[') + std::string(100, ']') + "}",
       "", kInv, "nested deeper"},
      {"unknown_dtype", R"({"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", d16, kInv,
       "tensor 'a': unsupported dtype \"I64\""},
      {"dtype_not_string", R"({"a":{"dtype":4,"shape":[4],"data_offsets":[0,16]}})", d16, kInv,
       "tensor 'a': dtype is not a string"},
      {"shape_offset_mismatch", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", d16,
       kInv, "tensor 'a': shape [3] of F32 is 12 bytes but data_offsets [0, 16) span 16"},
      {"shape_negative", R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", d16, kInv,
       "tensor 'a': shape entry '-4' is not an integer"},
      {"shape_fraction", R"({"a":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}})", d16, kInv,
       "shape entry '4.0'"},
      {"shape_overflow",
       R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", d16, kInv,
       "tensor 'a': shape overflows"},
      {"shape_huge_bytes",
       R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]}})", d16, kInv,
       "tensor 'a': shape overflows"},
      {"overlapping",
       R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       d16, kInv, "data of tensors 'a' [0, 12) and 'b' [8, 16) overlap"},
      {"same_offsets",
       R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
       R"("b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
       d16, kInv, "overlap"},
      {"hole",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})",
       d16, kInv, "hole in the data: bytes [8, 12) before tensor 'b'"},
      {"reversed_offsets", R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", d16, kInv,
       "tensor 'a': data_offsets [16, 0) end before they begin"},
      {"offsets_not_pair", R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16,32]}})", d16,
       kInv, "data_offsets is not [begin, end]"},
      {"duplicate_names",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       d16, kInv, "duplicate tensor name \"a\""},
      {"missing_field", R"({"a":{"dtype":"F32","data_offsets":[0,16]}})", d16, kInv,
       "tensor 'a': missing field \"shape\""},
      {"unknown_field",
       R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"code":"rm -rf /"}})", d16, kInv,
       "tensor 'a': unknown field \"code\""},
      {"tensor_not_object", R"({"a":[1,2]})", "", kInv, "tensor 'a': is an array"},
      {"metadata_not_string", R"({"__metadata__":{"n_layer":12}})", "", kInv,
       "__metadata__ \"n_layer\" is a number, not a string"},
      {"trailing_bytes", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d16, kInv,
       "the data section has 16 bytes but the tensors cover only 8"},
      {"data_truncated", R"({"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})", d16,
       SC::kDataLoss, "tensor 'a': truncated: its data ends at byte 32"},
  };
}

TEST(Safetensors, EveryMalformedFileGivesItsClearError) {
  const std::string dir = MakeTempDir("malformed");
  for (const Malformed& c : MalformedCases()) {
    const std::string path = WriteFile(dir + "/" + c.label + ".safetensors", c.header, c.data);
    auto f = ReadSafetensors(path);
    ASSERT_FALSE(f.ok()) << c.label;
    EXPECT_EQ(f.status().code(), c.code) << c.label << ": " << f.status().ToString();
    EXPECT_HAS(f.status().message(), c.needle) << c.label;
    EXPECT_HAS(f.status().message(), path) << c.label;
  }
}

TEST(Safetensors, LengthFieldErrors) {
  const std::string dir = MakeTempDir("length");
  auto code_and_message = [](const std::string& path, const SafetensorsLimits& limits = {}) {
    auto f = ReadSafetensors(path, limits);
    EXPECT_FALSE(f.ok()) << path;
    return std::make_pair(f.status().code(), f.status().message());
  };
  // Missing file.
  auto [c0, m0] = code_and_message(dir + "/absent.safetensors");
  EXPECT_EQ(c0, StatusCode::kNotFound);
  EXPECT_HAS(m0, "absent.safetensors");
  // Shorter than the length field.
  auto [c1, m1] = code_and_message(WriteRaw(dir + "/short", std::string("\x05\x00\x00", 3)));
  EXPECT_EQ(c1, StatusCode::kDataLoss);
  EXPECT_HAS(m1, "truncated: 3 bytes, shorter than the 8-byte header length");
  // Header length larger than the file.
  auto [c2, m2] = code_and_message(WriteRaw(dir + "/long", Le64(1000) + "{}"));
  EXPECT_EQ(c2, StatusCode::kDataLoss);
  EXPECT_HAS(m2, "truncated: header length 1000 but the file has only 2 bytes");
  // Header length over the limit (default 100 MB; also a custom limit).
  auto [c3, m3] = code_and_message(WriteRaw(dir + "/huge", Le64(uint64_t{1} << 62) + "{}"));
  EXPECT_EQ(c3, StatusCode::kInvalidArgument);
  EXPECT_HAS(m3, "header length 4611686018427387904 exceeds the limit of 100000000 bytes");
  const std::string ok = dir + "/ok.safetensors";
  ASSERT_TRUE(WriteSafetensors(ok, {{"t", {100}, TensorDType::kF32, RandomValues(100, 3)}}).ok());
  SafetensorsLimits tight;
  tight.max_header_bytes = 16;
  auto [c4, m4] = code_and_message(ok, tight);
  EXPECT_EQ(c4, StatusCode::kInvalidArgument);
  EXPECT_HAS(m4, "exceeds the limit of 16 bytes");
  tight = {};
  tight.max_file_bytes = 64;
  auto [c5, m5] = code_and_message(ok, tight);
  EXPECT_EQ(c5, StatusCode::kInvalidArgument);
  EXPECT_HAS(m5, "exceeds the limit of 64");
  // An empty header is not JSON.
  auto [c6, m6] = code_and_message(WriteRaw(dir + "/empty_header", Le64(0)));
  EXPECT_EQ(c6, StatusCode::kInvalidArgument);
  // A directory.
  auto [c7, m7] = code_and_message(dir);
  EXPECT_NE(c7, StatusCode::kOk);
}

// Every truncation of a valid file fails cleanly, and random corruption never crashes (ASan/UBSan
// builds check the "cleanly").
TEST(Safetensors, TruncationsAndBitFlipsFailCleanly) {
  const std::string dir = MakeTempDir("fuzz");
  const std::string good = dir + "/good.safetensors";
  ASSERT_TRUE(WriteSafetensors(good,
                               {{"a", {3, 4}, TensorDType::kF32, RandomValues(12, 1)},
                                {"b", {5}, TensorDType::kBF16, RandomValues(5, 2)},
                                {"c", {2, 2}, TensorDType::kF16, RandomValues(4, 3)}},
                               {{"format", "pt"}})
                  .ok());
  const std::string raw = ReadAll(good);
  const std::string path = dir + "/bad.safetensors";
  for (size_t len = 0; len < raw.size(); ++len) {
    auto f = ReadSafetensors(WriteRaw(path, raw.substr(0, len)));
    ASSERT_FALSE(f.ok()) << "prefix of " << len << " bytes";
    EXPECT_TRUE(f.status().code() == StatusCode::kDataLoss ||
                f.status().code() == StatusCode::kInvalidArgument)
        << f.status().ToString();
  }
  std::mt19937 rng(5);
  int failures = 0;
  for (int i = 0; i < 2000; ++i) {
    std::string bad = raw;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) bad[rng() % bad.size()] ^= static_cast<char>(1 << (rng() % 8));
    auto f = ReadSafetensors(WriteRaw(path, bad));
    if (!f.ok()) {
      ++failures;
      continue;
    }
    // Accepted corruption can only be in the data or in padding/metadata text.
    for (const SafetensorsEntry& e : f->tensors()) EXPECT_EQ(f->ToFloat(e).size(), e.numel);
  }
  EXPECT_GT(failures, 100);
}

TEST(Safetensors, AcceptsReferenceWriterStyleHeaders) {
  // Whitespace, escapes and tensors listed out of offset order, as json.dumps writes them.
  const std::string dir = MakeTempDir("style");
  const std::string header =
      "{\"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]},\n"
      " \"__metadata__\": {\"k\\u00e9\\ud83d\\ude00\": \"v\\/\\n\"},\n"
      " \"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
      " \"z\": {\"dtype\": \"F16\", \"shape\": [0], \"data_offsets\": [12, 12]}}    ";
  const std::string path = WriteFile(dir + "/s.safetensors", header, FloatBytes({1.f, 2.f, 3.f}));
  auto f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_EQ(f->tensors().size(), 3u);
  EXPECT_EQ(f->tensors()[0].name, "a");
  EXPECT_EQ(f->tensors()[1].name, "b");
  EXPECT_EQ(f->tensors()[2].name, "z");
  EXPECT_EQ(f->ToFloat(*f->Find("b")), std::vector<float>{3.f});
  EXPECT_EQ(f->metadata().at("k\u00e9\U0001F600"), "v/\n");
}

// ---------------------------------------------------------------------------------------------
// HF GPT-2 mapping

Gpt2Config TinyConfig() {
  Gpt2Config c;
  c.layers = 2;
  c.heads = 2;
  c.channels = 8;
  c.vocab_size = 11;
  c.max_seq_len = 6;
  return c;
}

TensorMap RandomStrataTensors(const Gpt2Config& c, unsigned seed) {
  TensorMap m;
  for (const auto& [name, shape] : Gpt2TensorShapes(c)) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    m[name] = RandomValues(static_cast<size_t>(n), seed++);
  }
  return m;
}

TEST(HfGpt2, ExportNamesShapesAndConv1DTranspose) {
  const Gpt2Config c = TinyConfig();
  const TensorMap strata = RandomStrataTensors(c, 1);
  auto hf = ToHfGpt2(c, strata);
  ASSERT_TRUE(hf.ok()) << hf.status().ToString();
  ASSERT_EQ(hf->size(), 2u + 12u * 2 + 2u);
  EXPECT_EQ((*hf)[0].name, "transformer.wte.weight");
  EXPECT_EQ((*hf)[0].shape, (std::vector<int64_t>{11, 8}));
  EXPECT_EQ((*hf)[0].values, strata.at("wte.weight"));
  EXPECT_EQ((*hf)[1].name, "transformer.wpe.weight");
  EXPECT_EQ((*hf).back().name, "transformer.ln_f.bias");
  std::map<std::string, const NamedTensor*> by_name;
  for (const NamedTensor& t : *hf) by_name[t.name] = &t;
  const NamedTensor* qkv = by_name.at("transformer.h.1.attn.c_attn.weight");
  EXPECT_EQ(qkv->shape, (std::vector<int64_t>{8, 24}));               // Conv1D [in, out]
  const std::vector<float>& w = strata.at("h.1.attn.c_attn.weight");  // [24, 8]
  for (int o = 0; o < 24; ++o) {
    for (int i = 0; i < 8; ++i) ASSERT_EQ(qkv->values[i * 24 + o], w[o * 8 + i]);
  }
  EXPECT_EQ(by_name.at("transformer.h.0.mlp.c_fc.weight")->shape, (std::vector<int64_t>{8, 32}));
  EXPECT_EQ(by_name.at("transformer.h.0.mlp.c_proj.weight")->shape, (std::vector<int64_t>{32, 8}));
  EXPECT_EQ(by_name.at("transformer.h.0.attn.c_attn.bias")->shape, (std::vector<int64_t>{24}));
  EXPECT_EQ(by_name.count("lm_head.weight"), 0u);
  const auto meta = HfGpt2Metadata(c);
  EXPECT_EQ(meta.at("format"), "pt");
  EXPECT_EQ(meta.at("n_layer"), "2");
  EXPECT_EQ(meta.at("n_head"), "2");
  EXPECT_EQ(meta.at("n_embd"), "8");
  EXPECT_EQ(meta.at("vocab_size"), "11");
  EXPECT_EQ(meta.at("n_positions"), "6");
}

TEST(HfGpt2, RoundTripIsExactInF32AndRoundsInBf16) {
  const Gpt2Config c = TinyConfig();
  const TensorMap strata = RandomStrataTensors(c, 2);
  const std::string dir = MakeTempDir("hf");
  for (TensorDType dt : {TensorDType::kF32, TensorDType::kBF16, TensorDType::kF16}) {
    const std::string path = dir + "/" + TensorDTypeName(dt) + ".safetensors";
    ASSERT_TRUE(WriteHfGpt2(path, c, strata, dt).ok());
    auto f = ReadSafetensors(path);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ(f->metadata(), HfGpt2Metadata(c));
    auto back = FromHfGpt2(*f, c);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    ASSERT_EQ(back->size(), strata.size());
    for (const auto& [name, v] : strata) {
      const std::vector<float>& got = back->at(name);
      ASSERT_EQ(got.size(), v.size()) << name;
      for (size_t i = 0; i < v.size(); ++i) {
        float want = v[i];
        if (dt == TensorDType::kBF16) want = model::ToFloat(model::FloatToBf16(v[i]));
        if (dt == TensorDType::kF16) want = model::HalfBitsToFloat(model::FloatToHalfBits(v[i]));
        ASSERT_EQ(Bits(got[i]), Bits(want)) << name << "[" << i << "]";
      }
    }
  }
}

TEST(HfGpt2, ExportRejectsMissingWrongAndUnknownTensors) {
  const Gpt2Config c = TinyConfig();
  TensorMap m = RandomStrataTensors(c, 3);
  m.erase("h.1.ln_2.bias");
  auto r = ToHfGpt2(c, m);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(r.status().message(), "missing tensor 'h.1.ln_2.bias'");
  m = RandomStrataTensors(c, 3);
  m["h.0.mlp.c_fc.weight"].pop_back();
  r = ToHfGpt2(c, m);
  EXPECT_HAS(r.status().message(),
             "tensor 'h.0.mlp.c_fc.weight' has 255 values, expected shape [32, 8] (256)");
  m = RandomStrataTensors(c, 3);
  m["h.2.ln_1.weight"] = std::vector<float>(8);
  r = ToHfGpt2(c, m);
  EXPECT_HAS(r.status().message(), "tensor 'h.2.ln_1.weight' is not a parameter");
  Gpt2Config bad = c;
  bad.heads = 3;
  EXPECT_HAS(ToHfGpt2(bad, RandomStrataTensors(c, 3)).status().message(),
             "heads 3 does not divide channels 8");
}

// Writes `tensors` (already in HF names and layout) with the reader's default ordering.
Result<SafetensorsFile> WriteAndRead(const std::string& path, std::vector<NamedTensor> tensors) {
  RETURN_IF_ERROR(WriteSafetensors(path, tensors));
  return ReadSafetensors(path);
}

TEST(HfGpt2, ImportAcceptsHfVariantsAndRejectsMismatches) {
  const Gpt2Config c = TinyConfig();
  const TensorMap strata = RandomStrataTensors(c, 4);
  auto hf_or = ToHfGpt2(c, strata);
  ASSERT_TRUE(hf_or.ok());
  const std::vector<NamedTensor> hf = *hf_or;
  const std::string dir = MakeTempDir("import");
  const auto path = [&](const char* name) { return dir + "/" + name + ".safetensors"; };

  auto expect_ok = [&](const char* label, std::vector<NamedTensor> ts) {
    auto f = WriteAndRead(path(label), std::move(ts));
    ASSERT_TRUE(f.ok()) << label << ": " << f.status().ToString();
    auto m = FromHfGpt2(*f, c);
    ASSERT_TRUE(m.ok()) << label << ": " << m.status().ToString();
    EXPECT_EQ(*m, strata) << label;
  };
  auto expect_error = [&](const char* label, std::vector<NamedTensor> ts, const Gpt2Config& want,
                          const std::string& needle) {
    auto f = WriteAndRead(path(label), std::move(ts));
    ASSERT_TRUE(f.ok()) << label << ": " << f.status().ToString();
    auto m = FromHfGpt2(*f, want);
    ASSERT_FALSE(m.ok()) << label;
    EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument) << label;
    EXPECT_HAS(m.status().message(), needle) << label;
    EXPECT_HAS(m.status().message(), path(label)) << label;
  };

  // Without the "transformer." prefix, in another order, with HF's attention buffers and a tied
  // lm_head: the same tensors.
  std::vector<NamedTensor> bare = hf;
  for (NamedTensor& t : bare) t.name = t.name.substr(std::strlen("transformer."));
  std::reverse(bare.begin(), bare.end());
  for (int l = 0; l < c.layers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".attn.";
    bare.push_back({h + "bias", {1, 1, 6, 6}, TensorDType::kF32, std::vector<float>(36, 1.f)});
    bare.push_back({h + "masked_bias", {}, TensorDType::kF32, {-1e4f}});
  }
  bare.push_back({"lm_head.weight", {11, 8}, TensorDType::kF32, strata.at("wte.weight")});
  expect_ok("bare", bare);
  expect_ok("prefixed", hf);

  // A tensor of the wrong shape (here a Linear [out, in] weight where Conv1D [in, out] is due).
  std::vector<NamedTensor> ts = hf;
  for (NamedTensor& t : ts) {
    if (t.name == "transformer.h.1.mlp.c_proj.weight") t.shape = {8, 32};
  }
  expect_error("transposed", ts, c,
               "tensor 'transformer.h.1.mlp.c_proj.weight': expected shape [32, 8], found "
               "[8, 32] (an [out, in] Linear layout?");
  ts = hf;
  ts[0] = {"transformer.wte.weight", {12, 8}, TensorDType::kF32, std::vector<float>(96)};
  expect_error("vocab", ts, c,
               "tensor 'transformer.wte.weight': expected shape [11, 8], found [12, 8]");
  // Missing and unknown tensors; a file of another depth.
  ts = hf;
  ts.erase(ts.begin() + 5);
  expect_error("missing", ts, c, "missing tensor 'transformer.h.0.attn.c_attn.bias'");
  ts = hf;
  ts.push_back({"transformer.h.0.attn.rotary", {2}, TensorDType::kF32, {1, 2}});
  expect_error("unknown", ts, c, "unknown tensor 'transformer.h.0.attn.rotary'");
  Gpt2Config deeper = c;
  deeper.layers = 3;
  expect_error("deeper", hf, deeper, "missing tensor 'transformer.h.2.ln_1.weight' (and 11 more)");
  Gpt2Config shallower = c;
  shallower.layers = 1;
  expect_error("shallower", hf, shallower,
               "unknown tensor 'transformer.h.1.ln_1.weight': not a parameter of a GPT-2 with "
               "n_layer 1");
  ts = hf;
  ts.push_back({"h.2.attn.bias", {1}, TensorDType::kF32, {1}});  // buffer of a layer not there
  expect_error("buffer_beyond", ts, c, "unknown tensor 'h.2.attn.bias'");
  // The same tensor twice, with and without the prefix.
  ts = hf;
  ts.push_back(hf[3]);
  ts.back().name = hf[3].name.substr(std::strlen("transformer."));
  expect_error("twice", ts, c, "appears twice");
  // An untied or misshapen LM head.
  ts = hf;
  std::vector<float> head = strata.at("wte.weight");
  head[3] += 1.f;
  ts.push_back({"lm_head.weight", {11, 8}, TensorDType::kF32, head});
  expect_error("untied", ts, c, "'lm_head.weight' differs from wte.weight");
  ts = hf;
  ts.push_back({"lm_head.weight", {8, 11}, TensorDType::kF32, strata.at("wte.weight")});
  expect_error("head_shape", ts, c, "'lm_head.weight': expected shape [11, 8] (tied to wte)");
}

// ---------------------------------------------------------------------------------------------
// Parity with PyTorch

constexpr const char* kPython = "/usr/bin/python3";

model::GptConfig ParityConfig() {
  model::GptConfig c;
  c.vocab_size = 50;
  c.max_seq_len = 16;
  c.layers = 2;
  c.heads = 2;
  c.channels = 16;
  return c;
}

Gpt2Config ToGpt2Config(const model::GptConfig& m) {
  Gpt2Config c;
  c.layers = m.layers;
  c.heads = m.heads;
  c.channels = m.channels;
  c.vocab_size = m.vocab_size;
  c.max_seq_len = m.max_seq_len;
  return c;
}

// The model's global tensors (tp = 1: every local tensor is its global tensor).
TensorMap ModelTensors(const model::Gpt& m) {
  TensorMap out;
  for (const model::ParamTensor& p : m.tensors()) {
    EXPECT_EQ(p.shape, p.global_shape) << p.name;
    out[p.name].assign(m.params() + p.offset, m.params() + p.offset + p.numel);
  }
  return out;
}

// Copies global tensors into the model (tp = 1); fails the test on a missing/misshapen tensor.
void LoadModelTensors(const TensorMap& tensors, model::Gpt* m) {
  ASSERT_EQ(tensors.size(), m->tensors().size());
  for (const model::ParamTensor& p : m->tensors()) {
    auto it = tensors.find(p.name);
    ASSERT_NE(it, tensors.end()) << p.name;
    ASSERT_EQ(static_cast<int64_t>(it->second.size()), p.numel) << p.name;
    std::copy(it->second.begin(), it->second.end(), m->params() + p.offset);
  }
  m->RefreshComputeWeights();
}

std::unique_ptr<model::Gpt> MakeModel(const model::GptConfig& c, int b, int t) {
  auto m = model::Gpt::Create(c, model::DType::kF32, b, t);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(m).value() : nullptr;
}

TEST(HfGpt2, ExportMatchesPyTorchGpt2AndImportIsBitExact) {
  const std::string probe = std::string(kPython) + " -c 'import torch, numpy' >/dev/null 2>&1";
  if (std::system(probe.c_str()) != 0) {
    GTEST_SKIP() << kPython << " cannot import torch and numpy (scripts/install_deps.sh installs "
                 << "python3-torch python3-numpy); PyTorch parity not checked";
  }
  const model::GptConfig cfg = ParityConfig();
  const int b = 3, t = 12;  // t < max_seq_len: rows of wpe beyond t stay unused, still exported
  auto m = MakeModel(cfg, b, t);
  ASSERT_NE(m, nullptr);
  m->InitWeights(17);
  // GPT-2 init has zero biases, unit LayerNorm weights and near-uniform logits; perturb every
  // parameter so that a swapped or mis-transposed tensor changes the loss.
  std::mt19937 rng(23);
  std::normal_distribution<float> noise(0.f, 0.2f);
  for (int64_t i = 0; i < m->num_params(); ++i) m->params()[i] += noise(rng);
  m->RefreshComputeWeights();

  const auto batch = strata::testing::RandomTokenBatches(1, cfg.vocab_size, b, t, 29)[0];
  auto loss = m->Forward(batch.x.data(), batch.y.data(), b, t, 0.f);
  ASSERT_TRUE(loss.ok()) << loss.status().ToString();

  const std::string dir = MakeTempDir("torch");
  const std::string exported = dir + "/strata.safetensors";
  const TensorMap tensors = ModelTensors(*m);
  ASSERT_TRUE(WriteHfGpt2(exported, ToGpt2Config(cfg), tensors).ok());
  {
    std::ofstream f(dir + "/batch.bin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(batch.x.data()),
            static_cast<std::streamsize>(batch.x.size() * sizeof(int32_t)));
    f.write(reinterpret_cast<const char*>(batch.y.data()),
            static_cast<std::streamsize>(batch.y.size() * sizeof(int32_t)));
  }
  const std::string cmd = std::string(kPython) + " " + STRATA_SOURCE_DIR +
                          "/tests/safetensors_torch.py " + exported + " " + dir + "/batch.bin " +
                          std::to_string(b) + " " + std::to_string(t) + " " + dir + " > " + dir +
                          "/torch.log 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd << "\n" << ReadAll(dir + "/torch.log");
  double torch_loss = 0;
  std::ifstream(dir + "/torch_loss.txt") >> torch_loss;
  const double rel = std::fabs(*loss - torch_loss) / std::fabs(torch_loss);
  std::printf("loss: strata %.7f, torch (float64, HF names and Conv1D layout) %.7f, rel %.2g\n",
              *loss, torch_loss, rel);
  EXPECT_LE(rel, 1e-4);
  EXPECT_GT(torch_loss, 0.0);

  // Import: Strata's own export, and the file PyTorch wrote the way HF checkpoints look (no
  // prefix, lm_head.weight, attention buffers, json.dumps spacing), both give the parameters
  // back bit for bit, and the same loss.
  for (const std::string& file : {exported, dir + "/torch_export.safetensors"}) {
    auto f = ReadSafetensors(file);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    auto back = FromHfGpt2(*f, ToGpt2Config(cfg));
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    auto m2 = MakeModel(cfg, b, t);
    ASSERT_NE(m2, nullptr);
    LoadModelTensors(*back, m2.get());
    ASSERT_EQ(m2->num_params(), m->num_params());
    EXPECT_EQ(std::memcmp(m2->params(), m->params(), m->num_params() * sizeof(float)), 0) << file;
    auto loss2 = m2->Forward(batch.x.data(), batch.y.data(), b, t, 0.f);
    ASSERT_TRUE(loss2.ok());
    EXPECT_EQ(*loss2, *loss) << file;
  }
}

}  // namespace
}  // namespace strata::checkpoint
