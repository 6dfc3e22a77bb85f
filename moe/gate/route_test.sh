#!/usr/bin/env bash
# //moe/gate:route end to end.
#
# 1. Runs the tool on testdata/route_input.safetensors with each case of route_cases.txt and
#    has route_check compare every output tensor and the metadata with the case's expected
#    values in route_expected.safetensors: Megatron-Core 0.16.1's routing, dropping and loss
#    functions (expert choice: plain torch), made by tests/oracles/make_route_fixture.py.
# 2. Relative paths under `bazel run` (BUILD_WORKING_DIRECTORY) and the "--flag value" form.
# 3. Bad flags and bad or corrupt inputs: exit 2, exactly one "error: ..." line naming the
#    problem, and no output file; an unwritable output: exit 1.
set -uo pipefail

ROOT="${TEST_SRCDIR}/${TEST_WORKSPACE}"
ROUTE="$ROOT/moe/gate/route"
CHECK="$ROOT/moe/gate/route_check"
DATA="$ROOT/moe/gate/testdata"
IN="$DATA/route_input.safetensors"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
# Outputs land where Bazel keeps them (test.outputs/outputs.zip), for reading by hand.
OUT="${TEST_UNDECLARED_OUTPUTS_DIR:-$TMP}"
failures=0
checks=0

fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { checks=$((checks + 1)); echo "ok: $*"; }

# --- 1. every case against the expected values --------------------------------------------
cases=0
while IFS='|' read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  cases=$((cases + 1))
  # $flags is a list of words on purpose.
  # shellcheck disable=SC2086
  if ! "$ROUTE" --input="$IN" --output="$OUT/$name.safetensors" $flags >"$TMP/$name.out" 2>"$TMP/$name.err"; then
    fail "$name: route exited non-zero: $(cat "$TMP/$name.err")"
    continue
  fi
  if "$CHECK" "$OUT/$name.safetensors" "$DATA/route_expected.safetensors" "$name"; then
    ok "$name matches"
  else
    fail "$name: output differs from the expected values"
  fi
done < "$DATA/route_cases.txt"
[[ $cases -ge 4 ]] || fail "only $cases cases in route_cases.txt"
grep -qF "routed 32 tokens to 8 experts (token_choice, capacity 8): 8 slot(s) dropped, aux_loss 0.0105" \
  "$TMP/softmax_capacity.out" || fail "summary line: $(cat "$TMP/softmax_capacity.out")"

# --- 2. relative paths from BUILD_WORKING_DIRECTORY, "--flag value" ---------------------------
mkdir -p "$TMP/work" && cp "$IN" "$TMP/work/in.safetensors"
if (cd / && BUILD_WORKING_DIRECTORY="$TMP/work" "$ROUTE" --input in.safetensors --output out.safetensors \
      --top_k 2 --capacity_factor 1 --drop_policy score --aux_loss_coeff 0.01 --z_loss_coeff 0.001 \
      >"$TMP/relative.out" 2>"$TMP/relative.err") &&
   "$CHECK" "$TMP/work/out.safetensors" "$DATA/route_expected.safetensors" softmax_capacity >/dev/null; then
  ok "relative paths and --flag value"
else
  fail "relative paths: $(cat "$TMP/relative.err")"
fi

# min_capacity lifts the capacity (32 tokens × 2 / 8 experts × 0.5 = 4) to 32 = every token: nothing drops.
if "$ROUTE" --input="$IN" --output="$TMP/min_capacity.safetensors" --capacity_factor=0.5 --min_capacity=32 \
      --weight_norm=topk --drop_policy=choice_then_position >"$TMP/min_capacity.out" 2>&1 &&
   grep -qF "(token_choice, capacity 32): 0 slot(s) dropped" "$TMP/min_capacity.out"; then
  ok "--min_capacity, --weight_norm and --drop_policy=choice_then_position reach the router"
else
  fail "min_capacity: $(cat "$TMP/min_capacity.out")"
fi

if "$ROUTE" --help >"$TMP/help.out" 2>&1 && grep -qF "usage: route --input=" "$TMP/help.out"; then
  ok "--help"
else
  fail "--help"
fi

# --- 3. errors ---------------------------------------------------------------------------------
# expect_error NAME FRAGMENT ARGS...: exit 2, one stderr line "error: ..." holding FRAGMENT,
# and nothing written to $TMP/NAME.safetensors (the output every call names).
expect_error() {
  local name=$1 fragment=$2
  shift 2
  "$ROUTE" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err"
  local rc=$?
  local err
  err=$(cat "$TMP/$name.err")
  if [[ $rc != 2 ]]; then
    fail "$name: exit $rc, want 2 (stderr: $err)"
  elif [[ $(wc -l <"$TMP/$name.err") != 1 || "$err" != "error: "* ]]; then
    fail "$name: stderr is not one \"error: \" line: $err"
  elif [[ "$err" != *"$fragment"* ]]; then
    fail "$name: stderr lacks \"$fragment\": $err"
  elif [[ -e "$TMP/$name.safetensors" ]]; then
    fail "$name: wrote an output anyway"
  else
    ok "$name: $err"
  fi
}

# st_file PATH HEADER [DATA]: a safetensors file with HEADER (under 256 bytes) and DATA (a
# printf format of octal escapes).
st_file() {
  printf "\\$(printf '%03o' "${#2}")\\000\\000\\000\\000\\000\\000\\000" >"$1"
  printf '%s' "$2" >>"$1"
  printf "${3:-}" >>"$1"
}

run() { local name=$1; shift; expect_error "$name" "$1" --output="$TMP/$name.safetensors" "${@:2}"; }

# Flags.
run unknown_flag "unknown flag --topk (see --help)" --input="$IN" --topk=2
run positional "unexpected argument \"extra\"" --input="$IN" extra
run no_input "--input is required" --top_k=2
run repeated_flag "--top_k is given more than once" --input="$IN" --top_k=2 --top_k=3
run bad_int "--top_k=two: not an integer" --input="$IN" --top_k=two
run bad_enum "--score=relu: expected one of softmax, sigmoid" --input="$IN" --score=relu
run bad_norm "--weight_norm=l2: expected one of sigmoid_topk, none, topk, kept" --input="$IN" --weight_norm=l2
run bad_bool "--pre_softmax=yes: expected true or false" --input="$IN" --pre_softmax=yes
run nan_factor "--capacity_factor=nan: not a finite number" --input="$IN" --capacity_factor=nan
run missing_value "--top_k needs a value" --input="$IN" --top_k
run negative_coeff "--aux_loss_coeff and --z_loss_coeff must be >= 0" --input="$IN" --z_loss_coeff=-1
run expert_choice_top_k "--top_k does not apply to --routing=expert_choice" --input="$IN" \
  --routing=expert_choice --capacity_factor=1 --top_k=2
run expert_choice_aux "--aux_loss applies to token-choice routing only" --input="$IN" \
  --routing=expert_choice --capacity_factor=1 --aux_loss=batch
run unused_coeff "--aux_loss_coeff has no effect without an aux loss" --input="$IN" --aux_loss=none --aux_loss_coeff=0.1
run unused_sequences "--num_sequences applies to --aux_loss=sequence only" --input="$IN" --num_sequences=4
run two_inputs "--logits and --hidden/--weight are two different inputs" --input="$IN" --logits=logits --hidden=hidden

# Files and tensors.
run missing_file "$TMP/nope.safetensors: No such file or directory" --input="$TMP/nope.safetensors"
run missing_tensor "has no tensor \"nope\" (--logits); it has: \"bias\", \"hidden\", \"logits\"" --input="$IN" --logits=nope
run missing_weight "has no tensor \"w\" (--weight)" --input="$IN" --hidden=hidden --weight=w
run wrong_rank "tensor \"bias\" (--logits) has shape [16]; expected [tokens, experts]" --input="$IN" --logits=bias
run bad_dtype "tensor \"token_ids\" (--logits) has dtype I64; expected F32, F16, BF16 or F64" --input="$IN" --logits=token_ids
run hidden_weight_mismatch "tensor \"weight\" (--weight) has shape [8, 16]; expected [experts, 8] to match hidden \"logits\" [32, 8]" \
  --input="$IN" --hidden=logits --weight=weight
run bias_shape "tensor \"bias\" (--expert_bias) has shape [16]; expected [8], one per expert" --input="$IN" --expert_bias=bias
run bias_dtype "tensor \"token_ids\" (--expert_bias) has dtype I64" --input="$IN" --expert_bias=token_ids

# Options the router refuses.
run top_k_too_large "router: top_k = 9 must be between 1 and the number of experts 8" --input="$IN" --top_k=9
run bad_groups "router: num_groups = 3 must divide the 8 experts" --input="$IN" --num_groups=3 --group_topk=1
run pad_dropless "router: pad_to_capacity needs capacity_factor > 0" --input="$IN" --pad_to_capacity
run expert_choice_dropless "expert-choice routing needs capacity_factor > 0" --input="$IN" --routing=expert_choice
run uneven_sequences "router: 32 tokens do not split into 5 sequences" --input="$IN" --aux_loss=sequence --num_sequences=5

# Corrupt or hostile files.
head -c 200 "$IN" >"$TMP/truncated.st"
header_len=$(od -An -tu8 -N8 "$IN" | tr -d ' ')
run truncated "truncated.st: header length $header_len is larger than the 192 bytes after it" --input="$TMP/truncated.st"
head -c "$((8 + header_len + 10))" "$IN" >"$TMP/short_data.st"
run short_data "run past the end of the 10 data bytes" --input="$TMP/short_data.st"
: >"$TMP/empty.st"
run empty_file "file is 0 bytes, shorter than the 8-byte header length" --input="$TMP/empty.st"
echo "not a safetensors file at all" >"$TMP/text.st"
run text_file "is over the 100000000-byte limit" --input="$TMP/text.st"
st_file "$TMP/bad_json.st" '{"logits":{"dtype":"F32",}}'
run bad_json "header is not valid JSON: expected a string key at byte 25" --input="$TMP/bad_json.st"
st_file "$TMP/out_of_range.st" '{"logits":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}' '\000\000\200\077'
run out_of_range "tensor \"logits\": data_offsets [0, 8] run past the end of the 4 data bytes" --input="$TMP/out_of_range.st"
st_file "$TMP/overlap.st" \
  '{"logits":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}' \
  '\000\000\200\077\000\000\200\077\000\000\200\077'
run overlap "tensors \"logits\" [0, 8] and \"x\" [4, 12] overlap" --input="$TMP/overlap.st"
st_file "$TMP/bad_size.st" '{"logits":{"dtype":"F32","shape":[1,2],"data_offsets":[0,4]}}' '\000\000\200\077'
run bad_size "data_offsets [0, 4] hold 4 bytes, but F32 [1, 2] needs 8" --input="$TMP/bad_size.st"
st_file "$TMP/nan.st" '{"logits":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}' '\000\000\300\177\000\000\200\077'
run nan_logits "router: logits contain NaN or inf" --input="$TMP/nan.st"
st_file "$TMP/nan_bias.st" \
  '{"bias":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"logits":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}' \
  '\000\000\200\077\000\000\200\077\000\000\300\177\000\000\200\077'
run nan_bias "tensor \"bias\" (--expert_bias) contains NaN or inf" --input="$TMP/nan_bias.st" --expert_bias=bias
# A tensor name holding a newline (escaped in the JSON) still makes a one-line message.
st_file "$TMP/newline_name.st" '{"a\nb":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}' '\000\000\200\077\000\000\200\077'
run newline_name "has no tensor \"logits\", nor \"hidden\" and \"weight\"; it has: \"a\\nb\"" --input="$TMP/newline_name.st"

# An output that cannot be written: exit 1.
"$ROUTE" --input="$IN" --output="$TMP/no/such/dir/out.safetensors" >"$TMP/unwritable.out" 2>"$TMP/unwritable.err"
rc=$?
if [[ $rc == 1 ]] && grep -qF "error: cannot create $TMP/no/such/dir/out.safetensors: No such file or directory" "$TMP/unwritable.err"; then
  ok "unwritable output: exit 1"
else
  fail "unwritable output: exit $rc, $(cat "$TMP/unwritable.err")"
fi

echo "$checks checks passed, $failures failed"
[[ $failures == 0 ]]
