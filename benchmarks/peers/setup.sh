#!/usr/bin/env bash
# Creates one virtual environment per peer under benchmarks/peers/.venvs/
# (git-ignored), with the versions the peer benchmarks were run with.
#
#   bash benchmarks/peers/setup.sh              # all peers
#   bash benchmarks/peers/setup.sh fedjax pfl   # only some
#
# Packages come from the package registry through pip as configured on the
# machine (torch 2.13.0 is the CPU wheel pip finds in its local wheel folder).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="${PEERS_VENVS:-$HERE/.venvs}"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH_SPEC:-torch==2.13.0}"

# name -> pip requirements (pinned).
declare -A REQS=(
  [fedjax]="fedjax==0.0.17 jax==0.5.3 jaxlib==0.5.3 numpy==1.26.4 dm-haiku==0.0.14"
  [pfl]="pfl[pytorch]==0.6.0 $TORCH"
  [flower]="flwr[simulation]==1.42.0 $TORCH"
)

peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then
  peers=(fedjax pfl flower)
fi

mkdir -p "$VENVS"
for peer in "${peers[@]}"; do
  if [ -z "${REQS[$peer]+x}" ]; then
    echo "unknown peer '$peer' (known: ${!REQS[*]})" >&2
    exit 2
  fi
  venv="$VENVS/$peer"
  echo "== $peer: $venv"
  # A marker written last tells a finished environment from a half-made one
  # (run_peers.py skips a peer without it).
  rm -f "$venv/.complete"
  "$PYTHON" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet ${REQS[$peer]}
  "$venv/bin/python" -m pip freeze > "$venv/versions.txt"
  touch "$venv/.complete"
  echo "   installed: $(grep -iE '^(fedjax|jax|jaxlib|numpy|dm-haiku|pfl|torch|flwr|ray)==' "$venv/versions.txt" | tr '\n' ' ')"
done
