#!/usr/bin/env bash
# Determined runs this in the task container, in the uploaded context directory, before the entrypoint.
# It installs requirements.txt on top of the image without touching the image's torch (a CUDA build
# matched to the image; pip would otherwise fetch whatever wheel it likes) or the `determined` harness
# the platform installed (it must match the master's version).
#
# Determined *sources* this file, so the work runs in a subshell: strict mode and variables stay here,
# and a failure is this file's exit status, which fails the task.
(
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")"
  python="${DET_PYTHON_EXECUTABLE:-python3}"

  if ! torch_version="$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    echo "startup-hook.sh: the image has no torch for $python; pick an environment.image with PyTorch" >&2
    exit 1
  fi

  # Pin what the image and the platform installed, so that pip keeps them instead of replacing them.
  constraints="$(mktemp)"
  requirements="$(mktemp)"
  trap 'rm -f "$constraints" "$requirements"' EXIT
  echo "torch==${torch_version}" >"$constraints"
  if det_version="$("$python" -c 'import determined; print(determined.__version__)' 2>/dev/null)"; then
    echo "determined==${det_version}" >>"$constraints"
    # requirements.txt pins determined for runs off the cluster; here the harness already present wins.
    grep -v -E '^[[:space:]]*determined([^A-Za-z0-9_.-]|$)' requirements.txt >"$requirements" || true
  else
    cp requirements.txt "$requirements"
  fi

  echo "startup-hook.sh: installing requirements.txt with $(tr '\n' ' ' <"$constraints")kept"
  "$python" -m pip install --no-cache-dir --disable-pip-version-check -r "$requirements" -c "$constraints"
)
