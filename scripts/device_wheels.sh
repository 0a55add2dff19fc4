#!/usr/bin/env bash
# The wheels handsoff needs that the lent GPU machines' image lacks (it has Python 3.12, torch, torchvision,
# numpy, pillow, safetensors, tqdm, pyyaml), into runs/device-wheels, to be carried by the device tool's `run`.
# Run here, where the package index is reachable; nothing is downloaded on the GPU machine.
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d runs/device-wheels \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions pycocotools
ls runs/device-wheels
