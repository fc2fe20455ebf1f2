#!/usr/bin/env bash
# Run torchlane's C++-heavy tests against the AddressSanitizer + UndefinedBehaviorSanitizer
# build of torchlane._C. Called by `make sanitize` right after it built that extension in place
# (TORCHLANE_SANITIZE=1 TORCHLANE_DEBUG=1, objects in build/sanitize/).
#
#   tools/run_sanitized.sh                    # the default C++-heavy test files
#   tools/run_sanitized.sh tests/test_x.py -k y   # any pytest arguments instead
#
# The in-place build overwrote python/torchlane/_C*.so and python/torchlane/lib/libtorchlane.so
# (the core _C links, Note [One copy of the core] in setup.py) with sanitized ones, which cannot
# even be imported without the ASan runtime preloaded. So this script first
#   1. moves the sanitized _C and libtorchlane.so, with a copy of the Python package, to
#      build/sanitize/pkg/torchlane/;
#   2. restores the normal build in python/torchlane/ (`setup.py build_ext --inplace --force`
#      without the sanitizer flags: a relink of the normal objects, or a full build if there are
#      none);
#   3. runs pytest with build/sanitize/pkg first on the path and the ASan runtime preloaded.
# Run again without a fresh build, it reuses the staged sanitized extension.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
STAGE="$ROOT/build/sanitize/pkg"

is_sanitized() { [[ $(ldd "$1" 2>/dev/null || true) == *libasan* ]]; }

# Puts the sanitized extension $1 and core library $2 into a fresh copy of the Python package
# under $STAGE.
stage_package() {
    local keep
    keep=$(mktemp -d)
    mv "$1" "$keep/"
    mv "$2" "$keep/libtorchlane.so"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    cp -r python/torchlane "$STAGE/"
    rm -f "$STAGE"/torchlane/_C*.so "$STAGE"/torchlane/lib/libtorchlane.so
    find "$STAGE" -name '__pycache__' -prune -exec rm -rf {} +
    mkdir -p "$STAGE/torchlane/lib"
    mv "$keep/libtorchlane.so" "$STAGE/torchlane/lib/"
    mv "$keep"/_C*.so "$STAGE/torchlane/"
    rmdir "$keep"
}

inplace=$(ls python/torchlane/_C*.so 2>/dev/null | head -n 1 || true)
staged=$(ls "$STAGE"/torchlane/_C*.so 2>/dev/null | head -n 1 || true)
if [[ -n "$inplace" ]] && is_sanitized "$inplace" && is_sanitized python/torchlane/lib/libtorchlane.so; then
    stage_package "$inplace" python/torchlane/lib/libtorchlane.so
    echo "run_sanitized: staged the sanitized extension in $STAGE; restoring the normal build"
    env -u TORCHLANE_SANITIZE -u TORCHLANE_DEBUG "$PYTHON" setup.py -q build_ext --inplace --force
elif [[ -n "$staged" ]] && is_sanitized "$staged" && is_sanitized "$STAGE/torchlane/lib/libtorchlane.so"; then
    # the current Python sources with the previously built extension and library
    stage_package "$staged" "$STAGE/torchlane/lib/libtorchlane.so"
else
    echo "run_sanitized: no sanitized torchlane._C found; run \`make sanitize\`" >&2
    exit 2
fi
SO=$(ls "$STAGE"/torchlane/_C*.so | head -n 1)

# The runtimes the extension was linked against (ASan must be loaded before anything else,
# as python itself is not instrumented).
ASAN_RT=$( (ldd "$SO" || true) | awk '/libasan/ {print $3}')
UBSAN_RT=$( (ldd "$SO" || true) | awk '/libubsan/ {print $3}')
export LD_PRELOAD="$ASAN_RT${UBSAN_RT:+ $UBSAN_RT}"
# CPython and torch keep allocations alive until exit by design: leak reports would be noise.
# Reports go to stderr; pytest runs with -s below so that the reports of every process (a spawned
# rank, a test that passed or xfailed) reach the log that is searched afterwards.
ASAN_OPTIONS_BASE="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=99:detect_stack_use_after_return=0:strict_init_order=1"
UBSAN_OPTIONS_BASE="halt_on_error=1:print_stacktrace=1:exitcode=98"
export ASAN_OPTIONS="$ASAN_OPTIONS_BASE${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="$UBSAN_OPTIONS_BASE${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONMALLOC=malloc  # Python objects on the ASan heap too, not in pymalloc arenas
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The staged copy must be the one imported (before python/ and any editable install).
PYTHONPATH="$STAGE:$ROOT/tests" "$PYTHON" - "$STAGE" <<'EOF'
import sys
import torch  # noqa: F401
import torchlane
assert torchlane._C.__file__.startswith(sys.argv[1]), torchlane._C.__file__
with open("/proc/self/maps") as f:
    libs = {line.split()[-1] for line in f if line.rstrip().endswith("/libtorchlane.so")}
assert libs == {sys.argv[1] + "/torchlane/lib/libtorchlane.so"}, libs
print("run_sanitized: torchlane._C =", torchlane._C.__file__, "linking", *libs)
EOF

# Canary: a deliberate heap overflow and signed overflow in a tiny library built the same way
# must be reported under these settings, or a clean run below would prove nothing.
CANARY="$ROOT/build/sanitize/canary"
rm -rf "$CANARY"
mkdir -p "$CANARY"
cat > "$CANARY/canary.c" <<'EOF'
int heap_overflow(int i) {
    int *a = __builtin_malloc(4 * sizeof(int));
    a[0] = 0;
    int v = a[i];
    __builtin_free(a);
    return v;
}
int signed_overflow(int x) { return x + 1; }
EOF
"${CC:-cc}" -shared -fPIC -g -O0 -fsanitize=address,undefined "$CANARY/canary.c" -o "$CANARY/canary.so"
for probe in "heap_overflow(4):99:ERROR: AddressSanitizer" "signed_overflow(2**31 - 1):98:runtime error:"; do
    IFS=: read -r call code pattern <<< "$probe"
    kind=${pattern%%:*}
    set +e
    ASAN_OPTIONS="$ASAN_OPTIONS_BASE" UBSAN_OPTIONS="$UBSAN_OPTIONS_BASE" \
        "$PYTHON" -c "import ctypes; ctypes.CDLL('$CANARY/canary.so').$call" 2> "$CANARY/stderr"
    got=$?
    set -e
    if [[ $got -ne $code ]] || ! grep -q "$pattern" "$CANARY/stderr"; then
        echo "run_sanitized: the $kind canary $call was not reported (exit $got): sanitizers inactive" >&2
        exit 3
    fi
done
echo "run_sanitized: canaries reported as expected (ASan heap overflow, UBSan signed overflow)"

if [[ $# -gt 0 ]]; then
    tests=("$@")
else
    # The tests that exercise the C++ core: reducer, DDP, comm hooks, compression, attention.
    shopt -s nullglob
    tests=(tests/test_reducer*.py tests/test_bucket*.py tests/test_ddp*.py tests/test_hook*.py
        tests/test_comm*.py tests/test_compress*.py tests/test_powersgd*.py tests/test_attention*.py
        tests/test_hostile*.py tests/test_peer_failure*.py tests/test_uneven*.py tests/test_cpp_api*.py)
    shopt -u nullglob
    if [[ ${#tests[@]} -eq 0 ]]; then
        echo "run_sanitized: no C++-heavy test files exist yet; only the import was checked" >&2
        exit 0
    fi
fi

echo "run_sanitized: LD_PRELOAD=$LD_PRELOAD"
echo "run_sanitized: pytest ${tests[*]}"
LOG="$ROOT/build/sanitize/pytest.log"
start=$(date +%s)
set +e
"$PYTHON" -m pytest -q -s -p no:cacheprovider -o "pythonpath=$STAGE $ROOT/tests" "${tests[@]}" 2>&1 |
    tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
echo "run_sanitized: pytest exited with $rc after $(($(date +%s) - start)) s (log: $LOG)"
if grep -q "ERROR: AddressSanitizer" "$LOG"; then
    echo "run_sanitized: AddressSanitizer reported errors (see $LOG)" >&2
    [[ $rc -ne 0 ]] || rc=99
fi
if grep -qE ":[0-9]+:[0-9]+: runtime error:" "$LOG"; then
    echo "run_sanitized: UndefinedBehaviorSanitizer reported errors (see $LOG)" >&2
    [[ $rc -ne 0 ]] || rc=98
fi
[[ $rc -ne 0 ]] || echo "run_sanitized: no sanitizer reports"
exit "$rc"
