#!/usr/bin/env bash
# A real SLURM cluster on localhost for the test suite (and by hand):
#   munged, MariaDB + slurmdbd (accounting: submitit reads job states with sacct),
#   slurmctld, and two simulated nodes (one slurmd each), all under one base directory.
#
#   tests/slurm_cluster.sh install          # Debian packages (root)
#   tests/slurm_cluster.sh up   [BASE]      # start; prints 'export SLURM_CONF=...'
#   tests/slurm_cluster.sh down [BASE]      # cancel jobs, stop daemons by recorded PID
#   tests/slurm_cluster.sh status [BASE]
#
# BASE defaults to /tmp/conceptprune-slurm. Ports: CP_SLURM_PORT_BASE (default 16800).
set -euo pipefail

ACTION=${1:-}
BASE=${2:-${CP_SLURM_BASE:-/tmp/conceptprune-slurm}}
PORT_BASE=${CP_SLURM_PORT_BASE:-16800}
CTL_PORT=$((PORT_BASE + 17)); DBD_PORT=$((PORT_BASE + 19)); DB_PORT=$((PORT_BASE + 6))
NODE_PORTS=($((PORT_BASE + 101)) $((PORT_BASE + 102)))
NODES=(node1 node2)
HOSTS_TAG="# conceptprune-test-cluster"
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

need_tools() {
  for t in munged mungekey slurmctld slurmd slurmdbd sbatch sacct mariadbd mariadb-install-db; do
    command -v "$t" >/dev/null || die "missing $t (run: $0 install)"
  done
}

record() { echo "$1 $2" >> "$BASE/pids"; }   # name pid

wait_for() {  # seconds, description, command...
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out after ${secs}s waiting for $what (logs in $BASE/log)"
}

start_daemon() {  # name logfile command...: runs in its own session, records its PID
  local name=$1 logf=$2; shift 2
  setsid "$@" >>"$logf" 2>&1 < /dev/null &
  record "$name" $!
}

up() {
  need_tools
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd and the munge key need it)"
  if [ -f "$BASE/pids" ]; then die "$BASE already holds a cluster; run: $0 down $BASE"; fi
  mkdir -p "$BASE"/{etc,state,spool,log,run,munge,mysql}
  chmod 755 "$BASE" "$BASE/munge"
  : > "$BASE/pids"
  local t0; t0=$(date +%s.%N)
  local cpus mem
  cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))

  # munge: a private key and socket (the Debian key belongs to the munge user)
  mungekey --create --keyfile="$BASE/munge/munge.key" --force >/dev/null 2>&1
  chmod 600 "$BASE/munge/munge.key"
  start_daemon munged "$BASE/log/munged.out" munged --foreground --key-file="$BASE/munge/munge.key" \
    --socket="$BASE/munge/munge.socket" --pid-file="$BASE/run/munged.pid" \
    --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munge.seed" --force
  wait_for 10 munged test -S "$BASE/munge/munge.socket"

  # MariaDB for accounting
  mariadb-install-db --no-defaults --user=root --datadir="$BASE/mysql" \
    --auth-root-authentication-method=socket >"$BASE/log/mariadb-install.log" 2>&1
  start_daemon mariadbd "$BASE/log/mariadb.log" mariadbd --no-defaults --user=root --datadir="$BASE/mysql" \
    --socket="$BASE/run/mysql.sock" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --pid-file="$BASE/run/mariadb.pid" --innodb-buffer-pool-size=32M
  wait_for 30 mariadb mariadb --no-defaults -uroot --socket="$BASE/run/mysql.sock" -e "select 1"
  mariadb --no-defaults -uroot --socket="$BASE/run/mysql.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

  cat > "$BASE/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$BASE/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
CONF
  chmod 600 "$BASE/etc/slurmdbd.conf"

  {
    echo "ClusterName=cptest"
    echo "SlurmctldHost=localhost"
    echo "SlurmctldPort=$CTL_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$BASE/munge/munge.socket"
    echo "CredType=cred/munge"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core_Memory"
    echo "SchedulerParameters=batch_sched_delay=0"
    echo "MailProg=/bin/true"
    echo "ReturnToService=2"
    echo "KillWait=5"
    echo "MinJobAge=300"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/slurmdbd"
    echo "AccountingStorageHost=localhost"
    echo "AccountingStoragePort=$DBD_PORT"
    echo "AccountingStoragePass=$BASE/munge/munge.socket"
    echo "StateSaveLocation=$BASE/state"
    echo "SlurmdSpoolDir=$BASE/spool/%n"
    echo "SlurmctldPidFile=$BASE/run/slurmctld.pid"
    echo "SlurmdPidFile=$BASE/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$BASE/log/slurmctld.log"
    echo "SlurmdLogFile=$BASE/log/slurmd-%n.log"
    echo "DefMemPerCPU=512"
    echo "MaxArraySize=4"  # small, so that a test sees a stage's parts cut into several arrays
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$BASE/etc/slurm.conf"
  export SLURM_CONF="$BASE/etc/slurm.conf"

  start_daemon slurmdbd "$BASE/log/slurmdbd.out" slurmdbd -D
  wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"

  # node names must resolve (torch's rendezvous uses the first node's name)
  if ! getent hosts "${NODES[0]}" >/dev/null; then
    echo "127.0.0.1 ${NODES[*]} $HOSTS_TAG" >> /etc/hosts || die "cannot add ${NODES[*]} to /etc/hosts"
    touch "$BASE/hosts-added"
  fi

  start_daemon slurmctld "$BASE/log/slurmctld.out" slurmctld -D -i
  wait_for 30 slurmctld scontrol ping
  for n in "${NODES[@]}"; do
    mkdir -p "$BASE/spool/$n"
    start_daemon "slurmd-$n" "$BASE/log/slurmd-$n.out" slurmd -D -N "$n"
  done
  wait_for 60 "nodes idle" bash -c "[ \$(sinfo -h -N -o %T | grep -c idle) -eq ${#NODES[@]} ]"
  # the cluster must be known to accounting for sacct to answer
  wait_for 30 "accounting" bash -c "sacctmgr -n list cluster format=cluster | grep -q cptest"
  echo "export SLURM_CONF=$SLURM_CONF" > "$BASE/env.sh"
  local t1; t1=$(date +%s.%N)
  printf 'slurm_cluster: up in %.1f s (%s nodes, %s CPUs each)\n' "$(echo "$t1 - $t0" | bc)" "${#NODES[@]}" "$cpus" >&2
  echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
  [ -f "$BASE/pids" ] || { echo "slurm_cluster: nothing running under $BASE" >&2; return 0; }
  export SLURM_CONF="$BASE/etc/slurm.conf"
  timeout 10 scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
  # by recorded PID only, in reverse order of start; they exit in parallel (~2 s each)
  local pids; pids=$(tac "$BASE/pids" | awk '{print $2}')
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    local alive=0
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ -f "$BASE/hosts-added" ]; then
    sed -i "/$HOSTS_TAG/d" /etc/hosts 2>/dev/null || \
      { grep -v "$HOSTS_TAG" /etc/hosts > /tmp/hosts.$$ && cat /tmp/hosts.$$ > /etc/hosts && rm -f /tmp/hosts.$$; }
  fi
  rm -f "$BASE/pids" "$BASE/hosts-added"
  echo "slurm_cluster: stopped ($BASE kept for its logs)" >&2
}

status() {
  [ -f "$BASE/pids" ] || { echo "down"; return 1; }
  export SLURM_CONF="$BASE/etc/slurm.conf"
  while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then echo "$name $pid running"; else echo "$name $pid DEAD"; fi
  done < "$BASE/pids"
  sinfo
}

install() {
  [ "$(id -u)" = 0 ] || die "install needs root"
  export DEBIAN_FRONTEND=noninteractive
  if ! dpkg -s $PACKAGES >/dev/null 2>&1; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends $PACKAGES bc
  fi
  command -v bc >/dev/null || apt-get install -y -q --no-install-recommends bc
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  status) status ;;
  install) install ;;
  *) echo "usage: $0 {install|up|down|status} [BASE]" >&2; exit 2 ;;
esac
