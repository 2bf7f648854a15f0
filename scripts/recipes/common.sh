# Shared by the recipe scripts: check the hostfile, print the launch line, launch (DRY_RUN=1: print only).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -x "$ROOT/.venv/bin/moco-scale" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi

# recipe NODES ENGINE_JSON COMMAND RECIPE_FLAGS... -- DATA HOSTFILE [FLAGS...]: later flags win
recipe() {
  local nodes=$1 engine=$2 command=$3
  shift 3
  local flags=()
  while [ "$1" != "--" ]; do flags+=("$1"); shift; done
  shift
  if [ $# -lt 2 ]; then
    echo "usage: $0 DATA HOSTFILE [more flags for moco-scale $command]   (DRY_RUN=1 prints the launch line only)" >&2
    exit 2
  fi
  local data=$1 hostfile=$2
  shift 2
  local summary HOSTS SLOTS MASTER
  summary=$(moco-scale hostfile --shell "$hostfile")   # names the line at fault and stops here
  eval "$summary"
  if [ "$HOSTS" != "$nodes" ]; then
    echo "note: this recipe was published for $nodes node(s) of 8 GPUs; $hostfile lists $HOSTS" \
         "(-b stays the global batch, so each GPU takes a different share)" >&2
  fi
  local cmd=(deepspeed --hostfile "$hostfile" --master_addr "$MASTER" --master_port "${PORT:-29500}"
             --module moco_scale "$command" "$data" "${flags[@]}" --engine-config "$ROOT/$engine" "$@")
  echo "launching: ${cmd[*]}"
  if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
  exec "${cmd[@]}"
}
