#!/usr/bin/env bash
# A real one-node SLURM cluster for segbook's tests (issue #7), without systemd.
#
#   scripts/slurm_cluster.sh install   apt-get install slurm-wlm + munge (root, idempotent)
#   scripts/slurm_cluster.sh start     write the config, start munged/slurmctld/slurmd, wait for the node
#   scripts/slurm_cluster.sh stop      stop the three daemons (the state dir is kept)
#   scripts/slurm_cluster.sh status    exit 0 when the cluster answers and the node can run jobs
#
# Everything lives in one state dir, $SEGBOOK_SLURM_DIR (default /tmp/segbook-slurm): slurm.conf, the munge
# key and socket, the daemons' pid files, spool and saved state, and their logs under log/. Once the node is up,
# /etc/slurm/slurm.conf is made a symlink to the state dir's slurm.conf, because every SLURM command (sbatch and
# squeue in the test process, `scontrol requeue` inside a job, people at a shell) reads that path unless
# SLURM_CONF says otherwise. Two clusters cannot run at once: they would share SLURM's ports.
#
# What the config rests on (Debian 12, Slurm 22.05.8, submitit 1.5.4; evidence in docs/slurm_testing.md):
# - No slurmdbd (it needs a MariaDB server): AccountingStorageType=accounting_storage/none. Plain `sacct`
#   then prints "Slurm accounting storage is disabled" and exits 1, and submitit sees every job as UNKNOWN.
#   Job states come from squeue/scontrol (finished jobs stay there for MinJobAge) and submitit's result files;
#   jobcomp/filetxt keeps a log of finished jobs that `sacct -c` reads.
# - Requeueing (submitit's Checkpointable runs `scontrol requeue` on the USR2 SLURM sends before the time limit
#   or on preemption) needs JobRequeue=1; AuthInfo's cred_expire sets how long the requeued job then waits.
# - No cgroup plugin (proctrack/linuxproc follows job processes through /proc, task/affinity pins CPUs): no
#   systemd, no writable cgroup tree, and no cgroup.conf needed.
set -euo pipefail

readonly STATE_DIR="${SEGBOOK_SLURM_DIR:-/tmp/segbook-slurm}"
readonly PARTITION="debug"
readonly START_TIMEOUT_S="${SEGBOOK_SLURM_START_TIMEOUT:-60}"
readonly CONF="$STATE_DIR/slurm.conf"
readonly LOG_DIR="$STATE_DIR/log"
readonly MUNGE_DIR="$STATE_DIR/munge"
readonly RUN_DIR="$STATE_DIR/run"
# munged wants its socket in a directory everyone can enter, and its key in one nobody else can.
readonly MUNGE_SOCKET="$RUN_DIR/munge.socket.2"
readonly SYSTEM_CONF="/etc/slurm/slurm.conf"
# Written as the first line of our slurm.conf, so that a foreign /etc/slurm/slurm.conf is never replaced.
readonly CONF_MARKER="# written by segbook scripts/slurm_cluster.sh"
readonly DAEMONS=(munged slurmctld slurmd)

die() {
    echo "slurm_cluster: error: $*" >&2
    exit 1
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd runs jobs as their submitting user and needs root)"
}

need_packages() {
    local missing=()
    local cmd
    for cmd in munged mungekey slurmctld slurmd sinfo sbatch; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}; run: $0 install"
}

cmd_install() {
    need_root
    if (($(dpkg-query -W -f='${Status}\n' slurm-wlm munge 2>/dev/null | grep -c "install ok installed") < 2)); then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # No recommends: they add slurm-wlm-plugins (extra plugins and their libraries), which nothing here uses.
        apt-get install -y -qq --no-install-recommends slurm-wlm munge
    fi
    echo "slurm_cluster: installed: $(dpkg-query -W -f='${Package} ${Version}  ' slurm-wlm munge)"
}

# Serialise start and stop: two test sessions that find the cluster down at once must not both start it.
take_lock() {
    mkdir -p "$STATE_DIR"
    # fd 9 holds the lock until this script exits; the daemons are started without it (9>&-).
    exec 9>"$STATE_DIR/lock"
    flock --timeout "$((START_TIMEOUT_S + 30))" 9 ||
        die "timed out waiting for $STATE_DIR/lock (another start or stop)"
}

pid_file() {
    echo "$RUN_DIR/$1.pid"
}

# Whether process $1 lives (a zombie does not: a daemon killed outright stays one until init reaps it).
pid_alive() {
    [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" =~ ^[^ZX]$ ]]
}

# Whether the daemon named $1 runs from this state dir: its pid file names a live process of that name.
daemon_alive() {
    local pid
    pid=$(cat "$(pid_file "$1")" 2>/dev/null) || return 1
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]] && pid_alive "$pid"
}

node_name() {
    hostname -s
}

# The node's state as sinfo prints it (idle, mixed, allocated, down*, drained, ...), empty if no answer.
node_state() {
    SLURM_CONF="$CONF" timeout 10 sinfo --noheader --nodes="$(node_name)" --format=%T 2>/dev/null | head -n 1 || true
}

# When slurmd last registered with slurmctld (e.g. 2026-11-22T08:04:30), empty if no answer.
slurmd_start_time() {
    SLURM_CONF="$CONF" timeout 10 scontrol --oneliner show node "$(node_name)" 2>/dev/null |
        sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' || true
}

# Write slurm.conf for this machine. The node's CPUs, topology and memory are what
# `slurmd -C` detects, so slurmd never finds the node smaller than configured (it would drain it).
write_config() {
    local node hw hardware mem cpus
    node=$(node_name)
    hw=$(slurmd -C | head -n 1)
    # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    hardware=$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=[0-9]+' <<<"$hw" |
        tr '\n' ' ')
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hardware")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hardware")
    [[ -n "$cpus" && -n "$mem" ]] || die "cannot read CPUs and memory from 'slurmd -C': $hw"

    cat >"$CONF.tmp" <<EOF
$CONF_MARKER
# One-node test cluster: $node, $cpus CPUs, $mem MiB.
ClusterName=segbook
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# No systemd, no cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true

# Cores and memory are both scheduled; a job that asks for no memory gets its CPUs' share.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))

# No slurmdbd: sacct (without -c) does not work; the job completion log does.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt

# For tests: a cancelled job is killed 2 s after its SIGTERM; a finished job stays visible to squeue and
# scontrol for 30 min (sacct cannot show it); a node that was down takes jobs again once its slurmd registers.
KillWait=2
MinJobAge=1800
ReturnToService=2
# A job that can never run (more CPUs or memory than the node has) is refused by sbatch, not left pending.
EnforcePartLimits=ALL
# Jobs may requeue themselves (submitit's Checkpointable does, with scontrol requeue).
JobRequeue=1
# A benchmark matrix (tasks x models x initialisations x folds) goes in one array.
MaxArraySize=10001
MaxJobCount=50000
# Run both schedulers every 2 s: a requeued job whose wait is over starts without a 30-60 s lag.
SchedulerParameters=bf_interval=2,sched_interval=2

NodeName=$node NodeAddr=127.0.0.1 ${hardware}State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# Whether we may replace /etc/slurm/slurm.conf: it is absent (or a dangling link), or it reads as ours.
system_conf_is_ours() {
    [[ ! -e "$SYSTEM_CONF" ]] || head -n 1 "$SYSTEM_CONF" | grep -qxF "$CONF_MARKER"
}

link_system_conf() {
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

make_munge_key() {
    [[ -s "$MUNGE_DIR/munge.key" ]] && return
    mkdir -p "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR"
    mungekey --create --keyfile="$MUNGE_DIR/munge.key"
    chmod 600 "$MUNGE_DIR/munge.key"
}

start_munged() {
    munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$(pid_file munged)" \
        --seed-file="$MUNGE_DIR/munged.seed" --log-file="$LOG_DIR/munged.log" >>"$LOG_DIR/munged.log" 2>&1 9>&-
}

elapsed_since() {
    awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'
}

print_logs() {
    local daemon
    for daemon in "${DAEMONS[@]}"; do
        echo "----- $LOG_DIR/$daemon.log (last 25 lines) -----" >&2
        if [[ -f "$LOG_DIR/$daemon.log" ]]; then
            tail -n 25 "$LOG_DIR/$daemon.log" >&2
        else
            echo "(no log)" >&2
        fi
    done
}

# Report a failed start with the daemons' logs, and leave nothing of it running.
fail_start() {
    echo "slurm_cluster: error: $*" >&2
    print_logs
    stop_daemons
    exit 1
}

# Wait until the node takes jobs and its slurmd registered at or after $1 (a time like 2026-11-22T08:04:30;
# empty: any). Until slurmd registers, slurmctld shows the node's state as saved by its previous run.
wait_for_node() {
    local since=$1 state daemon deadline=$((SECONDS + START_TIMEOUT_S))
    while true; do
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated | completing)
                [[ "$(slurmd_start_time)" < "$since" ]] || return 0 ;;
            # A node left drained or down by an earlier run of the cluster is usable again.
            drain* | down)
                SLURM_CONF="$CONF" scontrol update nodename="$(node_name)" state=resume 2>/dev/null || true ;;
        esac
        for daemon in "${DAEMONS[@]}"; do
            daemon_alive "$daemon" || fail_start "$daemon exited"
        done
        ((SECONDS < deadline)) ||
            fail_start "node $(node_name) not ready after ${START_TIMEOUT_S} s (state: '${state:-no answer}')"
        sleep 0.2
    done
}

cmd_start() {
    need_root
    need_packages
    system_conf_is_ours || die "$SYSTEM_CONF is someone else's; move it away first"
    local t0 since=""
    t0=$(date +%s.%N)
    take_lock
    mkdir -p "$STATE_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"

    if daemon_alive munged && daemon_alive slurmctld && daemon_alive slurmd; then
        echo "slurm_cluster: already running (state dir $STATE_DIR)"
    else
        # A half-running cluster is restarted whole, so that all three daemons read the same config.
        stop_daemons
        write_config
        make_munge_key
        start_munged || fail_start "munged did not start"
        # -i: ignore a saved job/node state that no longer matches the config instead of refusing to start.
        SLURM_CONF="$CONF" slurmctld -i >>"$LOG_DIR/slurmctld.log" 2>&1 9>&- || fail_start "slurmctld did not start"
        since=$(date +%Y-%m-%dT%H:%M:%S)
        SLURM_CONF="$CONF" slurmd -N "$(node_name)" >>"$LOG_DIR/slurmd.log" 2>&1 9>&- ||
            fail_start "slurmd did not start"
    fi
    wait_for_node "$since"
    # Only now: a start that fails must not take the commands away from a cluster that runs.
    link_system_conf
    echo "slurm_cluster: node $(node_name) is $(node_state) in partition $PARTITION;" \
        "ready in $(elapsed_since "$t0") s (state dir $STATE_DIR)"
}

# Stop the daemons of this state dir (jobs still running keep running; slurmd picks them up when it returns).
stop_daemons() {
    local daemon pid i
    for daemon in slurmd slurmctld munged; do
        daemon_alive "$daemon" || continue
        pid=$(cat "$(pid_file "$daemon")")
        kill -TERM "$pid"
        for ((i = 0; i < 100; i++)); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            kill -KILL "$pid"
        fi
        rm -f "$(pid_file "$daemon")"
    done
}

cmd_stop() {
    need_root
    take_lock
    stop_daemons
    echo "slurm_cluster: stopped (state dir $STATE_DIR kept)"
}

cmd_status() {
    local daemon pid state ok=0
    for daemon in "${DAEMONS[@]}"; do
        if daemon_alive "$daemon"; then
            pid=$(cat "$(pid_file "$daemon")")
            echo "$daemon: running (pid $pid)"
        else
            echo "$daemon: not running"
            ok=1
        fi
    done
    state=$(node_state)
    echo "node $(node_name): ${state:-no answer}; partition $PARTITION; state dir $STATE_DIR"
    [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]] || ok=1
    return $ok
}

main() {
    case "${1:-}" in
        install) cmd_install ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        *)
            echo "usage: $0 install|start|stop|status" \
                "(state dir: \$SEGBOOK_SLURM_DIR, default /tmp/segbook-slurm)" >&2
            exit 2
            ;;
    esac
}

main "$@"
