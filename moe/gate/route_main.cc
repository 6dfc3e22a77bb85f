// route: runs the router on tensors from a safetensors file and writes what it decided, for
// debugging a router outside training.
//
//   tools/bazel run //moe/gate:route -- --input=in.safetensors --output=out.safetensors --top_k=2
//
// Input: logits [tokens, experts], or hidden states [tokens, hidden] and a gate weight
// [experts, hidden] (logits = hidden · weightᵀ), in F32, F16, BF16 or F64 (routed in fp32).
// Output: topk_indices I64 [T, k], topk_weights F32 [T, k] (both [T, 0] for expert choice),
// probs F32 [T, E], routing_map BOOL [T, E], tokens_per_expert I64 [E], dropped BOOL [T, E],
// aux_loss and z_loss F32 [], and the resolved options in __metadata__. Exit codes: 0 done;
// 2 bad flags or input (one "error: ..." line on stderr); 1 the output cannot be written.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "moe/gate/router.h"
#include "moe/gate/router_module.h"

namespace switchyard::gate {
namespace {

using common::Safetensors;

constexpr char kUsage[] =
    "usage: route --input=IN.safetensors --output=OUT.safetensors [options]\n"
    "input tensors (F32, F16, BF16 or F64; routed in fp32):\n"
    "  --logits=NAME          router logits [tokens, experts] (default \"logits\")\n"
    "  --hidden=NAME          or hidden states [tokens, hidden] (default \"hidden\")\n"
    "  --weight=NAME          with the gate weight [experts, hidden] (default \"weight\")\n"
    "                         Without --logits/--hidden/--weight: the tensor \"logits\" if the\n"
    "                         file has one, else \"hidden\" and \"weight\".\n"
    "  --expert_bias=NAME     per-expert bias [experts] added to the scores to choose experts\n"
    "routing (defaults as the router's):\n"
    "  --routing=token_choice|expert_choice\n"
    "  --top_k=2  --score=softmax|sigmoid  --pre_softmax  --scaling_factor=1\n"
    "  --num_groups=0 --group_topk=0       group-limited routing\n"
    "  --capacity_factor=0                 0: dropless (expert choice needs > 0)\n"
    "  --drop_policy=score|position|choice_then_position  --pad_to_capacity\n"
    "  --min_capacity=0                    capacity is at least this (DeepSpeed)\n"
    "  --group_score_topk=0                experts summed per group score (0: top_k/group_topk)\n"
    "  --weight_norm=sigmoid_topk|none|topk|kept   normalising the top-k weights (router.h)\n"
    "losses (token choice):\n"
    "  --aux_loss=none|batch|sequence (default batch)  --aux_loss_coeff=0.01\n"
    "  --num_sequences=1      with --aux_loss=sequence: tokens are this many sequences, one after\n"
    "                         another ([batch, seq] order)\n"
    "  --z_loss_coeff=0\n"
    "Boolean flags take no value or =true/=false. Writes topk_indices, topk_weights, probs,\n"
    "routing_map (BOOL), tokens_per_expert, dropped (BOOL), aux_loss, z_loss; the options go\n"
    "to __metadata__. Exit codes: 0 done; 2 bad flags or input; 1 cannot write the output.\n";

struct Args {
  std::string input, output;
  std::string logits = "logits", hidden = "hidden", weight = "weight", expert_bias;
  TopKOptions topk;
  RoutingType routing = RouterConfig().type;
  AuxLoss aux_loss = RouterConfig().aux_loss;
  double aux_loss_coeff = RouterConfig().aux_loss_coeff;
  int64_t num_sequences = 1;
  double z_loss_coeff = RouterConfig().z_loss_coeff;
  std::set<std::string> given;  // flags on the command line
};

absl::Status Invalid(const std::string& m) { return absl::InvalidArgumentError(m); }

// The shortest decimal that reads back as `v` (so 0.01 is "0.01", not "0.01000000000000000021").
std::string Shortest(double v) {
  for (int precision = 1; precision < 17; ++precision) {
    const std::string s = absl::StrFormat("%.*g", precision, v);
    double back;
    if (absl::SimpleAtod(s, &back) && back == v) return s;
  }
  return absl::StrFormat("%.17g", v);
}

std::string Shortest(float v) {
  for (int precision = 1; precision < 9; ++precision) {
    const std::string s = absl::StrFormat("%.*g", precision, v);
    float back;
    if (absl::SimpleAtof(s, &back) && back == v) return s;
  }
  return absl::StrFormat("%.9g", v);
}

template <typename Enum>
absl::Status ParseEnum(const std::string& flag, const std::string& value,
                       const std::vector<std::pair<const char*, Enum>>& choices, Enum* out) {
  std::vector<std::string> names;
  for (const auto& [name, e] : choices) {
    if (value == name) {
      *out = e;
      return absl::OkStatus();
    }
    names.push_back(name);
  }
  return Invalid(absl::StrFormat("--%s=%s: expected one of %s", flag, value, absl::StrJoin(names, ", ")));
}

template <typename Enum>
std::string EnumName(Enum value, const std::vector<std::pair<const char*, Enum>>& choices) {
  for (const auto& [name, e] : choices) {
    if (e == value) return name;
  }
  return "?";
}

const std::vector<std::pair<const char*, ScoreFunction>> kScores = {
    {"softmax", ScoreFunction::kSoftmax}, {"sigmoid", ScoreFunction::kSigmoid}};
const std::vector<std::pair<const char*, DropPolicy>> kDropPolicies = {
    {"score", DropPolicy::kByScore},
    {"position", DropPolicy::kByPosition},
    {"choice_then_position", DropPolicy::kByChoiceThenPosition}};
const std::vector<std::pair<const char*, WeightNorm>> kWeightNorms = {
    {"sigmoid_topk", WeightNorm::kSigmoidTopK},
    {"none", WeightNorm::kNone},
    {"topk", WeightNorm::kTopK},
    {"kept", WeightNorm::kKept}};
const std::vector<std::pair<const char*, RoutingType>> kRoutings = {
    {"token_choice", RoutingType::kTokenChoice}, {"expert_choice", RoutingType::kExpertChoice}};
const std::vector<std::pair<const char*, AuxLoss>> kAuxLosses = {
    {"none", AuxLoss::kNone}, {"batch", AuxLoss::kBatch}, {"sequence", AuxLoss::kSequence}};

absl::Status ParseInt(const std::string& flag, const std::string& value, int64_t* out) {
  if (!absl::SimpleAtoi(value, out)) return Invalid(absl::StrFormat("--%s=%s: not an integer", flag, value));
  return absl::OkStatus();
}

absl::Status ParseInt(const std::string& flag, const std::string& value, int* out) {
  int64_t v;
  SY_RETURN_IF_ERROR(ParseInt(flag, value, &v));
  if (v < -(int64_t{1} << 31) || v >= (int64_t{1} << 31)) {
    return Invalid(absl::StrFormat("--%s=%s: out of range", flag, value));
  }
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

absl::Status ParseDouble(const std::string& flag, const std::string& value, double* out) {
  if (!absl::SimpleAtod(value, out) || !std::isfinite(*out)) {
    return Invalid(absl::StrFormat("--%s=%s: not a finite number", flag, value));
  }
  return absl::OkStatus();
}

absl::Status ParseBool(const std::string& flag, const std::string& value, bool* out) {
  if (value == "true" || value == "1") {
    *out = true;
  } else if (value == "false" || value == "0") {
    *out = false;
  } else {
    return Invalid(absl::StrFormat("--%s=%s: expected true or false", flag, value));
  }
  return absl::OkStatus();
}

// Returns the parsed flags, or an error; sets *help when --help was asked for.
absl::StatusOr<Args> ParseArgs(int argc, char** argv, bool* help) {
  Args a;
  using Setter = std::function<absl::Status(const std::string&, const std::string&)>;
  auto str = [](std::string* p) -> Setter {
    return [p](const std::string& flag, const std::string& v) {
      if (v.empty()) return Invalid(absl::StrFormat("--%s needs a non-empty value", flag));
      *p = v;
      return absl::OkStatus();
    };
  };
  const std::map<std::string, Setter> valued = {
      {"input", str(&a.input)},
      {"output", str(&a.output)},
      {"logits", str(&a.logits)},
      {"hidden", str(&a.hidden)},
      {"weight", str(&a.weight)},
      {"expert_bias", str(&a.expert_bias)},
      {"top_k", [&](auto& f, auto& v) { return ParseInt(f, v, &a.topk.top_k); }},
      {"num_groups", [&](auto& f, auto& v) { return ParseInt(f, v, &a.topk.num_groups); }},
      {"group_topk", [&](auto& f, auto& v) { return ParseInt(f, v, &a.topk.group_topk); }},
      {"group_score_topk", [&](auto& f, auto& v) { return ParseInt(f, v, &a.topk.group_score_topk); }},
      {"min_capacity", [&](auto& f, auto& v) { return ParseInt(f, v, &a.topk.min_capacity); }},
      {"weight_norm", [&](auto& f, auto& v) { return ParseEnum(f, v, kWeightNorms, &a.topk.weight_norm); }},
      {"num_sequences", [&](auto& f, auto& v) { return ParseInt(f, v, &a.num_sequences); }},
      {"scaling_factor",
       [&](auto& f, auto& v) {
         double d;
         SY_RETURN_IF_ERROR(ParseDouble(f, v, &d));
         a.topk.scaling_factor = static_cast<float>(d);
         return absl::OkStatus();
       }},
      {"capacity_factor", [&](auto& f, auto& v) { return ParseDouble(f, v, &a.topk.capacity_factor); }},
      {"aux_loss_coeff", [&](auto& f, auto& v) { return ParseDouble(f, v, &a.aux_loss_coeff); }},
      {"z_loss_coeff", [&](auto& f, auto& v) { return ParseDouble(f, v, &a.z_loss_coeff); }},
      {"score", [&](auto& f, auto& v) { return ParseEnum(f, v, kScores, &a.topk.score); }},
      {"drop_policy", [&](auto& f, auto& v) { return ParseEnum(f, v, kDropPolicies, &a.topk.drop_policy); }},
      {"routing", [&](auto& f, auto& v) { return ParseEnum(f, v, kRoutings, &a.routing); }},
      {"aux_loss", [&](auto& f, auto& v) { return ParseEnum(f, v, kAuxLosses, &a.aux_loss); }},
  };
  const std::map<std::string, bool*> booleans = {
      {"pre_softmax", &a.topk.pre_softmax}, {"pad_to_capacity", &a.topk.pad_to_capacity}};

  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      *help = true;
      return a;
    }
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      return Invalid(absl::StrFormat("unexpected argument \"%s\" (flags are --name=value; see --help)", arg));
    }
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const bool has_value = eq != std::string::npos;
    if (!a.given.insert(name).second && (valued.count(name) || booleans.count(name))) {
      return Invalid(absl::StrFormat("--%s is given more than once", name));
    }
    if (auto b = booleans.find(name); b != booleans.end()) {
      if (!has_value) {
        *b->second = true;
      } else {
        SY_RETURN_IF_ERROR(ParseBool(name, arg.substr(eq + 1), b->second));
      }
    } else if (auto v = valued.find(name); v != valued.end()) {
      std::string value;
      if (has_value) {
        value = arg.substr(eq + 1);
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return Invalid(absl::StrFormat("--%s needs a value", name));
      }
      SY_RETURN_IF_ERROR(v->second(name, value));
    } else {
      return Invalid(absl::StrFormat("unknown flag --%s (see --help)", name));
    }
  }
  if (a.input.empty()) return Invalid("--input is required (see --help)");
  if (a.output.empty()) return Invalid("--output is required (see --help)");
  if (a.aux_loss_coeff < 0 || a.z_loss_coeff < 0) {
    return Invalid("--aux_loss_coeff and --z_loss_coeff must be >= 0");
  }
  if (a.num_sequences < 1) {
    return Invalid(absl::StrFormat("--num_sequences=%d must be at least 1", a.num_sequences));
  }
  // Flags that would change nothing are refused rather than silently ignored: a user
  // debugging a router should not believe an option took effect when it did not.
  if (a.routing == RoutingType::kExpertChoice) {
    for (const char* f : {"top_k", "score", "pre_softmax", "num_groups", "group_topk", "scaling_factor",
                          "drop_policy", "pad_to_capacity", "expert_bias", "group_score_topk",
                          "min_capacity", "weight_norm"}) {
      if (a.given.count(f)) {
        return Invalid(absl::StrFormat("--%s does not apply to --routing=expert_choice (it takes "
                                       "--capacity_factor only)", f));
      }
    }
    if (a.given.count("aux_loss") && a.aux_loss != AuxLoss::kNone) {
      return Invalid("--aux_loss applies to token-choice routing only (expert choice is balanced by "
                     "construction)");
    }
    a.aux_loss = AuxLoss::kNone;
  }
  if (a.aux_loss == AuxLoss::kNone && a.given.count("aux_loss_coeff")) {
    return Invalid("--aux_loss_coeff has no effect without an aux loss (--aux_loss=batch|sequence)");
  }
  if (a.aux_loss != AuxLoss::kSequence && a.given.count("num_sequences")) {
    return Invalid("--num_sequences applies to --aux_loss=sequence only");
  }
  const bool by_hidden = a.given.count("hidden") || a.given.count("weight");
  if (by_hidden && a.given.count("logits")) {
    return Invalid("--logits and --hidden/--weight are two different inputs: give one");
  }
  return a;
}

std::string ShapeOf(const at::Tensor& t) { return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]"); }

std::string Names(const Safetensors& file) {
  std::vector<std::string> names;
  for (const auto& [name, t] : file.tensors) names.push_back(absl::StrCat("\"", absl::CHexEscape(name), "\""));
  return names.empty() ? "none" : absl::StrJoin(names, ", ");
}

// The tensor `name` (from --`flag`) in fp32, with `rank` dimensions.
absl::StatusOr<at::Tensor> Fetch(const Args& a, const Safetensors& file, const std::string& name,
                                 const std::string& flag, int64_t rank, const char* expected_shape) {
  auto it = file.tensors.find(name);
  if (it == file.tensors.end()) {
    return Invalid(absl::StrFormat("%s has no tensor \"%s\" (--%s); it has: %s", a.input,
                                   absl::CHexEscape(name), flag, Names(file)));
  }
  const at::Tensor& t = it->second;
  const at::ScalarType type = t.scalar_type();
  if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16 && type != at::kDouble) {
    return Invalid(absl::StrFormat("tensor \"%s\" (--%s) has dtype %s; expected F32, F16, BF16 or F64",
                                   name, flag, common::SafetensorsDtypeName(type)));
  }
  if (t.dim() != rank) {
    return Invalid(absl::StrFormat("tensor \"%s\" (--%s) has shape %s; expected %s", name, flag,
                                   ShapeOf(t), expected_shape));
  }
  return t.to(at::kFloat);
}

struct Inputs {
  at::Tensor logits;       // [T, E] fp32
  at::Tensor expert_bias;  // [E] fp32 or undefined
  std::map<std::string, std::string> names;  // which tensors were used, for the metadata
};

absl::StatusOr<Inputs> LoadInputs(const Args& a, const Safetensors& file) {
  Inputs in;
  bool by_hidden = a.given.count("hidden") || a.given.count("weight");
  if (!by_hidden && !a.given.count("logits") && !file.tensors.count(a.logits)) {
    if (!file.tensors.count(a.hidden) || !file.tensors.count(a.weight)) {
      return Invalid(absl::StrFormat(
          "%s has no tensor \"logits\", nor \"hidden\" and \"weight\"; it has: %s (name them with "
          "--logits=NAME, or --hidden=NAME --weight=NAME)", a.input, Names(file)));
    }
    by_hidden = true;
  }
  if (by_hidden) {
    SY_ASSIGN_OR_RETURN(at::Tensor hidden, Fetch(a, file, a.hidden, "hidden", 2, "[tokens, hidden]"));
    SY_ASSIGN_OR_RETURN(at::Tensor weight, Fetch(a, file, a.weight, "weight", 2, "[experts, hidden]"));
    if (weight.size(1) != hidden.size(1)) {
      return Invalid(absl::StrFormat("tensor \"%s\" (--weight) has shape %s; expected [experts, %d] to "
                                     "match hidden \"%s\" %s", a.weight, ShapeOf(weight), hidden.size(1),
                                     a.hidden, ShapeOf(hidden)));
    }
    in.logits = at::matmul(hidden, weight.t());
    in.names = {{"hidden", a.hidden}, {"weight", a.weight}};
  } else {
    SY_ASSIGN_OR_RETURN(in.logits, Fetch(a, file, a.logits, "logits", 2, "[tokens, experts]"));
    in.names = {{"logits", a.logits}};
  }
  if (in.logits.size(0) < 1 || in.logits.size(1) < 1) {
    return Invalid(absl::StrFormat("the logits are %s: need at least one token and one expert",
                                   ShapeOf(in.logits)));
  }
  if (!a.expert_bias.empty()) {
    SY_ASSIGN_OR_RETURN(in.expert_bias, Fetch(a, file, a.expert_bias, "expert_bias", 1, "[experts]"));
    if (in.expert_bias.size(0) != in.logits.size(1)) {
      return Invalid(absl::StrFormat("tensor \"%s\" (--expert_bias) has shape %s; expected [%d], one "
                                     "per expert", a.expert_bias, ShapeOf(in.expert_bias),
                                     in.logits.size(1)));
    }
    if (!at::isfinite(in.expert_bias).all().item<bool>()) {
      return Invalid(absl::StrFormat("tensor \"%s\" (--expert_bias) contains NaN or inf", a.expert_bias));
    }
    in.names["expert_bias"] = a.expert_bias;
  }
  return in;
}

absl::StatusOr<Safetensors> Route(const Args& a, const Inputs& in) {
  const at::Tensor& logits = in.logits;
  const int64_t T = logits.size(0);
  Routing r;
  if (a.routing == RoutingType::kExpertChoice) {
    SY_ASSIGN_OR_RETURN(r, ExpertChoiceRoute(logits, a.topk.capacity_factor));
    r.topk_indices = at::zeros({T, 0}, at::kLong);
    r.topk_weights = at::zeros({T, 0}, at::kFloat);
  } else {
    SY_ASSIGN_OR_RETURN(r, TopKRoute(logits, a.topk, in.expert_bias));
  }
  at::Tensor aux_loss = at::zeros({}, at::kFloat);
  if (a.aux_loss != AuxLoss::kNone) {
    SY_ASSIGN_OR_RETURN(AuxLossInputs aux, AuxLossScores(logits, a.topk.top_k, a.topk.score));
    if (a.aux_loss == AuxLoss::kSequence) {
      SY_ASSIGN_OR_RETURN(aux_loss, SequenceLoadBalancingLoss(aux.scores, aux.routing_map, a.num_sequences,
                                                              a.topk.top_k, a.aux_loss_coeff));
    } else {
      aux_loss = LoadBalancingLoss(aux.scores, aux.tokens_per_expert, T, a.topk.top_k, a.aux_loss_coeff);
    }
  }
  const at::Tensor z_loss = a.z_loss_coeff > 0 ? ZLoss(logits, a.z_loss_coeff) : at::zeros({}, at::kFloat);

  Safetensors out;
  out.tensors = {
      {"topk_indices", r.topk_indices.to(at::kLong)},
      {"topk_weights", r.topk_weights.detach().to(at::kFloat)},
      {"probs", r.probs.detach().to(at::kFloat)},
      {"routing_map", r.routing_map.to(at::kBool)},
      {"tokens_per_expert", r.tokens_per_expert.to(at::kLong)},
      {"dropped", r.dropped.to(at::kBool)},
      {"aux_loss", aux_loss.detach().to(at::kFloat).reshape({})},
      {"z_loss", z_loss.detach().to(at::kFloat).reshape({})},
  };
  std::map<std::string, std::string>& m = out.metadata;
  m = in.names;
  m["tool"] = "switchyard //moe/gate:route";
  m["routing"] = EnumName(a.routing, kRoutings);
  m["tokens"] = absl::StrCat(T);
  m["experts"] = absl::StrCat(logits.size(1));
  m["capacity_factor"] = Shortest(a.topk.capacity_factor);
  m["capacity"] = absl::StrCat(r.capacity);
  m["aux_loss"] = EnumName(a.aux_loss, kAuxLosses);
  m["z_loss_coeff"] = Shortest(a.z_loss_coeff);
  if (a.routing == RoutingType::kTokenChoice) {
    m["top_k"] = absl::StrCat(a.topk.top_k);
    m["score"] = EnumName(a.topk.score, kScores);
    m["pre_softmax"] = a.topk.pre_softmax ? "true" : "false";
    m["num_groups"] = absl::StrCat(a.topk.num_groups);
    m["group_topk"] = absl::StrCat(a.topk.group_topk);
    m["scaling_factor"] = Shortest(a.topk.scaling_factor);
    m["drop_policy"] = EnumName(a.topk.drop_policy, kDropPolicies);
    m["pad_to_capacity"] = a.topk.pad_to_capacity ? "true" : "false";
    // Recorded when given, so files written before these options existed still compare.
    if (a.given.count("group_score_topk")) m["group_score_topk"] = absl::StrCat(a.topk.group_score_topk);
    if (a.given.count("min_capacity")) m["min_capacity"] = absl::StrCat(a.topk.min_capacity);
    if (a.given.count("weight_norm")) m["weight_norm"] = EnumName(a.topk.weight_norm, kWeightNorms);
  }
  if (a.aux_loss != AuxLoss::kNone) m["aux_loss_coeff"] = Shortest(a.aux_loss_coeff);
  if (a.aux_loss == AuxLoss::kSequence) m["num_sequences"] = absl::StrCat(a.num_sequences);
  return out;
}

int Fail(const absl::Status& s, int code) {
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return code;
}

int Main(int argc, char** argv) {
  bool help = false;
  absl::StatusOr<Args> args = ParseArgs(argc, argv, &help);
  if (help) {
    std::printf("%s", kUsage);
    return 0;
  }
  if (!args.ok()) return Fail(args.status(), 2);
  absl::StatusOr<Safetensors> file = common::ReadSafetensors(args->input);
  if (!file.ok()) return Fail(file.status(), 2);
  absl::StatusOr<Inputs> inputs = LoadInputs(*args, *file);
  if (!inputs.ok()) return Fail(inputs.status(), 2);
  absl::StatusOr<Safetensors> out = Route(*args, *inputs);
  if (!out.ok()) return Fail(out.status(), 2);
  if (absl::Status s = common::WriteSafetensors(args->output, *out); !s.ok()) return Fail(s, 1);

  const Safetensors& o = *out;
  absl::PrintF("routed %s tokens to %s experts (%s, capacity %s): %d slot(s) dropped, aux_loss %.6g, "
               "z_loss %.6g; wrote %s\n",
               o.metadata.at("tokens"), o.metadata.at("experts"), o.metadata.at("routing"),
               o.metadata.at("capacity"), o.tensors.at("dropped").sum().item<int64_t>(),
               o.tensors.at("aux_loss").item<float>(), o.tensors.at("z_loss").item<float>(), args->output);
  return 0;
}

}  // namespace
}  // namespace switchyard::gate

int main(int argc, char** argv) {
  // `bazel run` starts binaries in their runfiles folder: go back to where the user was, so
  // relative paths mean what they meant there.
  if (const char* cwd = std::getenv("BUILD_WORKING_DIRECTORY"); cwd && *cwd && chdir(cwd) != 0) {
    std::fprintf(stderr, "error: cannot enter BUILD_WORKING_DIRECTORY \"%s\"\n", cwd);
    return 2;
  }
  // Our checks should catch every bad input first; this keeps anything they miss (LibTorch
  // refusing a shape, say) from ending in a crash.
  try {
    return switchyard::gate::Main(argc, argv);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    std::fprintf(stderr, "error: LibTorch: %s\n", what.substr(0, what.find('\n')).c_str());
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::fprintf(stderr, "error: %s\n", what.substr(0, what.find('\n')).c_str());
  }
  return 2;
}
