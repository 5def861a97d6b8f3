#!/usr/bin/env bash
# Install without a compiler (issue 19): the README's command 2 on a machine with no C/C++
# compiler must work, so every dependency has to come as a wheel.
#
#   bash benchmarks/install_check.sh            # from anywhere; works on the repo it lives in
#   KEEP=1 bash benchmarks/install_check.sh     # keep the temp dir (venv, pip logs, reports)
#
# What it does, in a fresh venv in a temp dir:
#   - puts first on PATH a directory of shims (cc, gcc, g++, c++, clang, clang++,
#     x86_64-linux-gnu-gcc, x86_64-linux-gnu-g++) that print "no compiler on this machine"
#     and exit 1, and exports CC=false CXX=false, so any source build fails loudly;
#   - runs the install part of the README's command 2,
#       pip install torch==2.13.0 && pip install -e ".[test]"
#     with --only-binary :all: added to both (pip applies it to the dependencies it picks
#     from an index and to the build requirements of the project, setuptools; the project
#     itself is a local directory, which pip builds as an editable whatever the option, and
#     that build is pure Python: no compiler);
#   - imports pumap_dask, usearch and pynndescent, and runs tests/test_layers.py.
# Prints PASS/FAIL per step, the packages installed and whether each came as a wheel
# (from pip's --report), and exits non-zero on the first failure.
# pip may use its cache and this machine's pip configuration (index, find-links).
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pumap_install_check.XXXXXX")"
if [ "${KEEP:-0}" = "1" ]; then
    echo "work dir (kept): $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
START=$(date +%s)

step() {  # step NAME LOG CMD...: run CMD, log to LOG, print PASS/FAIL, stop on failure
    local name="$1" log="$2"
    shift 2
    local t0=$(date +%s)
    if "$@" >"$log" 2>&1; then
        echo "PASS  $name ($(( $(date +%s) - t0 ))s)"
    else
        echo "FAIL  $name ($(( $(date +%s) - t0 ))s); last lines of $log:"
        tail -n 30 "$log" | sed 's/^/      /'
        grep -iE "no matching distribution|could not find a version|building wheel for|no compiler on this machine" "$log" \
            | sort -u | head -n 20 | sed 's/^/      >> /'
        echo "FAIL  overall after $(( $(date +%s) - START ))s"
        exit 1
    fi
}

# the compiler shims
SHIMS="$WORK/shims"
mkdir -p "$SHIMS"
for c in cc gcc g++ c++ clang clang++ x86_64-linux-gnu-gcc x86_64-linux-gnu-g++; do
    printf '#!/bin/sh\necho "no compiler on this machine" >&2\nexit 1\n' >"$SHIMS/$c"
    chmod +x "$SHIMS/$c"
done
export PATH="$SHIMS:$PATH"
export CC=false CXX=false
if gcc --version >/dev/null 2>&1 || cc --version >/dev/null 2>&1; then
    echo "FAIL  shims: a real compiler still answers"; exit 1
fi
echo "PASS  shims: cc/gcc/g++/clang... answer 'no compiler on this machine'; CC=false CXX=false"

step "venv ($PY -m venv)" "$WORK/venv.log" "$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

step "pip install --only-binary :all: torch==2.13.0" "$WORK/pip_torch.log" \
    "$VPY" -m pip install --only-binary :all: --report "$WORK/report_torch.json" torch==2.13.0

cd "$REPO" || exit 1
step "pip install --only-binary :all: -e \".[test]\"" "$WORK/pip_project.log" \
    "$VPY" -m pip install --only-binary :all: --report "$WORK/report_project.json" -e ".[test]"

# which packages came as wheels (everything but the project itself should)
"$VPY" - "$WORK/report_torch.json" "$WORK/report_project.json" <<'EOF'
import json, sys
rows, sdists = [], []
for path in sys.argv[1:]:
    for item in json.load(open(path)).get("install", []):
        meta, info = item["metadata"], item.get("download_info", {})
        url = info.get("url", "")
        if "dir_info" in info:
            kind = "local directory (editable)" if info["dir_info"].get("editable") else "local directory"
        elif url.endswith(".whl"):
            kind = "wheel " + url.rsplit("/", 1)[-1]
        else:
            kind = "SOURCE " + url.rsplit("/", 1)[-1]
            sdists.append(f"{meta['name']} {meta['version']}")
        rows.append(f"{meta['name']}=={meta['version']}: {kind}")
print(f"      installed {len(rows)} packages:")
for r in sorted(rows, key=str.lower):
    print("        " + r)
print("      from source (not wheels): " + (", ".join(sdists) or "none"))
EOF
if grep -q "Building wheel for" "$WORK/pip_torch.log" "$WORK/pip_project.log"; then
    echo "      pip built wheels for: $(grep -ho 'Building wheel for [^ ]*' "$WORK/pip_torch.log" "$WORK/pip_project.log" | sed 's/Building wheel for //' | sort -u | tr '\n' ' ')"
fi

step "python -c 'import pumap_dask, usearch, pynndescent'" "$WORK/import.log" \
    "$VPY" -c "import pumap_dask, usearch, pynndescent; print(pumap_dask.__file__)"

step "python -m pytest -q -x tests/test_layers.py" "$WORK/pytest.log" \
    "$VPY" -m pytest -q -x -p no:cacheprovider tests/test_layers.py
echo "      $(tail -n 1 "$WORK/pytest.log")"

echo "PASS  overall in $(( $(date +%s) - START ))s"
