#!/usr/bin/env bash
# Determined runs this in the task container, in the uploaded context directory, before the entrypoint.
# It installs requirements.txt on top of the image without touching the image's torch (a CUDA build
# matched to the image; pip would otherwise fetch whatever wheel it likes) or the `determined` harness
# the platform installed (it must match the master's version). DPO_LIGHTNING_EXTRA_REQUIREMENTS (the
# experiment's environment_variables) names more requirement files to install the same way, e.g.
# requirements-vllm.txt on an image that already has vLLM (experiments/online-vllm.yaml).
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
  requirements="$(mktemp -p .)"  # here, so that its nested `-r requirements-base.txt` resolves
  trap 'rm -f "$constraints" "$requirements"' EXIT
  echo "torch==${torch_version}" >"$constraints"
  if det_version="$("$python" -c 'import determined; print(determined.__version__)' 2>/dev/null)"; then
    echo "determined==${det_version}" >>"$constraints"
    # requirements.txt pins determined for runs off the cluster; here the harness already present wins.
    grep -v -E '^[[:space:]]*determined([^A-Za-z0-9_.-]|$)' requirements.txt >"$requirements" || true
  else
    cp requirements.txt "$requirements"
  fi
  for extra in ${DPO_LIGHTNING_EXTRA_REQUIREMENTS:-}; do
    [[ -f "$extra" ]] || { echo "startup-hook.sh: DPO_LIGHTNING_EXTRA_REQUIREMENTS names $extra, which is not in the context" >&2; exit 1; }
    echo "-r $extra" >>"$requirements"
  done

  echo "startup-hook.sh: installing requirements.txt ${DPO_LIGHTNING_EXTRA_REQUIREMENTS:+$DPO_LIGHTNING_EXTRA_REQUIREMENTS }with $(tr '\n' ' ' <"$constraints")kept"
  "$python" -m pip install --no-cache-dir --disable-pip-version-check -r "$requirements" -c "$constraints"
)
