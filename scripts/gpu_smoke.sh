#!/usr/bin/env bash
# GPU smoke test: a short real study on this machine's NVIDIA GPUs, several workers per GPU,
# then the throughput (finished trials per wall minute) and the peak GPU memory.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/gpu_smoke.sh [options]

Installs the project into a virtual environment, runs a short digits-mlp study on CUDA with
two workers per GPU against a temporary SQLite file, and prints finished trials per minute
and the peak GPU memory used. Exits non-zero if no GPU is visible or the study does not
finish. Takes one to three minutes.

Options:
  --n-trials N          trials to finish (default 16)
  --workers-per-gpu K   workers sharing each GPU (default 2)
  --timeout SECONDS     stop the study after this long (default 180)
  --venv DIR            virtual environment to create or reuse (default: a temporary one)
  --no-install          use the search command already on PATH, install nothing
  --keep                keep the temporary folder (database, worker logs) and print its path
  -h, --help            show this help

Environment:
  PYTHON      interpreter that creates the virtual environment (default python3). The
              environment also sees that interpreter's packages (its own virtual environment's
              too), so a torch with CUDA installed there is reused, not downloaded again.
  PIP_EXTRA   more arguments for pip install, e.g. "--no-index --find-links ./wheels
              --no-build-isolation" offline, or "--extra-index-url URL" for another torch.
EOF
}

die() {
  echo "gpu_smoke: $*" >&2
  exit 1
}

n_trials=16
workers_per_gpu=2
timeout_s=180
venv=""
install=1
keep=0
while (($#)); do
  case $1 in
    --n-trials) n_trials=${2:?--n-trials needs a value}; shift 2 ;;
    --workers-per-gpu) workers_per_gpu=${2:?--workers-per-gpu needs a value}; shift 2 ;;
    --timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
    --venv) venv=${2:?--venv needs a value}; shift 2 ;;
    --no-install) install=0; shift ;;
    --keep) keep=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
spec=studies/digits_mlp.yaml
study=$(awk '$1 == "name:" { print $2; exit }' "$repo/$spec")

# 1. A GPU must be visible before anything is installed.
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
gpu_list=$(nvidia-smi -L 2>&1) || die "nvidia-smi failed: $gpu_list"
grep -q '^GPU ' <<<"$gpu_list" || die "nvidia-smi lists no GPU"
echo "$gpu_list"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke.XXXXXX")
sampler_pid=""
cleanup() {
  if [[ -n $sampler_pid ]]; then kill "$sampler_pid" 2>/dev/null || true; fi
  if ((keep)); then echo "gpu_smoke: kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# 2. The project, in a virtual environment that reuses an installed torch: it sees the packages
# of the interpreter that made it (a .pth file, which also works when that interpreter is
# itself in a virtual environment, unlike --system-site-packages).
python=python3
if ((install)); then
  venv=${venv:-$tmp/venv}
  if [[ ! -x $venv/bin/python ]]; then
    base_python=${PYTHON:-python3}
    "$base_python" -m venv "$venv"
    venv_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    "$base_python" -c 'import site; print("\n".join(site.getsitepackages()))' \
      >"$venv_site/gpu-smoke-parent.pth"
  fi
  read -r -a pip_extra <<<"${PIP_EXTRA:-}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    ${pip_extra[@]+"${pip_extra[@]}"} -e "$repo"
  python=$venv/bin/python
  PATH=$venv/bin:$PATH
fi
command -v search >/dev/null || die "no search command on PATH"
"$python" -c 'import sys, torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")
sys.exit(0 if ok else 1)' || die "this torch cannot use the GPU (a CPU-only build?); see PIP_EXTRA"

# 3. The study, with GPU memory sampled every second.
memory_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; }
idle_mib=$(memory_used | sort -n | tail -n 1)
(while true; do memory_used >>"$tmp/memory.txt" 2>/dev/null || true; sleep 1; done) &
sampler_pid=$!

storage="sqlite:///$tmp/smoke.db"
cd "$repo"
start=$(date +%s.%N)
launch_status=0
timeout --signal=INT --kill-after=30 "$timeout_s" \
  search launch "$spec" --storage "$storage" --n-trials "$n_trials" \
  --workers-per-gpu "$workers_per_gpu" --checkpoint-dir "$tmp/checkpoints" \
  --log-dir "$tmp/logs" --no-progress || launch_status=$?
end=$(date +%s.%N)
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=""

# 4. The figures.
finished=0 failed=0 budget=$n_trials
if status_json=$(search status "$study" --storage "$storage" --json); then
  read -r finished failed budget < <("$python" -c 'import json, sys
data = json.loads(sys.argv[1])
counts = data["counts"]
print(counts["COMPLETE"] + counts["PRUNED"], counts["FAIL"], data["n_trials"])' "$status_json")
fi
peak_mib=$(sort -n "$tmp/memory.txt" 2>/dev/null | tail -n 1) || true
awk -v n="$finished" -v s="$start" -v e="$end" -v f="$failed" -v b="$budget" 'BEGIN {
  printf "finished trials: %d of %d (%d failed) in %.1f s\n", n, b, f, e - s
  printf "trials per minute: %.1f\n", n / ((e - s) / 60)
}'
echo "peak GPU memory used: ${peak_mib:-?} MiB on one GPU (${idle_mib} MiB before the study)"

if ((launch_status != 0)) || ((finished < budget)); then
  echo "gpu_smoke: FAILED: search launch exited $launch_status with $finished of $budget" \
    "trials finished; the last lines of each worker log:" >&2
  for log in "$tmp"/logs/*; do
    [[ -f $log ]] || continue
    echo "== $log" >&2
    tail -n 20 "$log" >&2
  done
  exit 1
fi
echo "gpu_smoke: OK"
