#!/usr/bin/env bash
# A real one-host SLURM cluster for the tests of the SLURM launcher (tests/test_slurm*.py).
#
#   .ci/slurm_setup.sh install  install slurm-wlm + munge with apt if missing (exit 3: apt cannot; .ci/run)
#   .ci/slurm_setup.sh start    install slurm-wlm + munge with apt if missing, write slurm.conf, start munged,
#                               slurmctld and the slurmd(s); prints `export SLURM_CONF=...` (exit 0), or exit 3
#                               with one line when apt cannot install them (no network / no root)
#   .ci/slurm_setup.sh stop     stop the daemons this script started (by their pid files) and the jobs left
#   .ci/slurm_setup.sh status   sinfo
#
# Everything lives in $BENCH_SLURM_DIR (default /tmp/bench-slurm): slurm.conf, state, logs, pid files. The
# system's /etc/slurm is never touched; clients find the cluster through SLURM_CONF. Two slurmd (n1, n2) run
# on 127.0.0.1 with their own ports when the build allows several slurmd per host (Debian's does not:
# then one node, n1). Accounting: no slurmdbd; job states come from `scontrol show job` (MinJobAge keeps
# finished jobs for an hour) and the job completion log (jobcomp/filetxt).
set -euo pipefail
DIR=${BENCH_SLURM_DIR:-/tmp/bench-slurm}
CMD=${1:-start}
CONF=$DIR/slurm.conf

say() { echo "slurm_setup: $*" >&2; }

stop() {
  # the jobs still queued or running on this test cluster first (their processes would outlive slurmd)
  if [ -f "$CONF" ] && SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q UP; then
    if [ -n "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ]; then
      SLURM_CONF=$CONF scancel --full -u "$(id -un)" 2>/dev/null || true
      for _ in $(seq 50); do [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  for pidfile in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  # job processes the slurmstepd of a stopped slurmd left behind (only those of this cluster's jobs)
  for pid in $(pgrep -f "slurmstepd: \[" 2>/dev/null || true); do
    if grep -qs "SLURM_CONF=$CONF" "/proc/$pid/environ"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  say "stopped"
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_setup: slurm-wlm/munge are not installed and this is not root: cannot apt-get install them" >&2
    exit 3
  fi
  say "installing slurm-wlm and munge with apt"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
       >"${TMPDIR:-/tmp}/bench-slurm-apt.log" 2>&1; then
    echo "slurm_setup: apt cannot install slurm-wlm/munge (no network?), see ${TMPDIR:-/tmp}/bench-slurm-apt.log" >&2
    exit 3
  fi
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged >/dev/null 2>&1 || munged --force >/dev/null 2>&1 || true
  else
    munged --force >/dev/null 2>&1 || true
  fi
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "slurm_setup: munged does not answer" >&2
  exit 1
}

write_conf() {
  local nodes=$1 cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 512 ))
  mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log "$DIR"/run
  local nodelines="" names
  if [ "$nodes" = 2 ]; then
    names="n[1-2]"
    nodelines="NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17018 CPUs=$cpus RealMemory=$((mem / 2)) State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17019 CPUs=$cpus RealMemory=$((mem / 2)) State=UNKNOWN"
  else
    names="n1"
    nodelines="NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17018 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  fi
  cat >"$CONF" <<EOF
# written by .ci/slurm_setup.sh: a test cluster on this host
ClusterName=benchci
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=17017
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobRequeue=1
MinJobAge=3600
KillWait=5
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
$nodelines
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
  local want=$1
  for _ in $(seq 100); do
    local idle
    idle=$(SLURM_CONF=$CONF sinfo -h -N -o "%N %t" 2>/dev/null | grep -c -E " (idle|mix|alloc)$" || true)
    [ "$idle" -ge "$want" ] && return 0
    SLURM_CONF=$CONF scontrol update nodename="$(SLURM_CONF=$CONF sinfo -h -N -o %N | paste -sd,)" state=resume \
      >/dev/null 2>&1 || true
    sleep 0.2
  done
  say "nodes not idle:"; SLURM_CONF=$CONF sinfo -N >&2 || true; tail -5 "$DIR"/log/*.log >&2 || true
  return 1
}

start() {
  install
  start_munge
  stop >/dev/null 2>&1 || true
  rm -rf "$DIR/state"
  local nodes=${BENCH_SLURM_NODES:-2}
  write_conf "$nodes"
  SLURM_CONF=$CONF slurmctld -i
  for _ in $(seq 50); do SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  local names=(n1)
  [ "$nodes" = 2 ] && names=(n1 n2)
  local ok=1
  for n in "${names[@]}"; do
    SLURM_CONF=$CONF slurmd -N "$n" >/dev/null 2>&1 || { ok=0; break; }
  done
  if [ "$ok" = 0 ] || ! wait_idle "${#names[@]}"; then
    if [ "$nodes" = 2 ]; then  # this build runs one slurmd per host: fall back to one node
      say "two slurmd on one host do not start with this build; one node"
      BENCH_SLURM_NODES=1 start
      return
    fi
    echo "slurm_setup: slurmd did not come up, see $DIR/log" >&2
    exit 1
  fi
  say "up: $(SLURM_CONF=$CONF sinfo -h -N -o '%N %t %c cpus' | paste -sd';')"
  echo "export SLURM_CONF=$CONF"
}

case "$CMD" in
  install) install; say "slurm-wlm and munge are installed" ;;
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo -N ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
