// Reading and writing safetensors files (Hugging Face's format): an 8-byte little-endian
// header length N, N bytes of JSON header, then the tensor data. The header maps each tensor
// name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data, which
// starts right after the header) and may hold "__metadata__": {string: string}.
//
//   absl::StatusOr<Safetensors> in = ReadSafetensors("router_logits.safetensors");
//   if (!in.ok()) return in.status();  // e.g. "x.safetensors: tensor \"a\": data_offsets ..."
//   const at::Tensor& logits = in->tensors.at("logits");
//   Safetensors out{.tensors = {{"probs", probs}}, .metadata = {{"top_k", "2"}}};
//   absl::Status s = WriteSafetensors("routing.safetensors", out);
//
// Reading is as strict as the reference (Rust) implementation, which the Python package
// uses: the header must be a JSON object starting with '{' and at most 100 MB; every entry has
// exactly dtype, shape and data_offsets; each tensor's byte range matches its dtype and shape;
// the ranges tile the data exactly (no overlap, no gap, nothing after the last); and, beyond
// it, BOOL bytes must be 0 or 1 and duplicate JSON keys are refused. Errors name the tensor,
// the field and the values. Every dtype LibTorch 1.13 has a type for is supported: BOOL, U8,
// I8, I16, I32, I64, F16, BF16, F32, F64 (not U16/U32/U64 or the 8-bit floats).
#ifndef COMMON_SAFETENSORS_H_
#define COMMON_SAFETENSORS_H_

#include <map>
#include <string>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace switchyard::common {

struct Safetensors {
  std::map<std::string, at::Tensor> tensors;  // read: CPU, contiguous, owning their memory
  std::map<std::string, std::string> metadata;
};

// The file's bytes → tensors. Messages start with what was wrong, e.g. "header length
// 4096 is larger than the 120 bytes after it".
absl::StatusOr<Safetensors> ParseSafetensors(absl::string_view bytes);

// ParseSafetensors of the file at `path`; messages start with the path.
absl::StatusOr<Safetensors> ReadSafetensors(const std::string& path);

// Tensors of any device, layout and autograd state are written as their CPU values, laid
// out as the reference writer lays them out: data ordered by dtype (I64, F64, F32, I32,
// BF16, F16, I16, I8, U8, BOOL), then by name, which keeps every tensor aligned to its
// element size; the same compact JSON and escapes; the header padded with spaces to a
// multiple of 8 bytes. (So the bytes equal the reference's, except that metadata keys are
// written sorted where it writes them in hash order.) Refuses undefined tensors, dtypes
// without a safetensors name here, the name "__metadata__", and text that is not UTF-8.
absl::StatusOr<std::string> SerializeSafetensors(const Safetensors& file);
absl::Status WriteSafetensors(const std::string& path, const Safetensors& file);

// "F32" for at::kFloat and so on; empty for a dtype this library does not map.
absl::string_view SafetensorsDtypeName(at::ScalarType type);

}  // namespace switchyard::common

#endif  // COMMON_SAFETENSORS_H_
