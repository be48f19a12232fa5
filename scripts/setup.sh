#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian bookworm machine: system packages, then Redis and RabbitMQ.
# Installs only what is missing and starts services only when they are not running.
set -euo pipefail

need_root() { if [ "$(id -u)" -ne 0 ]; then echo "setup: run as root (or with sudo)" >&2; exit 1; fi; }

# The workspace builds for x86-64-v3 (.cargo/config.toml): refuse a CPU without AVX2/FMA/BMI2
# before building binaries that would stop with SIGILL.
if [ "$(uname -m)" = x86_64 ]; then
  for flag in avx2 fma bmi2; do
    if ! grep -qw "$flag" /proc/cpuinfo; then
      echo "setup: this CPU lacks $flag (x86-64-v3), which .cargo/config.toml builds for; build with" >&2
      echo "       RUSTFLAGS='-C target-cpu=x86-64' cargo build (docs/deployment.md)" >&2
      exit 1
    fi
  done
fi

PKGS=(build-essential pkg-config libhdf5-dev hdf5-tools python3-h5py python3-numpy
      redis-server rabbitmq-server iproute2 procps curl ca-certificates bitshuffle python3-pika python3-yaml python3-venv shellcheck
      chromium chromium-driver)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; else
    echo "setup: no Rust toolchain found; install one with rustup (https://rustup.rs)" >&2; exit 1; fi
fi
# cargo-fuzz for scripts/fuzz.sh (docs/fuzzing.md); about 1.5 min to build, once.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi

# The project's one Python virtual environment, pinned in python/requirements.txt; reinstalled
# only when that file changed.
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the Python virtual environment $VENV"
  /usr/bin/python3 -m venv "$VENV"
fi
if ! cmp -s python/requirements.txt "$VENV/requirements.installed"; then
  echo "setup: installing python/requirements.txt into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r python/requirements.txt
  cp python/requirements.txt "$VENV/requirements.installed"
fi
# The project's own package (python/, import stddaq_bluesky), editable: the venv runs this
# checkout's code. Its dependencies are the pinned ones above.
if ! "$VENV/bin/python" -c "import stddaq_bluesky, sys; sys.exit(not stddaq_bluesky.__file__.startswith('$(pwd)/python/'))" 2>/dev/null; then
  echo "setup: installing python/ (stddaq_bluesky) into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e python/
fi

# Redis: start when nothing answers on 6379.
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "setup: starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
# RabbitMQ: start when nothing answers on 5672, then poll until it accepts connections.
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "setup: starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break
    sleep 0.5
  done
  (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || { echo "setup: rabbitmq did not start" >&2; exit 1; }
fi
echo "setup: ok"
