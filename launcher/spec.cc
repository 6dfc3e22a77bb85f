#include "launcher/spec.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "dist/groups/comm.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace switchyard::launcher {
namespace {

// The field path enclosing byte `offset` of a text-format message: "model.moe" for an error
// inside `model { moe { ... } }`. Good enough for messages; comments and strings are skipped.
std::string EnclosingPath(absl::string_view text, size_t offset) {
  std::vector<std::string> stack;
  std::string last_ident;
  for (size_t i = 0; i < text.size() && i < offset; ++i) {
    char c = text[i];
    if (c == '#') {
      while (i < text.size() && text[i] != '\n') ++i;
    } else if (c == '"' || c == '\'') {
      for (++i; i < text.size() && text[i] != c; ++i) {
        if (text[i] == '\\') ++i;
      }
      last_ident.clear();
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < text.size() && (std::isalnum(static_cast<unsigned char>(text[j])) || text[j] == '_')) ++j;
      last_ident = std::string(text.substr(i, j - i));
      i = j - 1;
    } else if (c == '{' || c == '<') {
      stack.push_back(last_ident);
      last_ident.clear();
    } else if (c == '}' || c == '>') {
      if (!stack.empty()) stack.pop_back();
    } else if (c != ':' && !std::isspace(static_cast<unsigned char>(c))) {
      last_ident.clear();
    }
  }
  return absl::StrJoin(stack, ".");
}

class Collector : public google::protobuf::io::ErrorCollector {
 public:
  Collector(absl::string_view text, absl::string_view source) : text_(text), source_(source) {}

  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (!first_.empty()) return;
    std::string path = EnclosingPath(text_, Offset(line, column));
    first_ = absl::StrFormat("%s:%d:%d: %s%s", source_, line + 1, column + 1,
                             path.empty() ? "" : "in " + path + ": ", message);
  }
  void AddWarning(int, google::protobuf::io::ColumnNumber, const std::string&) override {}

  const std::string& first() const { return first_; }

 private:
  size_t Offset(int line, int column) const {
    size_t pos = 0;
    for (int l = 0; l < line && pos < text_.size(); ++l) {
      size_t nl = text_.find('\n', pos);
      if (nl == absl::string_view::npos) return text_.size();
      pos = nl + 1;
    }
    return std::min(text_.size(), pos + column);
  }

  absl::string_view text_;
  std::string source_;
  std::string first_;
};

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

// Range checks with the field path, value and expectation in the message.
absl::Status AtLeast(absl::string_view path, int64_t value, int64_t min) {
  if (value >= min) return absl::OkStatus();
  return Invalid(absl::StrFormat("%s: %d must be at least %d", path, value, min));
}
absl::Status InRange(absl::string_view path, int64_t value, int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi) return absl::OkStatus();
  return Invalid(absl::StrFormat("%s: %d must be between %d and %d", path, value, lo, hi));
}
absl::Status FiniteAtLeast(absl::string_view path, double value, double min, bool strict) {
  if (std::isfinite(value) && (strict ? value > min : value >= min)) return absl::OkStatus();
  return Invalid(absl::StrFormat("%s: %g must be a finite number %s %g", path, value,
                                 strict ? ">" : ">=", min));
}
absl::Status Divides(absl::string_view what, int64_t d, absl::string_view of, int64_t n) {
  if (d > 0 && n % d == 0) return absl::OkStatus();
  return Invalid(absl::StrFormat("%s: %d does not divide %s = %d", what, d, of, n));
}

absl::Status ValidateModel(const Model& m) {
  SY_RETURN_IF_ERROR(AtLeast("model.vocab_size", m.vocab_size(), 1));
  SY_RETURN_IF_ERROR(AtLeast("model.hidden_size", m.hidden_size(), 1));
  SY_RETURN_IF_ERROR(AtLeast("model.num_layers", m.num_layers(), 1));
  SY_RETURN_IF_ERROR(AtLeast("model.num_heads", m.num_heads(), 1));
  SY_RETURN_IF_ERROR(AtLeast("model.seq_len", m.seq_len(), 1));
  SY_RETURN_IF_ERROR(AtLeast("model.ffn_hidden_size", m.ffn_hidden_size(), 1));
  SY_RETURN_IF_ERROR(Divides("model.num_heads", m.num_heads(), "model.hidden_size", m.hidden_size()));
  const MoE& e = m.moe();
  SY_RETURN_IF_ERROR(AtLeast("model.moe.num_experts", e.num_experts(), 1));
  SY_RETURN_IF_ERROR(AtLeast("model.moe.every_n", e.every_n(), 0));
  SY_RETURN_IF_ERROR(AtLeast("model.moe.ffn_hidden_size", e.ffn_hidden_size(), 1));
  SY_RETURN_IF_ERROR(AtLeast("model.moe.num_shared_experts", e.num_shared_experts(), 0));
  SY_RETURN_IF_ERROR(AtLeast("model.moe.shared_ffn_hidden_size", e.shared_ffn_hidden_size(), 0));
  if (e.shared_ffn_hidden_size() > 0 && e.num_shared_experts() == 0) {
    return Invalid(absl::StrFormat(
        "model.moe.shared_ffn_hidden_size: %d needs model.moe.num_shared_experts > 0 (it sizes the shared experts)",
        e.shared_ffn_hidden_size()));
  }
  if (e.shared_expert_gate() && e.num_shared_experts() == 0) {
    return Invalid("model.moe.shared_expert_gate: true needs model.moe.num_shared_experts > 0 (it gates the shared "
                   "experts' output)");
  }
  if (e.router().type() != Router::EXPERT_CHOICE && (e.top_k() < 1 || e.top_k() > e.num_experts())) {
    return Invalid(absl::StrFormat(
        "model.moe.top_k: %d must be between 1 and model.moe.num_experts = %d", e.top_k(),
        e.num_experts()));
  }
  if (e.apply_probs_on_input() && (e.router().type() == Router::EXPERT_CHOICE || e.top_k() != 1)) {
    return Invalid(e.router().type() == Router::EXPERT_CHOICE
                       ? std::string("model.moe.apply_probs_on_input: true needs token-choice routing (got "
                                     "model.moe.router.type = EXPERT_CHOICE): one weight per token scales the "
                                     "expert's input")
                       : absl::StrFormat("model.moe.apply_probs_on_input: true needs model.moe.top_k = 1 (got %d): one "
                                         "weight per token scales the expert's input",
                                         e.top_k()));
  }
  std::set<int> seen;
  for (int i = 0; i < e.layers_size(); ++i) {
    const std::string path = absl::StrFormat("model.moe.layers[%d]", i);
    SY_RETURN_IF_ERROR(InRange(path, e.layers(i), 0, m.num_layers() - 1));
    if (!seen.insert(e.layers(i)).second) {
      return Invalid(absl::StrFormat("%s: layer %d is listed twice", path, e.layers(i)));
    }
  }
  const Router& r = e.router();
  const std::string rp = "model.moe.router";
  if (r.type() == Router::EXPERT_CHOICE) {
    // Expert choice takes the capacity factor alone: a setting it would ignore is refused
    // (a token-choice default written out is no setting).
    const MoE& moe_defaults = MoE::default_instance();
    const Router& d = Router::default_instance();
    const std::vector<std::pair<bool, std::string>> unused = {
        {e.top_k() != moe_defaults.top_k(), "model.moe.top_k"},
        {r.score() != Router::SOFTMAX, rp + ".score"},
        {!r.pre_softmax(), rp + ".pre_softmax"},
        {r.normalize_topk(), rp + ".normalize_topk"},
        {r.scaling_factor() != d.scaling_factor(), rp + ".scaling_factor"},
        {r.num_groups() > 0 || r.group_topk() > 0, rp + ".num_groups"},
        {r.drop_policy() != d.drop_policy(), rp + ".drop_policy"},
        {r.pad_to_capacity(), rp + ".pad_to_capacity"},
        {r.has_aux_loss() && r.aux_loss() != Router::AUX_NONE, rp + ".aux_loss"},
        {r.has_aux_loss_coeff(), rp + ".aux_loss_coeff"},
        {r.expert_bias(), rp + ".expert_bias"},
        {r.has_bias_update_rate(), rp + ".bias_update_rate"}};
    for (const auto& [set, field] : unused) {
      if (set) {
        return Invalid(absl::StrFormat("%s: has no effect with %s.type = EXPERT_CHOICE (each expert picks its "
                                       "capacity of tokens by softmax score; no aux loss)", field, rp));
      }
    }
  }
  SY_RETURN_IF_ERROR(FiniteAtLeast(rp + ".scaling_factor", r.scaling_factor(), 0, true));
  SY_RETURN_IF_ERROR(FiniteAtLeast(rp + ".jitter_eps", r.jitter_eps(), 0, false));
  if (r.jitter_eps() >= 1) {
    return Invalid(absl::StrFormat("%s.jitter_eps: %g must be below 1", rp, r.jitter_eps()));
  }
  SY_RETURN_IF_ERROR(FiniteAtLeast(rp + ".capacity_factor", r.capacity_factor(), 0, false));
  SY_RETURN_IF_ERROR(FiniteAtLeast(rp + ".aux_loss_coeff", r.aux_loss_coeff(), 0, false));
  SY_RETURN_IF_ERROR(FiniteAtLeast(rp + ".z_loss_coeff", r.z_loss_coeff(), 0, false));
  SY_RETURN_IF_ERROR(FiniteAtLeast(rp + ".bias_update_rate", r.bias_update_rate(), 0, false));
  SY_RETURN_IF_ERROR(AtLeast(rp + ".num_groups", r.num_groups(), 0));
  if (r.num_groups() > 0) {
    SY_RETURN_IF_ERROR(Divides(rp + ".num_groups", r.num_groups(), "model.moe.num_experts",
                               e.num_experts()));
    SY_RETURN_IF_ERROR(InRange(rp + ".group_topk", r.group_topk(), 1, r.num_groups()));
    const int reachable = r.group_topk() * (e.num_experts() / r.num_groups());
    if (e.top_k() < r.group_topk()) {
      return Invalid(absl::StrFormat("model.moe.top_k: %d is fewer than %s.group_topk = %d (each chosen group "
                                     "gives at least one expert)", e.top_k(), rp, r.group_topk()));
    }
    if (e.top_k() > reachable) {
      return Invalid(absl::StrFormat(
          "model.moe.top_k: %d is more than the %d experts in the best %s.group_topk = %d "
          "groups", e.top_k(), reachable, rp, r.group_topk()));
    }
  } else if (r.group_topk() != 0) {
    return Invalid(absl::StrFormat("%s.group_topk: %d needs %s.num_groups > 0", rp,
                                   r.group_topk(), rp));
  }
  if (r.type() == Router::EXPERT_CHOICE && r.capacity_factor() <= 0) {
    return Invalid(absl::StrFormat(
        "%s.capacity_factor: %g must be > 0 for expert-choice routing (each expert picks "
        "capacity tokens)", rp, r.capacity_factor()));
  }
  if (r.pad_to_capacity() && r.capacity_factor() <= 0) {
    return Invalid(absl::StrFormat(
        "%s.pad_to_capacity: needs %s.capacity_factor > 0 (dropless routing has no capacity)",
        rp, rp));
  }
  if (r.type() == Router::TOKEN_CHOICE && e.top_k() == 1) {
    // One weight normalised over the one chosen expert is 1 for every token: the task loss
    // would never reach the gate (Megatron-Core refuses this too).
    const char* field = r.normalize_topk() ? "normalize_topk: true"
                        : (r.score() == Router::SOFTMAX && !r.pre_softmax()) ? "pre_softmax: false" : nullptr;
    if (field != nullptr) {
      return Invalid(absl::StrFormat("%s.%s with model.moe.top_k = 1 gives every token the weight 1, so the "
                                     "router learns nothing from the task loss", rp, field));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateParallelVsModel(const Parallel& p, const groups::Layout& l, const Model& m) {
  SY_RETURN_IF_ERROR(Divides("parallel.ep", l.ep(), "model.moe.num_experts", m.moe().num_experts()));
  SY_RETURN_IF_ERROR(Divides("parallel.etp", l.etp(), "model.moe.ffn_hidden_size", m.moe().ffn_hidden_size()));
  SY_RETURN_IF_ERROR(Divides("parallel.tp", l.tp(), "model.num_heads", m.num_heads()));
  SY_RETURN_IF_ERROR(Divides("parallel.tp", l.tp(), "model.hidden_size", m.hidden_size()));
  SY_RETURN_IF_ERROR(Divides("parallel.tp", l.tp(), "model.ffn_hidden_size", m.ffn_hidden_size()));
  SY_RETURN_IF_ERROR(Divides("parallel.pp", l.pp(), "model.num_layers", m.num_layers()));
  SY_RETURN_IF_ERROR(Divides("parallel.cp", l.cp(), "model.seq_len", m.seq_len()));
  if (p.sequence_parallel()) {
    SY_RETURN_IF_ERROR(Divides("parallel.tp (with parallel.sequence_parallel)", l.tp(),
                               "model.seq_len / parallel.cp", m.seq_len() / l.cp()));
  }
  return absl::OkStatus();
}

absl::Status ValidateTrain(const Train& t, const groups::Layout& l, ResolvedJob& out) {
  SY_RETURN_IF_ERROR(AtLeast("train.steps", t.steps(), 1));
  SY_RETURN_IF_ERROR(AtLeast("train.global_batch_size", t.global_batch_size(), 1));
  SY_RETURN_IF_ERROR(AtLeast("train.micro_batch_size", t.micro_batch_size(), 0));
  const int dp = l.dp();
  if (t.global_batch_size() % dp != 0) {
    return Invalid(absl::StrFormat(
        "train.global_batch_size: %d is not divisible by the data-parallel size %d",
        t.global_batch_size(), dp));
  }
  const int per_rank = t.global_batch_size() / dp;
  out.micro_batch_size = t.micro_batch_size() == 0 ? per_rank : t.micro_batch_size();
  if (per_rank % out.micro_batch_size != 0) {
    return Invalid(absl::StrFormat(
        "train.micro_batch_size: %d does not divide train.global_batch_size / dp = %d / %d = %d",
        out.micro_batch_size, t.global_batch_size(), dp, per_rank));
  }
  out.grad_accumulation_steps = per_rank / out.micro_batch_size;
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.lr", t.lr(), 0, true));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.min_lr", t.min_lr(), 0, false));
  if (t.min_lr() > t.lr()) {
    return Invalid(absl::StrFormat("train.min_lr: %g is above train.lr = %g", t.min_lr(), t.lr()));
  }
  SY_RETURN_IF_ERROR(AtLeast("train.warmup_steps", t.warmup_steps(), 0));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.weight_decay", t.weight_decay(), 0, false));
  for (auto [path, v] : {std::pair<const char*, float>{"train.adam_beta1", t.adam_beta1()},
                         {"train.adam_beta2", t.adam_beta2()}}) {
    if (!(v >= 0 && v < 1)) {
      return Invalid(absl::StrFormat("%s: %g must be in [0, 1)", path, v));
    }
  }
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.adam_eps", t.adam_eps(), 0, true));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.momentum", t.momentum(), 0, false));
  SY_RETURN_IF_ERROR(InRange("train.zero_stage", t.zero_stage(), 0, 2));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.clip_grad", t.clip_grad(), 0, false));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.grad_norm_type", t.grad_norm_type(), 0, false));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.loss_scale", t.loss_scale(), 0, false));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.initial_loss_scale", t.initial_loss_scale(), 0, true));
  SY_RETURN_IF_ERROR(AtLeast("train.loss_scale_window", t.loss_scale_window(), 1));
  SY_RETURN_IF_ERROR(FiniteAtLeast("train.min_loss_scale", t.min_loss_scale(), 0, true));
  return absl::OkStatus();
}

absl::Status ValidateData(const Data& d, const Model& m) {
  if (d.source() == Data::SYNTHETIC) {
    if (d.text_files_size() > 0) {
      return Invalid("data.text_files: given, but data.source is SYNTHETIC (set source: TEXT_FILES)");
    }
    return absl::OkStatus();
  }
  if (d.text_files_size() == 0) {
    return Invalid("data.text_files: data.source is TEXT_FILES but no file is listed");
  }
  if (m.vocab_size() < 256) {
    return Invalid(absl::StrFormat(
        "model.vocab_size: %d is too small for byte-level text (data.source: TEXT_FILES needs 256)",
        m.vocab_size()));
  }
  for (int i = 0; i < d.text_files_size(); ++i) {
    const std::string& f = d.text_files(i);
    std::ifstream in(f, std::ios::binary | std::ios::ate);
    if (!in) {
      return absl::NotFoundError(absl::StrFormat(
          "data.text_files[%d]: \"%s\" cannot be opened (%s)", i, f, std::strerror(errno)));
    }
    if (in.tellg() <= 0) {
      return Invalid(absl::StrFormat("data.text_files[%d]: \"%s\" is empty", i, f));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateCheckpoint(const Checkpoint& c) {
  SY_RETURN_IF_ERROR(AtLeast("checkpoint.interval", c.interval(), 0));
  SY_RETURN_IF_ERROR(AtLeast("checkpoint.keep", c.keep(), 1));
  if ((c.interval() > 0 || c.resume()) && c.dir().empty()) {
    return Invalid(absl::StrFormat("checkpoint.dir: empty, but %s",
                                   c.resume() ? "checkpoint.resume is true"
                                              : "checkpoint.interval > 0 asks for saves"));
  }
  return absl::OkStatus();
}

// Far above any real job, low enough that sizes and rank products stay in int range.
constexpr int kMaxNodes = 65536;
constexpr int kMaxProcsPerNode = 1024;
constexpr int64_t kMaxWorld = 1 << 20;

absl::Status ValidateLaunch(const Launch& l) {
  SY_RETURN_IF_ERROR(InRange("launch.nnodes", l.nnodes(), 1, kMaxNodes));
  SY_RETURN_IF_ERROR(InRange("launch.nproc_per_node", l.nproc_per_node(), 1, kMaxProcsPerNode));
  if (int64_t{l.nnodes()} * l.nproc_per_node() > kMaxWorld) {
    return Invalid(absl::StrFormat(
        "launch: nnodes × nproc_per_node = %d × %d is more than %d ranks", l.nnodes(),
        l.nproc_per_node(), kMaxWorld));
  }
  SY_RETURN_IF_ERROR(InRange("launch.node_rank", l.node_rank(), 0, l.nnodes() - 1));
  SY_RETURN_IF_ERROR(InRange("launch.master_port", l.master_port(), 0, 65535));
  if (l.master_port() == 0 && l.nnodes() > 1) {
    return Invalid("launch.master_port: 0 (any free port) works on one node only; with "
                   "launch.nnodes > 1 every node must know the port");
  }
  if (l.master_addr().empty()) return Invalid("launch.master_addr: must not be empty");
  SY_RETURN_IF_ERROR(AtLeast("launch.rendezvous_timeout_s", l.rendezvous_timeout_s(), 1));
  SY_RETURN_IF_ERROR(AtLeast("launch.collective_timeout_s", l.collective_timeout_s(), 1));
  SY_RETURN_IF_ERROR(AtLeast("launch.max_restarts", l.max_restarts(), 0));
  SY_RETURN_IF_ERROR(InRange("launch.threads_per_rank", l.threads_per_rank(), 0, 1024));
  if (l.backend() == Launch::NCCL) {
    if (absl::Status st = groups::NcclAvailable(); !st.ok()) {
      return Invalid(absl::StrCat("launch.backend: ", st.message(), "; or use GLOO"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Job> ParseJob(absl::string_view text, absl::string_view source) {
  Job job;
  Collector collector(text, source);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&collector);
  if (!parser.ParseFromString(std::string(text), &job)) {
    return Invalid(collector.first().empty() ? absl::StrCat(source, ": not a valid job spec")
                                             : collector.first());
  }
  return job;
}

absl::StatusOr<ResolvedJob> ValidateJob(const Job& job, int world_size) {
  SY_RETURN_IF_ERROR(ValidateLaunch(job.launch()));
  SY_RETURN_IF_ERROR(ValidateModel(job.model()));
  if (world_size <= 0) world_size = job.launch().nnodes() * job.launch().nproc_per_node();
  if (world_size > kMaxWorld) {
    return Invalid(absl::StrFormat("world size %d is more than %d ranks", world_size, kMaxWorld));
  }
  const Parallel& p = job.parallel();
  groups::LayoutSpec spec{.world_size = world_size, .tp = p.tp(), .cp = p.cp(), .pp = p.pp(),
                          .dp = p.dp(), .ep = p.ep(), .etp = p.etp(), .order = p.order()};
  SY_ASSIGN_OR_RETURN(groups::Layout layout, groups::Layout::Create(spec));
  ResolvedJob out{job, std::move(layout), world_size};
  SY_RETURN_IF_ERROR(ValidateParallelVsModel(p, out.layout, job.model()));
  SY_RETURN_IF_ERROR(ValidateTrain(job.train(), out.layout, out));
  SY_RETURN_IF_ERROR(ValidateData(job.data(), job.model()));
  SY_RETURN_IF_ERROR(ValidateCheckpoint(job.checkpoint()));
  const MoE& e = job.model().moe();
  for (int l = 0; l < job.model().num_layers(); ++l) {
    const bool listed = std::find(e.layers().begin(), e.layers().end(), l) != e.layers().end();
    if (e.layers_size() > 0 ? listed : (e.every_n() > 0 && l % e.every_n() == 0)) {
      out.moe_layers.push_back(l);
    }
  }
  if (!out.moe_layers.empty() && out.layout.cp() > 1) {
    // A block of an MoE layer is then the CP ranks' chunks one after another, each a chunk
    // of every sequence: not the tokens in their order (moe/moe_layer.h).
    const Router& r = e.router();
    const bool token_choice = r.type() == Router::TOKEN_CHOICE;
    if (token_choice && r.aux_loss() == Router::AUX_SEQUENCE && r.aux_loss_coeff() > 0) {
      return Invalid(absl::StrFormat(
          "model.moe.router.aux_loss: AUX_SEQUENCE with parallel.cp = %d is not supported (each CP rank holds a "
          "chunk of every sequence); use AUX_BATCH or AUX_GLOBAL", out.layout.cp()));
    }
    if (token_choice && r.capacity_factor() > 0 && r.drop_policy() == Router::DROP_BY_POSITION) {
      return Invalid(absl::StrFormat(
          "model.moe.router.drop_policy: DROP_BY_POSITION with parallel.cp = %d is not supported (the CP ranks' "
          "chunks are not the tokens' order); use DROP_BY_SCORE", out.layout.cp()));
    }
  }
  return out;
}

absl::StatusOr<ResolvedJob> LoadJob(const std::string& path, int world_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrFormat("--spec: \"%s\" cannot be opened (%s)", path, std::strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  SY_ASSIGN_OR_RETURN(Job job, ParseJob(text.str(), path));
  return ValidateJob(job, world_size);
}

}  // namespace switchyard::launcher
