#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try sweeps with hydra/launcher=slurm without a
# real cluster (and to test them in CI).
#
#   scripts/local-slurm.sh start    # install slurm-wlm + munge if missing, start, wait until idle
#   eval "$(scripts/local-slurm.sh env)"   # export SLURM_CONF for sbatch/squeue/scancel
#   scripts/local-slurm.sh status
#   scripts/local-slurm.sh stop     # cancel the cluster's jobs, end the daemons started by `start`
#
# Needs root on Debian/Ubuntu (slurmd runs jobs as their user; apt-get installs the packages).
# Everything lives in LOCAL_SLURM_DIR (default ${TMPDIR:-/tmp}/local-slurm): the configuration,
# its own munge key and socket, controller state, node spool, logs and the daemons' pid files.
# Nothing under /etc is changed and no system service is started. Settings (environment):
#   LOCAL_SLURM_DIR        state folder (its path must be short: it holds a unix socket)
#   LOCAL_SLURM_PORT       slurmctld port (default 6817); slurmd listens on the next one
#   LOCAL_SLURM_PARTITION  partition name (default debug)
#   LOCAL_SLURM_KILL_WAIT  seconds between SIGTERM and SIGKILL when a job is cancelled (default 5)
# The cluster has no accounting database (slurmdbd), so `sacct` fails: submitit then learns that a
# job ended only from the result file the job writes. A job cancelled with scancel writes none,
# so the submitting command keeps waiting for it: stop that command (Ctrl-C) once the other jobs
# are done; the jobs already submitted are not affected.
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/local-slurm}"
PORT="${LOCAL_SLURM_PORT:-6817}"
PARTITION="${LOCAL_SLURM_PARTITION:-debug}"
KILL_WAIT="${LOCAL_SLURM_KILL_WAIT:-5}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"

die() { echo "local-slurm: $*" >&2; exit 2; }
say() { echo "local-slurm: $*" >&2; }

install_packages() {
    local missing=0 tool
    for tool in munged slurmctld slurmd sbatch scancel sinfo; do
        command -v "$tool" >/dev/null 2>&1 || missing=1
    done
    [ "$missing" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed; run as root to install them \
(apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null 2>&1 || die "slurm-wlm and munge are missing and there is no \
apt-get here; install SLURM (slurmctld, slurmd, client tools) and munge, then re-run"
    say "installing slurm-wlm and munge (apt-get)"
    # The packages' own services are not started (no init system in containers; and this cluster
    # runs its own daemons with their own key, socket and configuration).
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >"$DIR/log/apt-get.log" 2>&1 \
        || die "apt-get install slurm-wlm munge failed; see $DIR/log/apt-get.log"
}

# alive NAME: the pid in $DIR/NAME.pid when that process is running and is NAME.
alive() {
    local pidfile="$DIR/$1.pid" pid
    [ -s "$pidfile" ] || return 1
    pid="$(cat "$pidfile")"
    [ -r "/proc/$pid/comm" ] || return 1
    # The pid file may outlive its daemon; a reused pid belongs to another program.
    case "$(cat "/proc/$pid/comm")" in "$1"*) echo "$pid" ;; *) return 1 ;; esac
}

write_config() {
    local node host cpus mem
    host="$(hostname -s)"
    # The node's real CPUs and memory as slurmd sees them ("NodeName=h CPUs=2 ... RealMemory=N").
    node="$(slurmd -C | head -n 1)"
    cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")"
    mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")"
    [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot read CPUs/RealMemory from 'slurmd -C': $node"
    cat >"$CONF" <<EOF
# Written by scripts/local-slurm.sh: a one-node cluster for trying sweeps (not for production).
ClusterName=localslurm
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (containers rarely allow them): processes tracked by parentage, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
KillWait=$KILL_WAIT
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if alive munged >/dev/null; then return 0; fi
    if [ ! -s "$DIR/munge/munge.key" ]; then
        # A private key: this cluster never talks to another munge.
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    munged --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --force \
        || die "munged did not start; see $DIR/log/munged.log"
}

wait_idle() {
    local state="" i
    for i in $(seq 1 120); do
        state="$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)"
        case "$state" in
            idle|mixed|allocated) return 0 ;;
            down*|drain*|inval*)
                # A node seen down by an earlier controller run: bring it back.
                SLURM_CONF="$CONF" scontrol update nodename="$(hostname -s)" state=resume \
                    >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "the node did not become idle within 60 s (state: '${state:-none}'); see $DIR/log/"
}

cmd_start() {
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 700 "$DIR/munge"
    install_packages
    [ "$(id -u)" = 0 ] || die "slurmd must run as root; run 'sudo $0 start'"
    [ ${#SOCKET} -lt 100 ] || die "LOCAL_SLURM_DIR is too long for a unix socket path: $DIR"
    write_config
    start_munge
    if ! alive slurmctld >/dev/null; then
        slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    fi
    if ! alive slurmd >/dev/null; then
        slurmd -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
    fi
    wait_idle
    say "up: partition '$PARTITION' on $(hostname -s); use it with"
    echo "export SLURM_CONF=$CONF"
}

stop_daemon() {
    local name="$1" pid i
    pid="$(alive "$name")" || { rm -f "$DIR/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        [ -d "/proc/$pid" ] || break
        sleep 0.2
    done
    if [ -d "/proc/$pid" ]; then
        say "$name ($pid) did not stop after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$name.pid"
}

cmd_stop() {
    [ -d "$DIR" ] || { say "nothing to stop ($DIR does not exist)"; return 0; }
    if alive slurmctld >/dev/null && [ -f "$CONF" ]; then
        # The jobs of this cluster end with it (their processes are children of slurmstepd).
        SLURM_CONF="$CONF" scancel --quiet --full --partition="$PARTITION" 2>/dev/null || true
        local i
        for i in $(seq 1 $((KILL_WAIT * 5 + 50))); do
            [ -z "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    say "stopped"
}

cmd_status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        if pid="$(alive "$name")"; then echo "$name: running (pid $pid)"
        else echo "$name: not running"; rc=1; fi
    done
    if [ "$rc" = 0 ]; then SLURM_CONF="$CONF" sinfo; fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state in LOCAL_SLURM_DIR, default $DIR)" >&2
       exit 2 ;;
esac
