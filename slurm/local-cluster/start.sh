#!/usr/bin/env bash
# start.sh - run a real, private, multi-node Slurm cluster on ONE Debian host (this project's copy;
# used by tests/test_slurm.py and documented in slurm/README.md).
#
# Run as root. Installs Debian's slurmctld/slurmd/slurm-client/munge (22.05.x) and tini if missing,
# writes a config under $SLURM_LOCAL_DIR, starts a private munged, one slurmctld and
# $SLURM_LOCAL_NODES slurmd daemons (one per emulated node, each "slurmd -N <node>" on its own
# port, all on 127.0.0.1), waits until every node is usable and prints the node list.
# Idempotent: daemons already running (checked through their pid files) are left alone;
# if the generated config changed, the Slurm daemons are restarted with the new one.
#
# Knobs (environment variables):
#   SLURM_LOCAL_DIR         state/config/log directory           (default $TMPDIR/local-slurm, or /tmp/local-slurm)
#   SLURM_LOCAL_NODES       number of emulated nodes               (default 4)
#   SLURM_LOCAL_CPUS        CPUs declared per node                 (default 2)
#   SLURM_LOCAL_MEM_MB      RealMemory declared per node (MB)      (default 4000)
#   SLURM_LOCAL_PREFIX      node name prefix -> node1..nodeN       (default node)
#   SLURM_LOCAL_PARTITION   the single (default) partition         (default debug)
#   SLURM_LOCAL_CTLD_PORT   slurmctld port                         (default 16817)
#   SLURM_LOCAL_NODE_PORT0  slurmd ports are PORT0+1 .. PORT0+N    (default 17000)
#   SLURM_LOCAL_CRED_EXPIRE cred lifetime (s); also the delay before a requeued job may
#                           start again (Slurm's default is 120)   (default 10)
#   SLURM_LOCAL_ACCOUNTING  1 = also install+run MariaDB and slurmdbd so sacct works (default 0)
#   SLURM_LOCAL_DBD_PORT    slurmdbd port                          (default 16819)
#   SLURM_LOCAL_DB_PORT     private mariadbd port on 127.0.0.1     (default 13306)
#   SLURM_LOCAL_LINK_ETC    1 = symlink /etc/slurm/slurm.conf to the generated config so
#                           sbatch etc. work without SLURM_CONF (never replaces a real file) (default 1)
#   SLURM_LOCAL_TIMEOUT     seconds to wait for the nodes          (default 90)
#   SLURM_LOCAL_PROCTRACK   ProctrackType (proctrack/pgid or proctrack/linuxproc) (default proctrack/pgid;
#                           linuxproc loses processes orphaned to init, e.g. a "sleep &" left by a
#                           batch script that exits from a signal trap)
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/local-slurm}
NODES=${SLURM_LOCAL_NODES:-4}
CPUS=${SLURM_LOCAL_CPUS:-2}
MEM=${SLURM_LOCAL_MEM_MB:-4000}
PREFIX=${SLURM_LOCAL_PREFIX:-node}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-16817}
PORT0=${SLURM_LOCAL_NODE_PORT0:-17000}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-0}
DBD_PORT=${SLURM_LOCAL_DBD_PORT:-16819}
DB_PORT=${SLURM_LOCAL_DB_PORT:-13306}
LINK_ETC=${SLURM_LOCAL_LINK_ETC:-1}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}
PROCTRACK=${SLURM_LOCAL_PROCTRACK:-proctrack/pgid}

CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
T0=$(date +%s%N)

log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start-local-slurm %3d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
case "$DIR" in /*) ;; *) die "SLURM_LOCAL_DIR must be an absolute path" ;; esac
[ "$NODES" -ge 1 ] 2>/dev/null || die "SLURM_LOCAL_NODES must be >= 1"

# ---------- helpers ----------
# alive PID NAME: PID is a live (non-zombie) process whose comm is NAME (or NAME-wlm)
alive() {
    local pid=$1 name=$2 comm st
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$name" ] || [ "$comm" = "$name-wlm" ] || return 1
    st=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    [ "$st" != Z ]
}
# running PIDFILE NAME
running() { [ -s "$1" ] && alive "$(cat "$1" 2>/dev/null)" "$2"; }
# stop_pidfile PIDFILE NAME: TERM, wait up to 10 s, then KILL; only that PID
stop_pidfile() {
    local pf=$1 name=$2 pid i
    [ -s "$pf" ] || return 0
    pid=$(cat "$pf" 2>/dev/null || true)
    if alive "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do alive "$pid" "$name" || break; sleep 0.1; done
        if alive "$pid" "$name"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
    fi
    rm -f "$pf"
}
# wait_for SECONDS DESCRIPTION COMMAND...
wait_for() {
    local secs=$1 what=$2; shift 2
    local end=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.2
    done
}
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pkg_installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
show_log() { [ -f "$1" ] && { echo "----- tail $1"; tail -n 25 "$1"; } || true; }

mkdir -p "$DIR/log"
APTLOG=$DIR/log/apt.log

# ---------- 1. packages ----------
PKGS=(slurmctld slurmd slurm-client munge tini)
[ "$ACCOUNTING" = 1 ] && PKGS+=(slurmdbd mariadb-server mariadb-client)
MISSING=()
for p in "${PKGS[@]}"; do pkg_installed "$p" || MISSING+=("$p"); done
if [ ${#MISSING[@]} -gt 0 ]; then
    log "installing: ${MISSING[*]}"
    # keep the packages' init scripts from starting system-wide daemons during install
    POLICY_CREATED=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
        POLICY_CREATED=1
    fi
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}"; }
    set +e
    apt_install > "$APTLOG" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        log "apt-get install failed (rc=$rc); running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >> "$APTLOG" 2>&1
        apt_install >> "$APTLOG" 2>&1
        rc=$?
    fi
    set -e
    [ "$POLICY_CREATED" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc -eq 0 ] || { tail -n 30 "$APTLOG"; die "apt-get install failed"; }
    log "packages installed"
fi

# ---------- 2. directories, munge key ----------
mkdir -p "$DIR"/{etc,run,log,state/ctld,spool}
chmod 755 "$DIR" "$DIR"/{etc,run,log,state,spool}
chmod 700 "$DIR/state/ctld"
mkdir -p "$DIR/munge"
chmod 711 "$DIR/munge"            # munged: socket dir needs o+x, key dir must not be writable by others
if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$DIR/munge/munge.key"
MUNGE_SOCKET=$DIR/munge/munge.socket

# ---------- 3. config ----------
LAST=$((PORT0 + NODES))
if [ "$NODES" -eq 1 ]; then NODELIST="${PREFIX}1"; PORTS=$((PORT0 + 1)); else NODELIST="${PREFIX}[1-$NODES]"; PORTS="[$((PORT0 + 1))-$LAST]"; fi
ACCT_LINES="JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none"
if [ "$ACCOUNTING" = 1 ]; then
    ACCT_LINES="JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# the munge socket slurmctld/sacct/sacctmgr use towards slurmdbd (AuthInfo does not cover it)
AccountingStoragePass=$MUNGE_SOCKET"
fi
NEWCONF=$(cat <<EOF
# generated by start.sh - do not edit (rewritten on every start)
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=${PROCTRACK}
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
JobCompType=jobcomp/none
$ACCT_LINES
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODELIST NodeHostname=localhost NodeAddr=127.0.0.1 Port=$PORTS CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ -f "$CONF" ] && [ "$(cat "$CONF")" != "$NEWCONF" ]; then
    log "configuration changed: stopping running Slurm daemons of $DIR"
    for pf in "$DIR"/run/slurmd-*.pid; do [ -e "$pf" ] && stop_pidfile "$pf" slurmd; done
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/run/slurmdbd.pid" slurmdbd
fi
printf '%s\n' "$NEWCONF" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
chmod 644 "$CONF"
cat > "$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
if [ "$LINK_ETC" = 1 ]; then
    mkdir -p /etc/slurm
    if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    else
        log "NOTE: /etc/slurm/slurm.conf is a real file; left alone. Use: export SLURM_CONF=$CONF"
    fi
fi

# ---------- 4. munged ----------
if running "$DIR/munge/munged.pid" munged; then
    log "munged already running (pid $(cat "$DIR/munge/munged.pid"))"
else
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --log-file="$DIR/log/munged.log" --pid-file="$DIR/munge/munged.pid" \
        --seed-file="$DIR/munge/munged.seed" </dev/null >>"$DIR/log/munged.stdout" 2>&1 \
        || { show_log "$DIR/log/munged.log"; die "munged failed to start"; }
    wait_for 10 munged running "$DIR/munge/munged.pid" munged || { show_log "$DIR/log/munged.log"; die "munged did not start"; }
    log "munged started (pid $(cat "$DIR/munge/munged.pid"))"
fi
munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null || die "munge self-test failed"

# ---------- 5. optional accounting: private MariaDB + slurmdbd ----------
if [ "$ACCOUNTING" = 1 ]; then
    DBSOCK=$DIR/mysql/mysqld.sock
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
        mkdir -p "$DIR/mysql"
        mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root --skip-test-db \
            >"$DIR/log/mariadb-install-db.log" 2>&1 || { show_log "$DIR/log/mariadb-install-db.log"; die "mariadb-install-db failed"; }
    fi
    if running "$DIR/run/mariadbd.pid" mariadbd; then
        log "mariadbd already running (pid $(cat "$DIR/run/mariadbd.pid"))"
    else
        setsid mariadbd --no-defaults --datadir="$DIR/mysql/data" --user=root \
            --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DBSOCK" \
            --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
            --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
        wait_for 60 mariadbd mariadb-admin --no-defaults -S "$DBSOCK" -uroot ping \
            || { show_log "$DIR/log/mariadbd.log"; die "mariadbd did not start"; }
        wait_for 10 mariadbd-pid running "$DIR/run/mariadbd.pid" mariadbd || die "mariadbd pid file missing"
        log "mariadbd started (pid $(cat "$DIR/run/mariadbd.pid"))"
    fi
    [ -s "$DIR/etc/dbpass" ] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$DIR/etc/dbpass"); }
    DBPASS=$(cat "$DIR/etc/dbpass")
    mariadb --no-defaults -S "$DBSOCK" -uroot <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
    (umask 077; cat > "$DIR/etc/slurmdbd.conf" <<EOF
# generated by start.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
)
    if running "$DIR/run/slurmdbd.pid" slurmdbd; then
        log "slurmdbd already running (pid $(cat "$DIR/run/slurmdbd.pid"))"
    else
        slurmdbd </dev/null >>"$DIR/log/slurmdbd.stdout" 2>&1 || { show_log "$DIR/log/slurmdbd.log"; die "slurmdbd failed to start"; }
        wait_for 60 slurmdbd tcp_open "$DBD_PORT" || { show_log "$DIR/log/slurmdbd.log"; die "slurmdbd not listening on $DBD_PORT"; }
        wait_for 10 slurmdbd-pid running "$DIR/run/slurmdbd.pid" slurmdbd || die "slurmdbd pid file missing"
        log "slurmdbd started (pid $(cat "$DIR/run/slurmdbd.pid"))"
    fi
else
    # accounting switched off: make sure an slurmdbd/mariadbd of ours is not left behind
    stop_pidfile "$DIR/run/slurmdbd.pid" slurmdbd
    stop_pidfile "$DIR/run/mariadbd.pid" mariadbd
fi

# ---------- 6. slurmctld ----------
if running "$DIR/run/slurmctld.pid" slurmctld; then
    log "slurmctld already running (pid $(cat "$DIR/run/slurmctld.pid"))"
else
    slurmctld </dev/null >>"$DIR/log/slurmctld.stdout" 2>&1 || { show_log "$DIR/log/slurmctld.log"; die "slurmctld failed to start"; }
    wait_for 30 slurmctld-pid running "$DIR/run/slurmctld.pid" slurmctld || { show_log "$DIR/log/slurmctld.log"; die "slurmctld exited"; }
    log "slurmctld started (pid $(cat "$DIR/run/slurmctld.pid"))"
fi
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
wait_for 30 ctld ctld_up || { show_log "$DIR/log/slurmctld.log"; die "slurmctld does not answer"; }

# ---------- 7. one slurmd per emulated node ----------
STAMP=$(date +%Y-%m-%dT%H:%M:%S)
STARTED=()
for i in $(seq 1 "$NODES"); do
    n=$PREFIX$i
    mkdir -p "$DIR/spool/$n"
    if running "$DIR/run/slurmd-$n.pid" slurmd; then
        log "slurmd -N $n already running (pid $(cat "$DIR/run/slurmd-$n.pid"))"
        continue
    fi
    STARTED+=("$n")
    # slurmd runs in the foreground under "tini -s" (child subreaper): processes orphaned inside
    # jobs (e.g. srun's helper child) are re-parented to tini and reaped at once. Without it they
    # go to PID 1, which in some sandboxes reaps late, and proctrack/pgid then waits ~3 s per job.
    setsid tini -s -- slurmd -D -N "$n" </dev/null >>"$DIR/log/slurmd-$n.stdout" 2>&1 &
    wait_for 30 "slurmd $n" running "$DIR/run/slurmd-$n.pid" slurmd || { show_log "$DIR/log/slurmd-$n.log"; die "slurmd $n exited"; }
    log "slurmd -N $n started (pid $(cat "$DIR/run/slurmd-$n.pid"), port $((PORT0 + i)))"
done

# ---------- 8. wait until every node is usable ----------
nodes_ready() {
    local out
    out=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
    [ "$(printf '%s\n' "$out" | grep -c .)" -eq "$NODES" ] || return 1
    printf '%s\n' "$out" | awk '{print $2}' | grep -qvE '^(idle|mix|alloc|comp)$' && return 1
    # a node restored as idle from saved state is only really there once the slurmd we just
    # started has registered (its SlurmdStartTime is not older than this start)
    local n t
    for n in ${STARTED[@]+"${STARTED[@]}"}; do
        t=$(scontrol show node "$n" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^SlurmdStartTime=//p')
        [[ $t =~ ^[0-9] ]] && ! [[ $t < $STAMP ]] || return 1
    done
    return 0
}
end=$(( $(date +%s) + TIMEOUT )); resumed=0
until nodes_ready; do
    if [ "$(date +%s)" -ge "$end" ]; then
        sinfo -N -l || true; show_log "$DIR/log/slurmctld.log"
        die "nodes not ready after ${TIMEOUT}s"
    fi
    # nodes left DOWN/DRAINED by an earlier run: resume them once slurmd is up
    if [ "$resumed" = 0 ] && [ "$(date +%s)" -ge $(( end - TIMEOUT + 5 )) ]; then
        bad=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null | awk '$2 ~ /^(down|drain|drng|fail|failg)$/ {print $1}' | paste -sd, -)
        if [ -n "$bad" ]; then log "resuming $bad"; scontrol update NodeName="$bad" State=RESUME || true; fi
        resumed=1
    fi
    sleep 0.3
done

log "cluster ready (ClusterName=local, config $CONF, accounting=$ACCOUNTING)"
sinfo -N -o '%N %P %t %c %m'
if [ ! -L /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" != "$CONF" ]; then
    echo "export SLURM_CONF=$CONF    # (also in $DIR/env.sh)"
fi
