#!/usr/bin/env bash
# Install what FREUD needs: Debian packages (as root, or print the command), then the Python environment in
# .venv. Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(ffmpeg festival festvox-us-slt-hts asterisk-core-sounds-en-g722 asterisk-core-sounds-en
              festvox-kallpc16k festvox-kdlpc16k dict-devil dict-jargon
              asterisk-core-sounds-{fr,es,it,ru}-g722 asterisk-core-sounds-{fr,es,it,ru}
              chromium chromium-driver redis-server postgresql)
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "Installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "Missing Debian packages: ${missing[*]}"
    echo "Run as root, then run this again:"
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}"
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# Warnings about missing local index folders are noise from some machines' pip.conf and are filtered out.
quiet() {
  local log status=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || status=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return "$status"
}
stamp=.venv/.freud-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "Installing Python packages into .venv (first time: under a minute with uv, a few with pip)"
  quiet .venv/bin/python -m pip install -q --upgrade pip
  # uv installs the same resolution ~10x faster than pip (22 s against 221 s here). uv does not read pip.conf, so
  # pip's find-links and constraints (where a machine keeps a torch wheel on disk) are passed on; pip is the
  # fallback when uv cannot be had or fails.
  uv_args=()
  for links in $(.venv/bin/python -m pip config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-}; do
    [ -e "$links" ] && uv_args+=(--find-links "$links")
  done
  for constraint in $(.venv/bin/python -m pip config get global.constraint 2>/dev/null) ${PIP_CONSTRAINT:-}; do
    [ -f "$constraint" ] && uv_args+=(--constraint "$constraint")
  done
  if quiet .venv/bin/python -m pip install -q uv &&
     quiet .venv/bin/uv pip install -q --python .venv/bin/python "${uv_args[@]}" -e ".[test]"; then
    :
  else
    echo "uv was not usable; installing with pip"
    quiet .venv/bin/python -m pip install -q -e ".[test]"
  fi
  echo "$want" > "$stamp"
fi

# sae-lens, only to check that SAELens loads our SAE checkpoints as saved (tests/test_sae_interop.py); not a FREUD
# dependency. Installed apart from the venv, without dependency resolution: its requirements would add ~50
# packages (wandb, transformer-lens, ...). These are the ones `import sae_lens` needs that the venv lacks; they
# are put on sys.path after the venv's packages, in a subprocess, so none of our pins is shadowed.
SAE_LENS_DIR=.venv/extras/sae_lens
if [ ! -d "$SAE_LENS_DIR/sae_lens-6.54.12.dist-info" ]; then
  echo "Installing sae-lens 6.54.12 into $SAE_LENS_DIR (interop test only)"
  rm -rf "$SAE_LENS_DIR"
  quiet .venv/bin/python -m pip install -q --no-deps --target "$SAE_LENS_DIR" sae-lens==6.54.12 \
      transformer-lens==3.9.0 transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 datasets==5.2.0 \
      xxhash==4.1.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 einops==0.8.2 better-abc==0.0.3 \
      jaxtyping==0.3.11 simple-parsing==0.1.9 wandb==0.31.0
fi
