#!/usr/bin/env bash
# Three peers on this machine: peer2 and peer3 in the background, peer1 in the
# foreground with its console.  Run it with `make demo` (which installs the
# venv and makes the large samples first).
#
# Leaving peer1 (exit, or Ctrl-C) stops the other two and ends the demo with
# exit code 0.  The background peers cap their uploads at DEMO_UPLOAD_RATE, so
# that a download lasts long enough to watch its progress bar.
#
# For tests, every place and port can be moved: DEMO_SANDBOX (a copy of this
# folder's peer1..3), DEMO_DISCOVERY_PORT and DEMO_PEER1_PORT..DEMO_PEER3_PORT.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
TWISTD="$ROOT/.venv/bin/twistd"
SANDBOX=${DEMO_SANDBOX:-$ROOT/sandbox}
DISCOVERY_PORT=${DEMO_DISCOVERY_PORT:-27000}
PEER1_PORT=${DEMO_PEER1_PORT:-27101}
PEER2_PORT=${DEMO_PEER2_PORT:-27201}
PEER3_PORT=${DEMO_PEER3_PORT:-27301}
UPLOAD_RATE=${DEMO_UPLOAD_RATE:-8M}
COMMON=(--discovery-port "$DISCOVERY_PORT" --host 127.0.0.1 --broadcast 127.255.255.255)

if [[ ! -x $TWISTD ]]; then
    echo "demo: $TWISTD not found; run 'make demo' (or 'make install') first" >&2
    exit 1
fi

BACKGROUND_PIDS=()
INTERRUPTED=

stop_background_peers() {
    local pid
    for pid in "${BACKGROUND_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # SIGTERM lets each peer stop its services (and say goodbye); wait for it.
    for pid in "${BACKGROUND_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_background_peers EXIT
# Ctrl-C before peer1's console reads keys (or on a console that is not a
# terminal) reaches this script too: it ends the demo, cleanly.  Bash runs
# the trap once peer1 has finished stopping.
trap 'INTERRUPTED=1' INT
trap 'exit 143' TERM

# start_background_peer NAME TRANSFER_PORT
start_background_peer() {
    local name=$1 port=$2
    (
        cd "$SANDBOX/$name"
        exec "$TWISTD" -n --pidfile twistd.pid --logfile p2ppeer.log \
            p2ppeer --transfer-port "$port" "${COMMON[@]}" --max-upload-rate "$UPLOAD_RATE" \
            </dev/null >/dev/null
    ) &
    BACKGROUND_PIDS+=("$!")
}

start_background_peer peer2 "$PEER2_PORT"
start_background_peer peer3 "$PEER3_PORT"

# A peer that cannot start (a port in use, a stale pid file) exits at once.
sleep 1
for i in 0 1; do
    if ! kill -0 "${BACKGROUND_PIDS[$i]}" 2>/dev/null; then
        name=$([[ $i == 0 ]] && echo peer2 || echo peer3)
        echo "demo: $name did not start; see the error above or $SANDBOX/$name/p2ppeer.log" >&2
        exit 1
    fi
done
if [[ -n $INTERRUPTED ]]; then
    echo "bye"
    exit 0
fi

cat <<BANNER
twisted-p2p demo
  peer2 (transfer port $PEER2_PORT) and peer3 ($PEER3_PORT) run in the background, with
  --max-upload-rate $UPLOAD_RATE (8M is 8 MiB/s), so that a download lasts long enough
  to watch; their logs are in $SANDBOX/peer2/p2ppeer.log and $SANDBOX/peer3/p2ppeer.log.
  peer1 ($PEER1_PORT) is this console; its log is $SANDBOX/peer1/.p2ppeer/p2ppeer.log.
  Discovery: UDP port $DISCOVERY_PORT on 127.0.0.1.

Try: list, peers, download random-32MiB.bin (Tab completes names), download photos/, status, help
Leaving peer1 (exit, or Ctrl-C) stops the other peers too.

BANNER

cd "$SANDBOX/peer1"
# Not exec: this shell must outlive peer1 to stop the background peers.
status=0
"$TWISTD" -n --pidfile twistd.pid p2ppeer --transfer-port "$PEER1_PORT" "${COMMON[@]}" || status=$?
if [[ -n $INTERRUPTED ]]; then
    # Interrupted by a signal rather than the console's Ctrl-C: peer1 stopped
    # cleanly all the same (it said goodbye); so does the demo.
    echo "bye"
    exit 0
fi
exit "$status"
