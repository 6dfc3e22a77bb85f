#!/usr/bin/env bash
# tools/bazel: silent when nothing is missing, installs what is, fails clearly when apt does.
# dpkg-query and apt-get are fakes on PATH; BAZEL_REAL=echo stands for Bazel.
set -uo pipefail
WRAPPER="${TEST_SRCDIR}/${TEST_WORKSPACE}/tools/bazel"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
fake="$TMP/bin"
mkdir -p "$fake"
fail() { echo "FAIL: $*" >&2; exit 1; }

# Packages listed in $TMP/installed count as installed; apt-get records its arguments.
cat > "$fake/dpkg-query" <<'FAKE'
#!/usr/bin/env bash
pkg="${@: -1}"
grep -qx "$pkg" "$FAKE_STATE/installed" && printf 'install ok installed'
exit 0
FAKE
cat > "$fake/apt-get" <<'FAKE'
#!/usr/bin/env bash
echo "$*" >> "$FAKE_STATE/apt.log"
[[ "$1" == update ]] && exit 0
[[ -f "$FAKE_STATE/apt_fails" ]] && { echo "E: Unable to locate package libtorch-dev" >&2; exit 100; }
for p in "$@"; do [[ "$p" == -* || "$p" == install ]] || echo "$p" >> "$FAKE_STATE/installed"; done
FAKE
chmod +x "$fake"/*
export FAKE_STATE="$TMP"
all=$(sed -n '/^readonly SY_PACKAGES=(/,/^)/p' "$WRAPPER" | sed -n 's/^  \([a-z0-9.+-]*\).*/\1/p')
[[ $(echo "$all" | wc -l) -ge 10 ]] || fail "could not read the package list"
run() { PATH="$fake:$PATH" BAZEL_REAL=/bin/echo "$WRAPPER" "$@"; }

# Everything installed: exactly Bazel's output, nothing else, and apt is never called.
echo "$all" > "$TMP/installed"
out=$(run test //... 2>&1) || fail "exit $? with everything installed"
[[ "$out" == "test //..." ]] || fail "not silent: $out"
[[ ! -e "$TMP/apt.log" ]] || fail "apt-get ran although nothing was missing"
echo "ok: silent when nothing is missing"

# Two missing: installs just those, says so on stderr, then runs Bazel.
echo "$all" | grep -vx -e libtorch-dev -e libgloo-dev > "$TMP/installed"
out=$(run build //x 2>"$TMP/err") || fail "exit $? when installing"
[[ "$out" == "build //x" ]] || fail "bazel output wrong: $out"
grep -q 'installing missing Debian packages: libtorch-dev libgloo-dev' "$TMP/err" || fail "no install message: $(cat "$TMP/err")"
grep -q 'install -y -q --no-install-recommends libtorch-dev libgloo-dev$' "$TMP/apt.log" || fail "apt-get args: $(cat "$TMP/apt.log")"
echo "ok: installs exactly the missing packages"

# apt fails: non-zero exit, a message naming the packages and apt's own error, no Bazel.
echo "$all" | grep -vx libtorch-dev > "$TMP/installed"
touch "$TMP/apt_fails"
out=$(run test //... 2>"$TMP/err")
rc=$?
(( rc != 0 )) || fail "exit 0 although apt failed"
[[ -z "$out" ]] || fail "Bazel ran although apt failed: $out"
grep -q 'apt-get failed while installing: libtorch-dev' "$TMP/err" || fail "message: $(cat "$TMP/err")"
grep -q 'Unable to locate package libtorch-dev' "$TMP/err" || fail "apt's error not shown"
echo "ok: apt failure is a clear error (exit $rc)"
echo "3 passed, 0 failed"
