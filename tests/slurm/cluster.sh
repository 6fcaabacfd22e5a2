#!/usr/bin/env bash
# A real Slurm cluster on 127.0.0.1 for the tests: munged, slurmctld and N slurmd "nodes",
# started by hand without systemd, everything (config, state, logs, sockets) under DIR.
#
#   tests/slurm/cluster.sh start DIR [NODES]   # prints the SLURM_CONF to export
#   tests/slurm/cluster.sh stop DIR
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (ci-setup installs them).
# Facts this relies on: munged wants its socket dir 0755 and its key 0600;
# batch_sched_delay=0 avoids a 3 s wait per job; several nodes on one host work with
# `NodeName=nX Port=<unique>` and `slurmd -N nX`; proctrack/linuxproc and task/none need no
# cgroups.
set -euo pipefail
cmd=${1:?usage: cluster.sh start|stop DIR [NODES]}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR [NODES]}")
nodes=${3:-2}

stop() {
  # Jobs first: with proctrack/linuxproc their processes would outlive slurmd.
  if [ -f "$dir/slurm.conf" ] && [ -f "$dir/run/slurmctld.pid" ]; then
    jobs=$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF="$dir/slurm.conf" scancel --full --signal=KILL $jobs 2>/dev/null || true
      sleep 0.5
    fi
  fi
  for pidfile in "$dir"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
  done
  sleep 0.5
  for pidfile in "$dir"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

case "$cmd" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "cluster.sh: unknown command $cmd" >&2; exit 2 ;;
esac

for tool in munged slurmctld slurmd sbatch squeue scontrol; do
  command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is missing (ci-setup installs slurm)" >&2; exit 1; }
done
stop
mkdir -p "$dir"/{run,log,munge,spool/ctld,spool/d}
chmod 0755 "$dir/munge"
# munge: a key of our own, its socket and pid under DIR.
if [ ! -f "$dir/munge/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 0600 "$dir/munge/munge.key"
socket="$dir/munge/munge.socket"
munged --key-file="$dir/munge/munge.key" --socket="$socket" --pid-file="$dir/run/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed" --force

# Ports below the kernel's ephemeral range (32768 and up here), so no test's own sockets
# (bound to port 0) can hold one; a base whose ports are all free is picked.
ctld_port=$(python3 - "$nodes" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(200):
    base = random.randrange(20000, 32000 - n)
    socks = []
    try:
        for p in range(base, base + n + 1):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(base)
    break
else:
    sys.exit("no free port range for slurm")
PY
)
{
  echo "ClusterName=pype-test"
  echo "SlurmctldHost=localhost"
  echo "SlurmctldPort=$ctld_port"
  echo "SlurmUser=root"
  echo "SlurmdUser=root"
  echo "AuthType=auth/munge"
  echo "AuthInfo=socket=$socket"
  echo "CryptoType=crypto/munge"
  echo "StateSaveLocation=$dir/spool/ctld"
  echo "SlurmdSpoolDir=$dir/spool/d/%n"
  echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
  echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
  echo "SlurmctldLogFile=$dir/log/slurmctld.log"
  echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "SchedulerType=sched/backfill"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "SchedulerParameters=batch_sched_delay=0"
  echo "ReturnToService=2"
  echo "MpiDefault=none"
  # JOBCOMP_LOC=FILE: finished jobs are logged there (jobcomp/filetxt): what
  # bench/sacct-jobcomp reads to stand in for sacct, which needs slurmdbd and a database.
  if [ -n "${JOBCOMP_LOC:-}" ]; then
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$JOBCOMP_LOC"
  else
    echo "JobCompType=jobcomp/none"
  fi
  echo "AccountingStorageType=accounting_storage/none"
  echo "SlurmctldTimeout=30"
  echo "SlurmdTimeout=30"
  echo "InactiveLimit=0"
  echo "MinJobAge=60"
  echo "KillWait=5"
  echo "Waittime=0"
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / nodes / 2 ))
  for i in $(seq 1 "$nodes"); do
    echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((ctld_port + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
} > "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"
for i in $(seq 1 "$nodes"); do mkdir -p "$dir/spool/d/n$i"; done
slurmctld -f "$SLURM_CONF" -i
for i in $(seq 1 "$nodes"); do
  slurmd -f "$SLURM_CONF" -N "n$i"
done
# Wait until every node is idle.
for _ in $(seq 1 100); do
  idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c idle || true)
  [ "$idle" -ge "$nodes" ] && { echo "SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "cluster.sh: nodes did not become idle; see $dir/log" >&2
sinfo -N >&2 || true
exit 1
