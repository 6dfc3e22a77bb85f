#include "common/safetensors.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::common {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr char kFixture[] = "common/testdata/python_writer.safetensors";
const std::map<std::string, std::string> kMetadata = {
    {"note", "quote \" backslash \\ newline \n tab \t e-acute \xc3\xa9 check \xe2\x9c\x93"}};

at::Tensor Doubles(std::vector<double> v, at::ScalarType type) {
  return at::tensor(v, at::kDouble).to(type);
}

// The tensors of tests/oracles/make_safetensors_fixture.py, built here independently. Every
// value is exact in its dtype, or a literal that C++ and Python round to the same float.
std::map<std::string, at::Tensor> ExpectedTensors() {
  const float inf = std::numeric_limits<float>::infinity();
  const double dinf = std::numeric_limits<double>::infinity();
  std::map<std::string, at::Tensor> t;
  t["f32"] = at::tensor(std::vector<float>{0.1f, -2.5f, 3.0e38f, 1e-45f, -0.0f, 1.0f / 3.0f, inf,
                                           -inf, std::numeric_limits<float>::quiet_NaN()})
                 .reshape({3, 3});
  t["f64"] = at::tensor(std::vector<double>{1.0 / 3.0, -1e300, 5e-324, dinf});
  t["f16"] = Doubles({0.5, -65504.0, std::ldexp(1.0, -24), dinf, -0.0, 1 + std::ldexp(1.0, -10)},
                     at::kHalf);
  t["bf16"] = Doubles({1 + std::ldexp(1.0, -7), -(2 - std::ldexp(1.0, -7)) * std::ldexp(1.0, 127),
                       std::ldexp(1.0, -133), 0.5},
                      at::kBFloat16)
                  .reshape({2, 2});
  t["i8"] = at::tensor(std::vector<int64_t>{-128, 127, 0, -1}).to(at::kChar);
  t["u8"] = at::tensor(std::vector<int64_t>{0, 255, 128, 7}).to(at::kByte);
  t["i16"] = at::tensor(std::vector<int64_t>{-32768, 32767, 1234}).to(at::kShort);
  t["i32"] = (at::arange(8, at::kInt).reshape({2, 2, 2}) - 3).to(at::kInt);
  t["i32_limits"] = at::tensor(std::vector<int32_t>{std::numeric_limits<int32_t>::min(),
                                                    std::numeric_limits<int32_t>::max()});
  t["i64"] = at::tensor(std::vector<int64_t>{std::numeric_limits<int64_t>::min(),
                                             std::numeric_limits<int64_t>::max(),
                                             (int64_t{1} << 40) + 3});
  t["bool"] = at::tensor(std::vector<int64_t>{1, 0, 1, 0, 0, 1}).to(at::kBool).reshape({2, 3});
  t["scalar"] = at::scalar_tensor(2.5, at::kFloat);
  t["empty"] = at::zeros({0, 4}, at::kFloat);
  return t;
}

std::string RawBytes(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

// Same names, and per tensor the same dtype, shape and bytes (so -0.0 and NaN count).
void ExpectSameTensors(const std::map<std::string, at::Tensor>& got,
                       const std::map<std::string, at::Tensor>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, w] : want) {
    auto it = got.find(name);
    ASSERT_NE(it, got.end()) << name;
    const at::Tensor& g = it->second;
    EXPECT_EQ(g.scalar_type(), w.scalar_type()) << name;
    EXPECT_EQ(g.sizes(), w.sizes()) << name;
    EXPECT_EQ(RawBytes(g), RawBytes(w)) << name << ": got " << g << " want " << w;
  }
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir ? dir : "/tmp", "/", name);
}

// A file: the 8-byte length, `header`, then `data`.
std::string File(const std::string& header, const std::string& data = "") {
  const uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + data;
}

std::string ParseError(const std::string& bytes) {
  absl::StatusOr<Safetensors> st = ParseSafetensors(bytes);
  return st.ok() ? "OK" : std::string(st.status().message());
}

TEST(SafetensorsTest, ReadsTheReferenceWritersFileExactly) {
  absl::StatusOr<Safetensors> st = ReadSafetensors(kFixture);
  ASSERT_TRUE(st.ok()) << st.status();
  ExpectSameTensors(st->tensors, ExpectedTensors());
  EXPECT_EQ(st->metadata, kMetadata);
}

TEST(SafetensorsTest, WritesTheReferenceWritersBytes) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors({ExpectedTensors(), kMetadata});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const std::string want = ReadBytes(kFixture);
  ASSERT_FALSE(want.empty());
  EXPECT_EQ(*bytes, want);
}

TEST(SafetensorsTest, RoundTripsEveryDtypeThroughAFile) {
  std::map<std::string, at::Tensor> tensors = ExpectedTensors();
  // A strided view and a tensor that requires grad are written as their values.
  tensors["f64_transposed"] = at::arange(6, at::kDouble).reshape({2, 3}).t();
  tensors["f32_grad"] = at::ones({2}, at::kFloat).requires_grad_(true);
  for (const char* name : {"BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64"}) {
    int found = 0;
    for (const auto& [n, t] : tensors) found += SafetensorsDtypeName(t.scalar_type()) == name;
    EXPECT_GT(found, 0) << "no tensor of dtype " << name;
  }
  const std::map<std::string, std::string> metadata = {
      {"", "empty key"}, {"ctrl", std::string("\x01\x1f\x7f", 3)}, {"quote\"", "\\/"},
      {"emoji \xf0\x9f\x98\x80", ""}};
  const std::string path = TempPath("round_trip.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {tensors, metadata}).ok());
  absl::StatusOr<Safetensors> st = ReadSafetensors(path);
  ASSERT_TRUE(st.ok()) << st.status();
  tensors["f64_transposed"] = tensors["f64_transposed"].contiguous();
  tensors["f32_grad"] = tensors["f32_grad"].detach();
  ExpectSameTensors(st->tensors, tensors);
  EXPECT_EQ(st->metadata, metadata);
  EXPECT_TRUE(st->tensors.at("f32").is_contiguous());

  // For the by-hand check that Python reads our bytes (see make_safetensors_fixture.py).
  if (const char* out = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR")) {
    EXPECT_TRUE(WriteSafetensors(absl::StrCat(out, "/writer_sample.safetensors"),
                                 {ExpectedTensors(), kMetadata})
                    .ok());
  }
}

TEST(SafetensorsTest, HeaderIsPaddedSoEveryTensorIsAligned) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors(
      {{{"a", at::ones({3}, at::kBool)}, {"b", at::ones({1}, at::kDouble)}, {"c", at::ones({1}, at::kHalf)}}, {}});
  ASSERT_TRUE(bytes.ok());
  uint64_t header_size;
  std::memcpy(&header_size, bytes->data(), 8);
  EXPECT_EQ(header_size % 8, 0u);
  const std::string header = bytes->substr(8, header_size);
  // F64 first, then F16, then BOOL; no metadata object when there is no metadata.
  EXPECT_EQ(header.substr(0, header.find_last_not_of(' ') + 1),
            "{\"b\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]},"
            "\"c\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[8,10]},"
            "\"a\":{\"dtype\":\"BOOL\",\"shape\":[3],\"data_offsets\":[10,13]}}");
  EXPECT_EQ(bytes->size(), 8 + header_size + 13);
}

TEST(SafetensorsTest, AcceptsAnyValidJsonLayout) {
  // Whitespace everywhere, fields in another order, every escape, a surrogate pair.
  const std::string header =
      " {\t\"__metadata__\" : { \"k\\u00e9\\ud83d\\ude00\\/\\b\" : \"\\\"\\\\\\f\\n\\r\\t\" } ,\n"
      "\"x\" : { \"shape\" : [ 2 ] , \"data_offsets\" : [ 0 , 8 ] , \"dtype\" : \"F32\" } }\r\n";
  EXPECT_EQ(ParseError(File(header, std::string(8, '\0'))),
            "header does not start with '{' (not a safetensors file?)");
  absl::StatusOr<Safetensors> st = ParseSafetensors(File(header.substr(1), std::string(8, '\0')));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->tensors.at("x").sizes(), at::IntArrayRef({2}));
  EXPECT_EQ(st->metadata.at("k\xc3\xa9\xf0\x9f\x98\x80/\b"), "\"\\\f\n\r\t");
  // No tensors at all is a valid (empty) file.
  st = ParseSafetensors(File("{}      "));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(st->tensors.empty());
}

struct Corruption {
  const char* what;
  std::string bytes;
  std::string message;  // a fragment of the error
};

std::vector<Corruption> Corruptions() {
  const std::string f32x2 = R"("dtype":"F32","shape":[2])";
  const std::string ok_entry = "{" + f32x2 + R"(,"data_offsets":[0,8]})";
  std::string huge_length(8, '\xff');
  std::string length_4096 = File("{}") ;
  length_4096[0] = 0, length_4096[1] = 0x10;  // 4096
  return {
      {"empty file", "", "file is 0 bytes, shorter than the 8-byte header length"},
      {"short file", "abcde", "file is 5 bytes, shorter than the 8-byte header length"},
      {"header length past the end", length_4096, "header length 4096 is larger than the 2 bytes after it"},
      {"absurd header length", huge_length + "{}", "header length 18446744073709551615 is over the 100000000-byte limit"},
      {"top level not an object", File("[]"), "header does not start with '{'"},
      {"empty header", File(""), "header does not start with '{'"},
      {"missing value", File(R"({"a":})"), "header is not valid JSON: unexpected character '}' at byte 5 of 6"},
      {"truncated JSON", File(R"({"a":{"dtype":"F32")"), "text ends inside an object at byte 19 of 19"},
      {"truncated string", File(R"({"a)"), "text ends inside a string"},
      {"trailing text", File("{} x"), "unexpected text after the top-level value at byte 3"},
      {"missing colon", File(R"({"a" 1})"), "expected ':' after a key"},
      {"trailing comma", File(R"({"a":1,})"), "expected a string key"},
      {"missing comma", File(R"({"a":[1 2]})"), "expected ',' or ']' in an array"},
      {"unquoted key", File("{a:1}"), "expected a string key at byte 1"},
      {"bad escape", File(R"({"a\q":1})"), "invalid escape '\\q' at byte 3"},
      {"raw newline", File("{\"a\nb\":1}"), "unescaped control character in a string"},
      {"short \\u", File(R"({"\u12":1})"), "\\u must be followed by 4 hex digits"},
      {"lone high surrogate", File(R"({"\ud800":1})"), "high surrogate without its low half"},
      {"lone low surrogate", File(R"({"\udc00":1})"), "lone low surrogate"},
      {"invalid UTF-8", File("{\"\xff\":1}"), "invalid UTF-8 in a string"},
      {"overlong UTF-8", File("{\"\xc0\xaf\":1}"), "invalid UTF-8 in a string"},
      {"UTF-8 surrogate", File("{\"\xed\xa0\x80\":1}"), "invalid UTF-8 in a string"},
      {"literal", File(R"({"a":true})"), "true, false or null"},
      {"negative", File(R"({"a":-1})"), "negative number"},
      {"fraction", File(R"({"a":1.5})"), "number that is not an integer"},
      {"exponent", File(R"({"a":1e3})"), "number that is not an integer"},
      {"leading zero", File(R"({"a":01})"), "integer with a leading zero"},
      {"integer overflow", File(R"({"a":18446744073709551616})"), "integer does not fit in 64 bits"},
      {"deep nesting", File(R"({"a":)" + std::string(100000, '[')), "nested deeper than 16"},
      {"duplicate tensor", File(R"({"a":)" + ok_entry + R"(,"a":)" + ok_entry + "}", std::string(8, '\0')),
       "duplicate key \"a\""},
      {"duplicate field", File(R"({"a":{"dtype":"F32","dtype":"F32"}})"), "duplicate key \"dtype\""},
      {"entry not an object", File(R"({"a":5})"), "tensor \"a\": expected an object, got an integer"},
      {"missing dtype", File(R"({"a":{"shape":[],"data_offsets":[0,4]}})", "abcd"), "tensor \"a\": missing \"dtype\""},
      {"missing shape", File(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", "abcd"), "tensor \"a\": missing \"shape\""},
      {"missing offsets", File(R"({"a":{"dtype":"F32","shape":[]}})", "abcd"), "tensor \"a\": missing \"data_offsets\""},
      {"unknown field", File(R"({"a":{)" + f32x2 + R"(,"offsets":[0,8]}})"), "tensor \"a\": unknown field \"offsets\""},
      {"dtype not a string", File(R"({"a":{"dtype":4,"shape":[],"data_offsets":[0,4]}})"), "dtype must be a string, got an integer"},
      {"unknown dtype", File(R"({"a":{"dtype":"F7","shape":[],"data_offsets":[0,4]}})"), "dtype \"F7\" is not supported (supported: I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL)"},
      {"dtype LibTorch 1.13 lacks", File(R"({"a":{"dtype":"U16","shape":[],"data_offsets":[0,2]}})"), "dtype \"U16\" is not supported"},
      {"lowercase dtype", File(R"({"a":{"dtype":"f32","shape":[],"data_offsets":[0,4]}})"), "dtype \"f32\" is not supported"},
      {"shape not an array", File(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})"), "shape must be an array, got an integer"},
      {"shape entry a string", File(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})"), "shape entries must be integers, got a string"},
      {"shape overflows", File(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"), "shape [4294967296, 4294967296] has more bytes than 2^64"},
      {"shape entry too large", File(R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})"), "shape entry 9223372036854775808 is too large"},
      {"three offsets", File(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,4,8]}})"), "data_offsets must be an array of two integers [begin, end]"},
      {"offsets not integers", File(R"({"a":{)" + f32x2 + R"(,"data_offsets":["0","8"]}})"), "data_offsets must be an array of two integers"},
      {"offsets reversed", File(R"({"a":{)" + f32x2 + R"(,"data_offsets":[8,0]}})", std::string(8, '\0')), "tensor \"a\": data_offsets [8, 0] end before they begin"},
      {"wrong byte count", File(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,4]}})", std::string(4, '\0')), "tensor \"a\": data_offsets [0, 4] hold 4 bytes, but F32 [2] needs 8"},
      {"offsets past the data", File(R"({"a":)" + ok_entry + "}", std::string(4, '\0')), "tensor \"a\": data_offsets [0, 8] run past the end of the 4 data bytes"},
      {"overlapping tensors", File(R"({"a":)" + ok_entry + R"(,"b":{)" + f32x2 + R"(,"data_offsets":[4,12]}})", std::string(12, '\0')),
       "tensors \"a\" [0, 8] and \"b\" [4, 12] overlap"},
      {"same range twice", File(R"({"a":)" + ok_entry + R"(,"b":)" + ok_entry + "}", std::string(8, '\0')),
       "tensors \"a\" [0, 8] and \"b\" [0, 8] overlap"},
      {"gap between tensors", File(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{)" + f32x2 + R"(,"data_offsets":[8,16]}})", std::string(16, '\0')),
       "data bytes [4, 8) belong to no tensor (before tensor \"b\")"},
      {"gap at the start", File(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0')), "data bytes [0, 4) belong to no tensor"},
      {"bytes after the last tensor", File(R"({"a":)" + ok_entry + "}", std::string(12, '\0')), "data is 12 bytes but the tensors cover only the first 8"},
      {"metadata not an object", File(R"({"__metadata__":[]})"), "__metadata__ must be an object, got an array"},
      {"metadata value not a string", File(R"({"__metadata__":{"k":1}})"), "__metadata__ \"k\": values must be strings, got an integer"},
      {"BOOL byte not 0 or 1", File(R"({"a":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", std::string("\x01\x02\x00", 3)),
       "tensor \"a\": BOOL element 1 is byte 2, not 0 or 1"},
  };
}

TEST(SafetensorsTest, EveryCorruptionGivesAClearError) {
  for (const Corruption& c : Corruptions()) {
    EXPECT_THAT(ParseError(c.bytes), HasSubstr(c.message)) << c.what;
  }
}

TEST(SafetensorsTest, EveryTruncationFails) {
  const std::string bytes = ReadBytes(kFixture);
  ASSERT_GT(bytes.size(), 100u);
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_NE(ParseError(bytes.substr(0, n)), "OK") << "truncated to " << n << " bytes";
  }
}

// Single-byte corruptions of the header: each either fails with a message or yields tensors
// that still tile the data exactly.
TEST(SafetensorsTest, HeaderByteCorruptionsFailCleanlyOrStayConsistent) {
  const std::string bytes = ReadBytes(kFixture);
  uint64_t header_size;
  std::memcpy(&header_size, bytes.data(), 8);
  const uint64_t data_size = bytes.size() - 8 - header_size;
  int failed = 0, parsed = 0;
  for (size_t i = 0; i < 8 + header_size; ++i) {
    for (char v : {'\0', '"', '{', '}', '[', ']', ',', ':', '9', '\\', 'x', '\xff'}) {
      if (bytes[i] == v) continue;
      std::string corrupt = bytes;
      corrupt[i] = v;
      absl::StatusOr<Safetensors> st = ParseSafetensors(corrupt);
      if (!st.ok()) {
        EXPECT_FALSE(st.status().message().empty());
        ++failed;
        continue;
      }
      ++parsed;
      uint64_t total = 0;
      for (const auto& [name, t] : st->tensors) total += t.numel() * t.element_size();
      EXPECT_EQ(total, data_size) << "byte " << i << " set to " << static_cast<int>(v);
    }
  }
  EXPECT_GT(failed, 1000);
  EXPECT_GT(parsed, 0);  // e.g. a changed character inside the metadata text
}

TEST(SafetensorsTest, ReadErrorsNameThePath) {
  absl::StatusOr<Safetensors> st = ReadSafetensors(TempPath("does_not_exist.safetensors"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(st.status().message(), HasSubstr("does_not_exist.safetensors: No such file or directory"));

  st = ReadSafetensors(TempPath(""));  // a directory
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(), HasSubstr("cannot read"));

  const std::string path = TempPath("truncated.safetensors");
  std::ofstream(path, std::ios::binary) << ReadBytes(kFixture).substr(0, 100);
  st = ReadSafetensors(path);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(std::string(st.status().message()), StartsWith(path + ": header length 872 is larger than the 92 bytes after it"));
}

TEST(SafetensorsTest, WriterRefusesWhatItCannotWrite) {
  auto error = [](const Safetensors& f) {
    absl::StatusOr<std::string> s = SerializeSafetensors(f);
    return s.ok() ? std::string("OK") : std::string(s.status().message());
  };
  EXPECT_EQ(error({{{"a", at::Tensor()}}, {}}), "tensor \"a\" is undefined");
  EXPECT_EQ(error({{{"__metadata__", at::ones({1})}}, {}}), "a tensor cannot be named \"__metadata__\"");
  EXPECT_THAT(error({{{"c", at::ones({1}, at::kComplexFloat)}}, {}}),
              HasSubstr("tensor \"c\": dtype ComplexFloat has no safetensors type here"));
  EXPECT_THAT(error({{{"\xff", at::ones({1})}}, {}}), HasSubstr("is not valid UTF-8"));
  EXPECT_THAT(error({{}, {{"k", "\xc0\xaf"}}}), HasSubstr("metadata \"k\" is not valid UTF-8"));
  absl::Status s = WriteSafetensors("/nonexistent-dir/x.safetensors", {{{"a", at::ones({1})}}, {}});
  EXPECT_THAT(std::string(s.message()), HasSubstr("cannot create /nonexistent-dir/x.safetensors: No such file"));
}

TEST(SafetensorsTest, DtypeNames) {
  EXPECT_EQ(SafetensorsDtypeName(at::kBool), "BOOL");
  EXPECT_EQ(SafetensorsDtypeName(at::kByte), "U8");
  EXPECT_EQ(SafetensorsDtypeName(at::kChar), "I8");
  EXPECT_EQ(SafetensorsDtypeName(at::kShort), "I16");
  EXPECT_EQ(SafetensorsDtypeName(at::kInt), "I32");
  EXPECT_EQ(SafetensorsDtypeName(at::kLong), "I64");
  EXPECT_EQ(SafetensorsDtypeName(at::kHalf), "F16");
  EXPECT_EQ(SafetensorsDtypeName(at::kBFloat16), "BF16");
  EXPECT_EQ(SafetensorsDtypeName(at::kFloat), "F32");
  EXPECT_EQ(SafetensorsDtypeName(at::kDouble), "F64");
  EXPECT_EQ(SafetensorsDtypeName(at::kComplexFloat), "");
}

}  // namespace
}  // namespace switchyard::common
