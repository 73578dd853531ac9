#!/usr/bin/env bash
# Install gradpower-study into ./.venv, plus the Debian packages that hold the
# offline data of the embedded studies (the King James Bible text and the
# Fashion-MNIST files). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(bible-kjv dataset-fashion-mnist)
missing=()
command -v bible >/dev/null 2>&1 || missing+=(bible-kjv)
ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1 \
  || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: the offline data needs Debian packages ${missing[*]}:" >&2
    echo "  sudo apt-get install ${debian_packages[*]}" >&2
    echo "  (or pass your own text files and image folders in a study file)" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "installed: $(.venv/bin/study --help | head -n 1)"
