#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (as root, no systemd), for tests/pipeline/test_slurm.py.
#   bash .ci/slurm.sh         install (Debian packages) and start munged, slurmctld, slurmd; idempotent:
#                             returns at once when `sinfo` already answers with a usable node
#   bash .ci/slurm.sh stop    stop only the daemons this script started (by the pids it recorded)
# Choices (verified on this project's CI machine, 2026-12-01): linuxproc process tracking and no task
# plugin (no cgroups in a container), cons_tres with CR_Core_Memory so jobs share the node by cores and
# memory, DefMemPerCPU so a job without --mem does not take the whole node, no accounting, and a
# MinJobAge long enough for the plugin's `squeue` status command (>= 3 x its initial status wait).
set -euo pipefail
STATE=/run/mathpt-slurm            # pid files of the daemons started here
CONF=/etc/slurm/slurm.conf
WAIT_S=${SLURM_WAIT_S:-60}         # bounded waits: never hang CI

node_ready() { timeout 10 sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

stop() {
    for d in slurmd slurmctld munged; do
        f=$STATE/$d.pid
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    done
}

if [[ ${1:-} == stop ]]; then stop; exit 0; fi
[[ $(id -u) == 0 ]] || { echo "slurm.sh: needs root (starts system daemons)" >&2; exit 1; }
if command -v sinfo >/dev/null && node_ready; then echo "slurm: already up"; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$STATE" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /etc/slurm
[[ -s /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key

host=$(hostname -s)
node=$(slurmd -C | head -1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host/")
cat > "$CONF.new" <<EOF
# Written by .ci/slurm.sh: a one-node test cluster.
ClusterName=mathpt-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
MinJobAge=300
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.new" "$CONF"

# munged: as the munge user, socket in /run/munge; it daemonizes and writes its own pid file.
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! alive "$STATE/munged.pid" && ! alive /run/munge/munged.pid; then   # not one started by someone else
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
    for _ in $(seq 20); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.5; done
    cp /run/munge/munged.pid "$STATE/munged.pid"
fi
for d in slurmctld slurmd; do
    if ! alive "$STATE/$d.pid"; then
        rm -f "$STATE/$d.pid"
        "/usr/sbin/$d"   # daemonizes, pid file from slurm.conf
        for _ in $(seq 20); do [[ -s $STATE/$d.pid ]] && break; sleep 0.5; done
    fi
done

for _ in $(seq "$WAIT_S"); do
    if node_ready; then echo "slurm: up ($(sinfo -h -o '%P %D %t %c CPUs %m MB'))"; exit 0; fi
    # a node left DOWN by an earlier run comes back here
    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    sleep 1
done
echo "slurm.sh: the node did not become idle within $WAIT_S s; logs in /var/log/slurm" >&2
sinfo >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
