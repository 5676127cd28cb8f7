#!/usr/bin/env bash
# Install what the project needs, into the project's own files; safe to run again (done work is skipped).
#   scripts/setup.sh          the app: .venv with the package and its dependencies, Fashion-MNIST
#   scripts/setup.sh --test   also the test tools: pytest, Playwright's Python package, Debian's Chromium
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# The PyTorch build this machine keeps on disk; override for other platforms (e.g. TORCH_SPEC="torch torchvision").
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# ---- Debian packages: the Fashion-MNIST idx files, and Chromium for the browser tests.
debs=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || [[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] || debs+=(dataset-fashion-mnist)
if (( want_test )); then
  command -v chromium >/dev/null 2>&1 || debs+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || debs+=(chromium-driver)
fi
if (( ${#debs[@]} )); then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [[ "$(id -u)" != 0 ]] && sudo="sudo"
    say "apt-get install ${debs[*]}"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${debs[@]}" >/dev/null \
      || say "could not install ${debs[*]} (Fashion-MNIST falls back to torchvision's download)"
  else
    say "no apt-get here: Fashion-MNIST will come from torchvision's download (needs the internet)"
  fi
fi

# ---- The virtual environment, reinstalled only when the requirements change.
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.setup-stamp"
extras=$([[ $want_test == 1 ]] && echo "[test]" || echo "")
digest=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC$extras
if [[ -f "$stamp" ]] && grep -qxF -- "$digest" "$stamp"; then
  say "$VENV is up to date"
else
  say "installing Python packages into $VENV"
  # uv installs the same packages in half of pip's time (PyTorch's wheels are large), from the
  # indexes, wheel folders and constraints pip is configured with (pip.conf, PIP_*), choosing among
  # them as pip does; pip installs where uv cannot be had or fails, and says why.
  uv_args=()
  while IFS= read -r line; do
    key=${line%%=*} value=${line#*=}
    value=${value//\'/}
    case "$key" in
      *.extra-index-url) for v in $value; do uv_args+=(--index "$v"); done ;;
      *.index-url) for v in $value; do uv_args+=(--default-index "$v"); done ;;
      *.find-links) for v in $value; do uv_args+=(--find-links "$v"); done ;;
      *.constraint) for v in $value; do uv_args+=(--constraint "$v"); done ;;
    esac
  done < <("$VENV/bin/python" -m pip config list 2>/dev/null)
  uv_log=$(mktemp)
  install() {
    if [[ -x "$VENV/bin/uv" ]] && "$VENV/bin/uv" pip install -q --compile-bytecode --index-strategy unsafe-best-match \
         "${uv_args[@]}" --python "$VENV/bin/python" "$@" 2>"$uv_log"; then
      return
    fi
    [[ -x "$VENV/bin/uv" ]] && say "uv could not install ($(tail -n 1 "$uv_log")): pip instead"
    "$VENV/bin/python" -m pip install -q "$@"
  }
  "$VENV/bin/python" -m pip install -q uv 2>/dev/null || say "no uv: installing with pip"
  [[ -x "$VENV/bin/uv" ]] || "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  install $TORCH_SPEC
  # setuptools' default editable mode: the four packages import from this checkout, and nothing
  # else in it (tests/, bench/, app.py) lands on sys.path by accident.
  install -e ".$extras"
  rm -f "$uv_log"
  echo "$digest" >> "$stamp"
fi
