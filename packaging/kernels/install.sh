#!/usr/bin/env bash
# Installs the Jupyter kernels that guestd's kernel bridge (port 49999) launches.
#
# Idempotent: running it again only fills in what is missing and rewrites the files
# this project owns. Needs root, apt, PyPI and the npm registry; nothing else.
#
#   GUESTD_PREFIX          install root (default /opt/guestd)
#   GUESTD_KERNEL_LANGS    languages to install (default "python bash javascript r java")
#   GUESTD_PYTHON          interpreter for the venv (default /usr/bin/python3, else python3)
#   GUESTD_SKIP_APT=1      do not call apt-get (the system packages must already be there)
#   GUESTD_SKIP_FONTS=1    do not install the Noto CJK fonts
#   GUESTD_KERNEL_PROFILE  lean (default) or template:
#                          lean      requirements.txt: the kernel machinery and the core data
#                                    stack (numpy, pandas, matplotlib, pillow); what the host
#                                    CI installs
#                          template  requirements-template.txt: lean plus the reference
#                                    code-interpreter template's package set, and the system
#                                    libraries those packages load (libGL for OpenCV,
#                                    Chromium for plotly's static export through kaleido)
#   GUESTD_KERNEL_OWNER    account that owns the Python venv (default: `user` when that
#                          account exists, else root), so that `pip install` run by the
#                          sandbox's default user installs into the kernels' environment
#   GUESTD_PROFILE_D       where to put the login-shell PATH snippet that puts the venv's
#                          python3/pip first (default /etc/profile.d; empty: do not write it)
#
# Layout (everything guestd-specific lives under the prefix):
#   $PREFIX/python                          venv: ipykernel + data libraries + bash_kernel + jjava
#   $PREFIX/python/share/jupyter/kernels/   the kernelspecs (python3, bash, deno, ir, java);
#                                           guestd searches this directory by default
#   $PREFIX/ipython/profile_default/        IPython config + startup files (only kernels
#                                           started from the python3 kernelspec here use them,
#                                           through IPYTHONDIR in the kernelspec env)
#   $PREFIX/matplotlib/matplotlibrc         pointed to by MATPLOTLIBRC in the same env
#   $PREFIX/node                            npm prefix holding deno (JavaScript/TypeScript)
#   $GUESTD_PROFILE_D/guestd-kernels.sh     login shells (the SDKs' commands run `bash -l`):
#                                           $PREFIX/python/bin first on PATH
set -euo pipefail

PREFIX=${GUESTD_PREFIX:-/opt/guestd}
LANGS=${GUESTD_KERNEL_LANGS:-"python bash javascript r java"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$PREFIX/python
SPECS=$VENV/share/jupyter/kernels
DENO_VERSION=2.9.6
PROFILE=${GUESTD_KERNEL_PROFILE:-lean}
case "$PROFILE" in
    lean) REQUIREMENTS=$HERE/requirements.txt ;;
    template) REQUIREMENTS=$HERE/requirements-template.txt ;;
    *)
        echo "GUESTD_KERNEL_PROFILE must be lean or template, not '$PROFILE'" >&2
        exit 2
        ;;
esac
if [ -n "${GUESTD_KERNEL_OWNER:-}" ]; then
    OWNER=$GUESTD_KERNEL_OWNER
elif id user >/dev/null 2>&1; then
    OWNER=user
else
    OWNER=root
fi
PROFILE_D=${GUESTD_PROFILE_D-/etc/profile.d}

log() { printf '[guestd-kernels] %s\n' "$*" >&2; }
want() { case " $LANGS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

apt_install() {
    [ "${GUESTD_SKIP_APT:-0}" = 1 ] && return 0
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    if [ -z "${GUESTD_APT_UPDATED:-}" ]; then
        apt-get update -qq
        GUESTD_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- system packages ----------------------------------------------------------------
pkgs=(ca-certificates)
if [ -z "${GUESTD_PYTHON:-}" ] && [ ! -x /usr/bin/python3 ]; then pkgs+=(python3); fi
pkgs+=(python3-venv)
# Deno runs on its own; npm is only needed to fetch the package that ships its binary.
want javascript && ! command -v npm >/dev/null && pkgs+=(npm)
want r && pkgs+=(r-base-core r-cran-irkernel)
want java && ! command -v javac >/dev/null && pkgs+=(openjdk-17-jdk-headless)
[ "${GUESTD_SKIP_FONTS:-0}" = 1 ] || pkgs+=(fonts-noto-cjk)
# Shared libraries that template packages load at import or use: opencv-python needs
# libGL and GLib; kaleido (plotly's static image export) drives a Chromium.
[ "$PROFILE" = template ] && pkgs+=(libgl1 libglib2.0-0 chromium)
apt_install "${pkgs[@]}"

PYTHON=${GUESTD_PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=$(command -v python3); fi
fi

# --- Python venv ----------------------------------------------------------------------
mkdir -p "$PREFIX"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV from $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
reqs=("-r" "$REQUIREMENTS")
want java && reqs+=("jjava==1.0a8")
log "pip install, profile $PROFILE (venv $VENV)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${reqs[@]}"

# --- IPython profile, startup files and matplotlib config -------------------------------
log "IPython profile and matplotlibrc"
rm -rf "$PREFIX/ipython.new"
mkdir -p "$PREFIX/ipython.new/profile_default/startup"
cp "$HERE/ipython/profile_default/ipython_kernel_config.py" "$PREFIX/ipython.new/profile_default/"
cp "$HERE"/ipython/profile_default/startup/*.py "$PREFIX/ipython.new/profile_default/startup/"
rm -rf "$PREFIX/ipython"
mv "$PREFIX/ipython.new" "$PREFIX/ipython"
mkdir -p "$PREFIX/matplotlib"
cp "$HERE/matplotlib/matplotlibrc" "$PREFIX/matplotlib/matplotlibrc"

# --- kernelspecs ------------------------------------------------------------------------
mkdir -p "$SPECS"
write_spec() { # name json
    mkdir -p "$SPECS/$1"
    printf '%s\n' "$2" >"$SPECS/$1/kernel.json.tmp"
    mv "$SPECS/$1/kernel.json.tmp" "$SPECS/$1/kernel.json"
}

if want python; then
    log "kernelspec python3"
    # Copy ipykernel's logos, then replace its kernel.json with ours (env points the
    # kernel at this project's IPython profile and matplotlib config).
    "$VENV/bin/python" -m ipykernel install --prefix "$VENV" --name python3 >/dev/null
    write_spec python3 "{
  \"argv\": [\"$VENV/bin/python\", \"-m\", \"ipykernel_launcher\", \"-f\", \"{connection_file}\"],
  \"display_name\": \"Python 3 (guestd)\",
  \"language\": \"python\",
  \"interrupt_mode\": \"signal\",
  \"env\": {
    \"PATH\": \"$VENV/bin:\${PATH}\",
    \"IPYTHONDIR\": \"$PREFIX/ipython\",
    \"MATPLOTLIBRC\": \"$PREFIX/matplotlib/matplotlibrc\",
    \"PYDEVD_DISABLE_FILE_VALIDATION\": \"1\"
  },
  \"metadata\": {\"debugger\": false}
}"
    # Byte-compile the startup files' imports once so the first kernel start is fast.
    "$VENV/bin/python" -c "import pandas, matplotlib, PIL, orjson, e2b_charts" >/dev/null 2>&1 || true
fi

if want bash; then
    log "kernelspec bash"
    "$VENV/bin/python" -m bash_kernel.install --prefix "$VENV" >/dev/null
    # Its commands (`pip install x`, `python3 script.py`) use the kernel venv, as in
    # the Python kernel (guestd expands ${PATH} from the environment the kernel gets).
    "$VENV/bin/python" - "$SPECS/bash/kernel.json" "$VENV/bin" <<'PY'
import json, sys
path, bindir = sys.argv[1], sys.argv[2]
with open(path) as f:
    spec = json.load(f)
spec.setdefault("env", {})["PATH"] = bindir + ":${PATH}"
with open(path + ".tmp", "w") as f:
    json.dump(spec, f, indent=1)
    f.write("\n")
PY
    mv "$SPECS/bash/kernel.json.tmp" "$SPECS/bash/kernel.json"
fi

if want javascript; then
    # Deno's built-in Jupyter kernel serves both JavaScript and TypeScript contexts: ESM
    # imports (including bare Node built-ins such as 'fs'), top-level await whose value
    # becomes the cell's result, TypeScript syntax, and `process`/`require` compatibility.
    # The npm package `deno` ships the binary (through a platform-specific dependency).
    log "deno $DENO_VERSION (npm, prefix $PREFIX/node)"
    if [ "$("$PREFIX/node/node_modules/.bin/deno" --version 2>/dev/null | head -1 | cut -d' ' -f2)" != "$DENO_VERSION" ]; then
        mkdir -p "$PREFIX/node"
        npm install --silent --no-audit --no-fund --prefix "$PREFIX/node" "deno@$DENO_VERSION" >/dev/null
    fi
    write_spec deno "{
  \"argv\": [\"$PREFIX/node/node_modules/.bin/deno\", \"jupyter\", \"--kernel\", \"--conn\", \"{connection_file}\"],
  \"display_name\": \"Deno (JavaScript/TypeScript)\",
  \"language\": \"typescript\",
  \"interrupt_mode\": \"signal\",
  \"env\": {
    \"PATH\": \"$VENV/bin:\${PATH}\",
    \"DENO_TLS_CA_STORE\": \"mozilla,system\",
    \"DENO_NO_UPDATE_CHECK\": \"1\",
    \"DENO_NO_PROMPT\": \"1\",
    \"NO_COLOR\": \"1\"
  }
}"
fi

if want r; then
    log "kernelspec ir"
    # installspec() shells out to `jupyter kernelspec install`; the venv has it.
    PATH="$VENV/bin:$PATH" R --quiet --no-save -e \
        "IRkernel::installspec(name = 'ir', displayname = 'R', user = FALSE, prefix = '$VENV')" >/dev/null
fi

if want java; then
    # jjava's wheel already put its kernelspec (java) into $SPECS.
    log "kernelspec java (jjava) -> $(command -v java || echo 'java missing')"
fi

# --- who may install packages, and which python3/pip a login shell finds -------------------
# The sandbox's default user installs packages with plain `pip install x` (a command, or
# `!pip` in a kernel): the venv belongs to that account, and login shells (the SDKs run
# commands with `bash -l`) find the venv's python3 and pip first. Kernels run as root and
# can write there too.
if [ "$OWNER" != root ]; then
    log "venv owner: $OWNER"
    chown -R "$OWNER:" "$VENV"
fi
if [ -n "$PROFILE_D" ]; then
    mkdir -p "$PROFILE_D"
    cat >"$PROFILE_D/guestd-kernels.sh.tmp" <<EOF
# Written by guestd's packaging/kernels/install.sh: the kernels' Python environment
# (python3, pip and the data stack) first on PATH for login shells.
case ":\$PATH:" in
    *":$VENV/bin:"*) ;;
    *) PATH="$VENV/bin:\$PATH"; export PATH ;;
esac
EOF
    mv "$PROFILE_D/guestd-kernels.sh.tmp" "$PROFILE_D/guestd-kernels.sh"
fi

log "profile $PROFILE; kernelspecs in $SPECS: $(ls "$SPECS" | tr '\n' ' ')"
