#!/usr/bin/env bash
# Install gradpower-study into ./.venv, plus the Debian packages that hold the
# offline data of the embedded studies (the King James Bible text and the
# Fashion-MNIST files) and the PostgreSQL server that the team-mode tests
# start for Optuna. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(bible-kjv dataset-fashion-mnist)
missing=()
command -v bible >/dev/null 2>&1 || missing+=(bible-kjv)
ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1 \
  || missing+=(dataset-fashion-mnist)
# Debian keeps initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin, off PATH.
postgres_missing=false
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
  || command -v initdb >/dev/null 2>&1 || postgres_missing=true
if [ ${#missing[@]} -gt 0 ] || [ "$postgres_missing" = true ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$postgres_missing" = true ]; then
      missing+=(postgresql)
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    if [ ${#missing[@]} -gt 0 ]; then
      echo "warning: the offline data needs Debian packages ${missing[*]}:" >&2
      echo "  sudo apt-get install ${debian_packages[*]}" >&2
      echo "  (or pass your own text files and image folders in a study file)" >&2
    fi
    if [ "$postgres_missing" = true ]; then
      echo "warning: the team-mode tests skip PostgreSQL without Debian's" >&2
      echo "postgresql package: sudo apt-get install postgresql" >&2
    fi
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "installed: $(.venv/bin/study --help | head -n 1)"
