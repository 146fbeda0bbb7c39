#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and CI (not for production).
#
#   deploy/slurm/local-cluster.sh start   # configure and start munged, slurmctld, slurmd
#   deploy/slurm/local-cluster.sh env     # print `export SLURM_CONF=...` for sbatch & co.
#   deploy/slurm/local-cluster.sh stop
#
# Idempotent: `start` on a running cluster only checks it answers. Everything lives in
# SEARCH_SLURM_DIR (default /tmp/search-slurm): the config, the state, the logs and the pid
# files; the ports are picked free at the first start and kept in the config. The node is
# this host with CPUs=SEARCH_SLURM_CPUS (default 4, more than the machine may have: the tests'
# tasks mostly sleep) and SEARCH_SLURM_GPUS fake GPUs (default 2: device nodes standing in
# for /dev/nvidiaN, so `--gres=gpu:1` schedules and Slurm sets CUDA_VISIBLE_DEVICES per task).
#
# Needs root (slurmd runs jobs as their user) and Debian's slurm-wlm and munge packages.
# By default processes are tracked by parent pid (proctrack/linuxproc) and tasks are not
# confined (task/none), which runs in any container, without systemd or cgroup delegation.
# SEARCH_SLURM_CGROUP=1 at the first start uses cgroups as production clusters do
# (proctrack/cgroup, task/cgroup with ConstrainDevices): that needs a writable cgroup v1
# hierarchy (this project's CI machine has one).
set -euo pipefail

DIR=${SEARCH_SLURM_DIR:-/tmp/search-slurm}
CPUS=${SEARCH_SLURM_CPUS:-4}
GPUS=${SEARCH_SLURM_GPUS:-2}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

munge_up() {
  munge -n -S "$DIR/munge/munge.socket" >/dev/null 2>&1
}

cluster_up() {
  [[ -f $CONF ]] && running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid" || return 1
  SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q 'is UP' &&
    SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

write_config() {
  mkdir -p "$DIR"/{munge,state,spool,log,dev}
  local ctld_port slurmd_port gpu_files="" proctrack=proctrack/linuxproc task=task/none
  local cgroup_conf="CgroupPlugin=cgroup/v1
CgroupAutomount=no"
  if [[ ${SEARCH_SLURM_CGROUP:-0} == 1 ]]; then
    proctrack=proctrack/cgroup
    task=task/cgroup,task/affinity
    cgroup_conf="CgroupPlugin=cgroup/v1
CgroupAutomount=yes
ConstrainCores=yes
ConstrainDevices=yes"
  fi
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  for ((i = 0; i < GPUS; i++)); do
    # gres/gpu wants character devices; nothing ever opens these (major 195 = nvidia).
    [[ -c $DIR/dev/nvidia$i ]] || mknod "$DIR/dev/nvidia$i" c 195 "$i"
  done
  cat >"$CONF" <<CONF
ClusterName=search-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=$proctrack
TaskPlugin=$task
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SchedulerParameters=defer_batch_purge
MinJobAge=300
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
  if ((GPUS > 0)); then
    gpu_files="File=$DIR/dev/nvidia[0-$((GPUS - 1))]"
  fi
  cat >"$DIR/gres.conf" <<CONF
AutoDetect=off
NodeName=$NODE Name=gpu $gpu_files
CONF
  echo "$cgroup_conf" >"$DIR/cgroup.conf"
}

start() {
  mkdir -p "$DIR/munge"
  if ! munge_up; then
    [[ -r $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
    munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
      --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" --force
  fi
  if cluster_up; then
    echo "Slurm cluster in $DIR is up."
    return
  fi
  [[ -f $CONF ]] || write_config
  stop_daemons
  slurmctld -f "$CONF" || fail "slurmctld did not start"
  slurmd -f "$CONF" || fail "slurmd did not start"
  for _ in $(seq 1 60); do
    if cluster_up; then
      echo "Slurm cluster in $DIR is up (SLURM_CONF=$CONF)."
      return
    fi
    SLURM_CONF=$CONF scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  fail "Slurm did not come up"
}

fail() {
  echo "local-cluster: $1; the last lines of its logs in $DIR/log/:" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  exit 1
}

running() {
  [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null
}

stop_daemons() {
  local pidfile pid
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    running "$pidfile" || continue
    pid=$(<"$pidfile")
    kill "$pid"
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
  done
}

case ${1:-start} in
  start) start ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  stop)
    stop_daemons
    if [[ -s $DIR/munge/munged.pid ]]; then
      kill "$(<"$DIR/munge/munged.pid")" 2>/dev/null || true
    fi
    ;;
  *)
    echo "usage: $0 start|env|stop" >&2
    exit 2
    ;;
esac
