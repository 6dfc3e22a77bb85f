#include "common/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; this reader copies it as is");

namespace switchyard::common {
namespace {

// The reference implementation's limit; it keeps a corrupt length from asking for gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// A safetensors header nests three deep ({name: {shape: [...]}}); the cap keeps a hostile
// "[[[[..." from exhausting the stack.
constexpr int kMaxJsonDepth = 16;

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
  size_t size;
};

// In the reference writer's data order (its dtype enum, descending), which also puts larger
// elements first.
constexpr DtypeInfo kDtypes[] = {
    {"I64", at::kLong, 8},  {"F64", at::kDouble, 8},    {"F32", at::kFloat, 4},
    {"I32", at::kInt, 4},   {"BF16", at::kBFloat16, 2}, {"F16", at::kHalf, 2},
    {"I16", at::kShort, 2}, {"I8", at::kChar, 1},       {"U8", at::kByte, 1},
    {"BOOL", at::kBool, 1},
};

const DtypeInfo* DtypeByName(absl::string_view name) {
  for (const DtypeInfo& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const DtypeInfo* DtypeByType(at::ScalarType type) {
  for (const DtypeInfo& d : kDtypes) {
    if (type == d.type) return &d;
  }
  return nullptr;
}

std::string SupportedDtypes() {
  std::vector<std::string> names;
  for (const DtypeInfo& d : kDtypes) names.push_back(d.name);
  return absl::StrJoin(names, ", ");
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 (overlong forms, surrogates and
// code points above U+10FFFF are invalid, as in RFC 3629).
size_t Utf8SequenceLength(absl::string_view s, size_t i) {
  const auto byte = [&](size_t j) { return static_cast<unsigned char>(s[j]); };
  const unsigned char c = byte(i);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2, cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3, cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4, cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t j = 1; j < n; ++j) {
    if ((byte(i + j) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (byte(i + j) & 0x3F);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
      (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;
  }
  return n;
}

bool IsValidUtf8(absl::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = Utf8SequenceLength(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// ---------------------------------------------------------------------------------------
// The JSON a safetensors header uses: objects, arrays, strings and non-negative integers.
// Anything else (true, null, fractions, negative numbers) is an error, since no valid header
// holds one.

struct Json {
  enum class Kind { kObject, kArray, kString, kInteger };
  Kind kind = Kind::kObject;
  size_t offset = 0;  // byte in the header where the value starts, for messages
  std::string string;
  uint64_t integer = 0;
  std::vector<Json> items;                            // kArray
  std::vector<std::pair<std::string, Json>> members;  // kObject, in file order
};

const char* KindName(Json::Kind kind) {
  switch (kind) {
    case Json::Kind::kObject: return "an object";
    case Json::Kind::kArray: return "an array";
    case Json::Kind::kString: return "a string";
    case Json::Kind::kInteger: return "an integer";
  }
  return "?";
}

class JsonParser {
 public:
  explicit JsonParser(absl::string_view text) : text_(text) {}

  // One value followed only by whitespace (the reference writer pads with spaces).
  absl::StatusOr<Json> ParseDocument() {
    Json root;
    SY_RETURN_IF_ERROR(ParseValue(&root, 0));
    SkipWhitespace();
    if (pos_ != text_.size()) return Error("unexpected text after the top-level value");
    return root;
  }

 private:
  absl::Status Error(const std::string& what) const { return ErrorAt(pos_, what); }
  absl::Status ErrorAt(size_t at, const std::string& what) const {
    return Invalid(absl::StrFormat("header is not valid JSON: %s at byte %d of %d", what, at,
                                   text_.size()));
  }

  void SkipWhitespace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  // Consumes `c` after optional whitespace, or says what was expected.
  absl::Status Expect(char c, const char* expected) {
    SkipWhitespace();
    if (pos_ >= text_.size()) return Error(absl::StrCat("text ends where ", expected, " was expected"));
    if (text_[pos_] != c) return Error(absl::StrCat("expected ", expected));
    ++pos_;
    return absl::OkStatus();
  }

  absl::Status ParseValue(Json* out, int depth) {
    SkipWhitespace();
    if (pos_ >= text_.size()) return Error("text ends where a value was expected");
    out->offset = pos_;
    const char c = text_[pos_];
    if (c == '{' || c == '[') {
      if (depth >= kMaxJsonDepth) return Error(absl::StrCat("nested deeper than ", kMaxJsonDepth));
      return c == '{' ? ParseObject(out, depth) : ParseArray(out, depth);
    }
    if (c == '"') {
      out->kind = Json::Kind::kString;
      return ParseString(&out->string);
    }
    if (c >= '0' && c <= '9') {
      out->kind = Json::Kind::kInteger;
      return ParseInteger(&out->integer);
    }
    if (c == '-') return Error("negative number (no safetensors field can be negative)");
    if (c == 't' || c == 'f' || c == 'n') {
      return Error("true, false or null (no safetensors field holds one)");
    }
    return Error(absl::StrFormat("unexpected character '%s'", absl::CEscape(text_.substr(pos_, 1))));
  }

  absl::Status ParseObject(Json* out, int depth) {
    out->kind = Json::Kind::kObject;
    ++pos_;  // '{'
    SkipWhitespace();
    if (pos_ < text_.size() && text_[pos_] == '}') {
      ++pos_;
      return absl::OkStatus();
    }
    while (true) {
      SkipWhitespace();
      if (pos_ >= text_.size()) return Error("text ends inside an object");
      if (text_[pos_] != '"') return Error("expected a string key");
      const size_t key_at = pos_;
      std::string key;
      SY_RETURN_IF_ERROR(ParseString(&key));
      for (const auto& member : out->members) {
        if (member.first == key) {
          return ErrorAt(key_at, absl::StrFormat("duplicate key \"%s\"", absl::CEscape(key)));
        }
      }
      SY_RETURN_IF_ERROR(Expect(':', "':' after a key"));
      Json value;
      SY_RETURN_IF_ERROR(ParseValue(&value, depth + 1));
      out->members.emplace_back(std::move(key), std::move(value));
      SkipWhitespace();
      if (pos_ >= text_.size()) return Error("text ends inside an object");
      if (text_[pos_] == '}') {
        ++pos_;
        return absl::OkStatus();
      }
      if (text_[pos_] != ',') return Error("expected ',' or '}' in an object");
      ++pos_;
    }
  }

  absl::Status ParseArray(Json* out, int depth) {
    out->kind = Json::Kind::kArray;
    ++pos_;  // '['
    SkipWhitespace();
    if (pos_ < text_.size() && text_[pos_] == ']') {
      ++pos_;
      return absl::OkStatus();
    }
    while (true) {
      Json value;
      SY_RETURN_IF_ERROR(ParseValue(&value, depth + 1));
      out->items.push_back(std::move(value));
      SkipWhitespace();
      if (pos_ >= text_.size()) return Error("text ends inside an array");
      if (text_[pos_] == ']') {
        ++pos_;
        return absl::OkStatus();
      }
      if (text_[pos_] != ',') return Error("expected ',' or ']' in an array");
      ++pos_;
    }
  }

  absl::Status ParseHex4(uint32_t* out) {
    if (text_.size() - pos_ < 4) return Error("text ends inside a \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_ + i];
      v <<= 4;
      if (h >= '0' && h <= '9') {
        v |= h - '0';
      } else if (h >= 'a' && h <= 'f') {
        v |= h - 'a' + 10;
      } else if (h >= 'A' && h <= 'F') {
        v |= h - 'A' + 10;
      } else {
        return Error("\\u must be followed by 4 hex digits");
      }
    }
    pos_ += 4;
    *out = v;
    return absl::OkStatus();
  }

  absl::Status ParseString(std::string* out) {
    ++pos_;  // opening quote
    while (true) {
      if (pos_ >= text_.size()) return Error("text ends inside a string");
      const unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return absl::OkStatus();
      }
      if (c < 0x20) return Error("unescaped control character in a string");
      if (c != '\\') {
        const size_t n = Utf8SequenceLength(text_, pos_);
        if (n == 0) return Error("invalid UTF-8 in a string");
        out->append(text_.data() + pos_, n);
        pos_ += n;
        continue;
      }
      if (++pos_ >= text_.size()) return Error("text ends inside an escape");
      const char e = text_[pos_++];
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp;
          SY_RETURN_IF_ERROR(ParseHex4(&cp));
          if (cp >= 0xDC00 && cp <= 0xDFFF) return Error("lone low surrogate in a \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (text_.substr(pos_, 2) != "\\u") return Error("high surrogate without its low half");
            pos_ += 2;
            uint32_t low;
            SY_RETURN_IF_ERROR(ParseHex4(&low));
            if (low < 0xDC00 || low > 0xDFFF) return Error("high surrogate without its low half");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          return ErrorAt(pos_ - 2, absl::StrFormat("invalid escape '\\%s'", absl::CEscape(std::string(1, e))));
      }
    }
  }

  absl::Status ParseInteger(uint64_t* out) {
    const size_t start = pos_;
    uint64_t v = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const uint64_t d = text_[pos_] - '0';
      if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) {
        return ErrorAt(start, "integer does not fit in 64 bits");
      }
      v = v * 10 + d;
      ++pos_;
    }
    if (pos_ - start > 1 && text_[start] == '0') return ErrorAt(start, "integer with a leading zero");
    if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E')) {
      return ErrorAt(start, "number that is not an integer");
    }
    *out = v;
    return absl::OkStatus();
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

// ---------------------------------------------------------------------------------------

std::string Quoted(absl::string_view s) { return absl::StrCat("\"", absl::CHexEscape(s), "\""); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

struct Entry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

absl::StatusOr<Entry> ParseEntry(const std::string& name, const Json& value) {
  const std::string where = absl::StrCat("tensor ", Quoted(name));
  if (value.kind != Json::Kind::kObject) {
    return Invalid(absl::StrCat(where, ": expected an object, got ", KindName(value.kind)));
  }
  const Json *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
  for (const auto& [key, field] : value.members) {
    if (key == "dtype") {
      dtype = &field;
    } else if (key == "shape") {
      shape = &field;
    } else if (key == "data_offsets") {
      offsets = &field;
    } else {
      return Invalid(absl::StrCat(where, ": unknown field ", Quoted(key),
                                  " (expected dtype, shape and data_offsets)"));
    }
  }
  for (const auto& [field, field_name] : {std::pair{dtype, "dtype"}, std::pair{shape, "shape"},
                                          std::pair{offsets, "data_offsets"}}) {
    if (field == nullptr) return Invalid(absl::StrCat(where, ": missing \"", field_name, "\""));
  }
  Entry e;
  e.name = name;
  if (dtype->kind != Json::Kind::kString) {
    return Invalid(absl::StrCat(where, ": dtype must be a string, got ", KindName(dtype->kind)));
  }
  e.dtype = DtypeByName(dtype->string);
  if (e.dtype == nullptr) {
    return Invalid(absl::StrCat(where, ": dtype ", Quoted(dtype->string),
                                " is not supported (supported: ", SupportedDtypes(), ")"));
  }
  if (shape->kind != Json::Kind::kArray) {
    return Invalid(absl::StrCat(where, ": shape must be an array, got ", KindName(shape->kind)));
  }
  // Byte count, refusing overflow: a corrupt shape must not wrap around to a small size.
  uint64_t bytes = e.dtype->size;
  bool overflow = false;
  for (const Json& d : shape->items) {
    if (d.kind != Json::Kind::kInteger) {
      return Invalid(absl::StrCat(where, ": shape entries must be integers, got ", KindName(d.kind)));
    }
    if (d.integer > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Invalid(absl::StrCat(where, ": shape entry ", d.integer, " is too large"));
    }
    e.shape.push_back(static_cast<int64_t>(d.integer));
    if (d.integer != 0 && bytes > std::numeric_limits<uint64_t>::max() / d.integer) overflow = true;
    bytes *= d.integer;
  }
  if (std::find(e.shape.begin(), e.shape.end(), 0) != e.shape.end()) {
    bytes = 0;
  } else if (overflow) {
    return Invalid(absl::StrCat(where, ": shape ", ShapeString(e.shape), " has more bytes than 2^64"));
  }
  if (offsets->kind != Json::Kind::kArray || offsets->items.size() != 2 ||
      offsets->items[0].kind != Json::Kind::kInteger || offsets->items[1].kind != Json::Kind::kInteger) {
    return Invalid(absl::StrCat(where, ": data_offsets must be an array of two integers [begin, end]"));
  }
  e.begin = offsets->items[0].integer;
  e.end = offsets->items[1].integer;
  if (e.begin > e.end) {
    return Invalid(absl::StrFormat("%s: data_offsets [%d, %d] end before they begin", where, e.begin, e.end));
  }
  if (e.end - e.begin != bytes) {
    return Invalid(absl::StrFormat("%s: data_offsets [%d, %d] hold %d bytes, but %s %s needs %d",
                                   where, e.begin, e.end, e.end - e.begin, e.dtype->name,
                                   ShapeString(e.shape), bytes));
  }
  return e;
}

}  // namespace

absl::string_view SafetensorsDtypeName(at::ScalarType type) {
  const DtypeInfo* d = DtypeByType(type);
  return d == nullptr ? absl::string_view() : absl::string_view(d->name);
}

absl::StatusOr<Safetensors> ParseSafetensors(absl::string_view bytes) {
  if (bytes.size() < 8) {
    return Invalid(absl::StrFormat("file is %d bytes, shorter than the 8-byte header length",
                                   bytes.size()));
  }
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  const uint64_t rest = bytes.size() - 8;
  if (header_size > kMaxHeaderBytes) {
    return Invalid(absl::StrFormat("header length %d is over the %d-byte limit (corrupt file?)",
                                   header_size, kMaxHeaderBytes));
  }
  if (header_size > rest) {
    return Invalid(absl::StrFormat("header length %d is larger than the %d bytes after it "
                                   "(truncated file?)", header_size, rest));
  }
  const absl::string_view header = bytes.substr(8, header_size);
  const absl::string_view data = bytes.substr(8 + header_size);
  if (header.empty() || header[0] != '{') {
    return Invalid("header does not start with '{' (not a safetensors file?)");
  }
  absl::StatusOr<Json> root = JsonParser(header).ParseDocument();
  if (!root.ok()) return root.status();

  Safetensors out;
  std::vector<Entry> entries;
  for (const auto& [name, value] : root->members) {
    if (name == "__metadata__") {
      if (value.kind != Json::Kind::kObject) {
        return Invalid(absl::StrCat("__metadata__ must be an object, got ", KindName(value.kind)));
      }
      for (const auto& [key, v] : value.members) {
        if (v.kind != Json::Kind::kString) {
          return Invalid(absl::StrCat("__metadata__ ", Quoted(key), ": values must be strings, got ",
                                      KindName(v.kind)));
        }
        out.metadata[key] = v.string;
      }
      continue;
    }
    absl::StatusOr<Entry> e = ParseEntry(name, value);
    if (!e.ok()) return e.status();
    entries.push_back(*std::move(e));
  }

  // The byte ranges, in order, must tile the data: each starts where the previous ended.
  std::vector<const Entry*> order;
  for (const Entry& e : entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  uint64_t cursor = 0;
  const Entry* previous = nullptr;
  for (const Entry* e : order) {
    if (e->end > data.size()) {
      return Invalid(absl::StrFormat("tensor %s: data_offsets [%d, %d] run past the end of the "
                                     "%d data bytes (truncated file?)",
                                     Quoted(e->name), e->begin, e->end, data.size()));
    }
    if (e->begin < cursor) {
      return Invalid(absl::StrFormat("tensors %s [%d, %d] and %s [%d, %d] overlap",
                                     Quoted(previous->name), previous->begin, previous->end,
                                     Quoted(e->name), e->begin, e->end));
    }
    if (e->begin > cursor) {
      return Invalid(absl::StrFormat("data bytes [%d, %d) belong to no tensor (before tensor %s)",
                                     cursor, e->begin, Quoted(e->name)));
    }
    cursor = e->end;
    previous = e;
  }
  if (cursor != data.size()) {
    return Invalid(absl::StrFormat("data is %d bytes but the tensors cover only the first %d",
                                   data.size(), cursor));
  }

  for (const Entry& e : entries) {
    const absl::string_view raw = data.substr(e.begin, e.end - e.begin);
    if (e.dtype->type == at::kBool) {
      for (size_t i = 0; i < raw.size(); ++i) {
        if (raw[i] != 0 && raw[i] != 1) {
          return Invalid(absl::StrFormat("tensor %s: BOOL element %d is byte %d, not 0 or 1",
                                         Quoted(e.name), i, static_cast<unsigned char>(raw[i])));
        }
      }
    }
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype->type));
    if (!raw.empty()) std::memcpy(t.data_ptr(), raw.data(), raw.size());
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

absl::StatusOr<Safetensors> ReadSafetensors(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::NotFoundError(absl::StrFormat("cannot open %s: %s", path, std::strerror(errno)));
  }
  std::string bytes;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), f)) > 0) bytes.append(buffer, n);
  const bool failed = std::ferror(f) != 0;
  const int error = errno;
  std::fclose(f);
  if (failed) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cannot read %s: %s", path, std::strerror(error)));
  }
  absl::StatusOr<Safetensors> st = ParseSafetensors(bytes);
  if (!st.ok()) {
    return absl::Status(st.status().code(), absl::StrCat(path, ": ", st.status().message()));
  }
  return st;
}

namespace {

// Escapes as serde_json (the reference writer's JSON library) does, so that our headers are
// byte for byte the reference's.
void AppendJsonString(absl::string_view s, std::string* out) {
  out->push_back('"');
  for (const char c : s) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\b': *out += "\\b"; break;
      case '\f': *out += "\\f"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppend(out, absl::StrFormat("\\u%04x", static_cast<int>(c)));
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

}  // namespace

absl::StatusOr<std::string> SerializeSafetensors(const Safetensors& file) {
  struct Item {
    const std::string* name;
    const DtypeInfo* dtype;
    at::Tensor data;  // CPU, contiguous
  };
  std::vector<Item> items;
  for (const auto& [name, tensor] : file.tensors) {
    if (name == "__metadata__") return Invalid("a tensor cannot be named \"__metadata__\"");
    if (!IsValidUtf8(name)) return Invalid(absl::StrCat("tensor name ", Quoted(name), " is not valid UTF-8"));
    if (!tensor.defined()) return Invalid(absl::StrCat("tensor ", Quoted(name), " is undefined"));
    const DtypeInfo* dtype = DtypeByType(tensor.scalar_type());
    if (dtype == nullptr) {
      return Invalid(absl::StrCat("tensor ", Quoted(name), ": dtype ",
                                  c10::toString(tensor.scalar_type()),
                                  " has no safetensors type here (supported: ", SupportedDtypes(), ")"));
    }
    try {
      items.push_back({&name, dtype, tensor.detach().to(at::kCPU).contiguous()});
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("tensor ", Quoted(name), ": cannot copy to the CPU: ",
                                              e.what_without_backtrace()));
    }
  }
  for (const auto& [key, value] : file.metadata) {
    if (!IsValidUtf8(key) || !IsValidUtf8(value)) {
      return Invalid(absl::StrCat("metadata ", Quoted(key), " is not valid UTF-8"));
    }
  }
  // The reference writer's order (names are already sorted within a dtype): larger elements
  // first keeps every tensor aligned to its element size.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.dtype < b.dtype; });

  std::string header = "{";
  if (!file.metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : file.metadata) {
      if (!first) header += ",";
      first = false;
      AppendJsonString(key, &header);
      header += ":";
      AppendJsonString(value, &header);
    }
    header += "}";
  }
  uint64_t offset = 0;
  for (const Item& item : items) {
    const uint64_t bytes = static_cast<uint64_t>(item.data.numel()) * item.dtype->size;
    if (header.size() > 1) header += ",";
    AppendJsonString(*item.name, &header);
    absl::StrAppend(&header, ":{\"dtype\":\"", item.dtype->name, "\",\"shape\":[",
                    absl::StrJoin(item.data.sizes(), ","), "],\"data_offsets\":[", offset, ",",
                    offset + bytes, "]}");
    offset += bytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(8 + header.size() + offset);
  const uint64_t header_size = header.size();
  out.append(reinterpret_cast<const char*>(&header_size), 8);
  out += header;
  for (const Item& item : items) {
    out.append(static_cast<const char*>(item.data.data_ptr()),
               static_cast<size_t>(item.data.numel()) * item.dtype->size);
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const Safetensors& file) {
  SY_ASSIGN_OR_RETURN(const std::string bytes, SerializeSafetensors(file));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrFormat("cannot create %s: %s", path, std::strerror(errno)));
  }
  const bool written = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int error = errno;
  if (std::fclose(f) != 0 || !written) {
    return absl::UnavailableError(absl::StrFormat("cannot write %s: %s", path,
                                                  std::strerror(written ? errno : error)));
  }
  return absl::OkStatus();
}

}  // namespace switchyard::common
