#!/usr/bin/env bash
# Install xdlm-vision with its test extras and the Fashion-MNIST data on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    # Debian's package puts the IDX files in /usr/share/datasets/fashion-mnist.
    run_as_root=""
    if [ "$(id -u)" -ne 0 ]; then run_as_root="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $run_as_root apt-get update -q
    $run_as_root apt-get install -y -q dataset-fashion-mnist
fi

# The torch / torchvision pair this project is tested with.
python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e ".[test]"
