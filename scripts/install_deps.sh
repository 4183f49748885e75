#!/usr/bin/env bash
# Installs the Debian packages kvbm builds and tests with (README.md says what each is for).
# Run as root (or with sudo) on Debian 12 or a derivative; idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# Every Debian package the project needs; append here.
APT_PACKAGES="cmake ninja-build g++ pkg-config libfmt-dev libxxhash-dev liburing-dev libzmq3-dev cppzmq-dev
  libgtest-dev libgmock-dev libbenchmark-dev libhiredis-dev libcpp-httplib-dev libmsgpack-cxx-dev libnuma-dev
  clang-format prometheus fio redis-server e2fsprogs util-linux
  libmicrohttpd-dev
  clang-16 libclang-rt-16-dev"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
$SUDO apt-get update -q
# shellcheck disable=SC2086 # word splitting of the list is intended
$SUDO apt-get install -y -q --no-install-recommends $APT_PACKAGES
