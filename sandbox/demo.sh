#!/usr/bin/env bash
# Three peers on this machine: peer2 and peer3 in the background, peer1 in the
# foreground with its console.  Run it with `make demo` (which installs the
# venv and makes the large samples first).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
TWISTD="$ROOT/.venv/bin/twistd"
DISCOVERY_PORT=27000
COMMON=(--discovery-port "$DISCOVERY_PORT" --host 127.0.0.1 --broadcast 127.255.255.255)

if [[ ! -x $TWISTD ]]; then
    echo "demo: $TWISTD not found; run 'make demo' (or 'make install') first" >&2
    exit 1
fi

BACKGROUND_PIDS=()

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
# Turn signals into a normal exit so the EXIT trap runs.
trap 'exit 130' INT
trap 'exit 143' TERM

# start_background_peer NAME TRANSFER_PORT
start_background_peer() {
    local name=$1 port=$2
    (
        cd "sandbox/$name"
        exec "$TWISTD" -n --pidfile twistd.pid --logfile p2ppeer.log \
            p2ppeer --transfer-port "$port" "${COMMON[@]}" \
            </dev/null >/dev/null
    ) &
    BACKGROUND_PIDS+=("$!")
}

start_background_peer peer2 27201
start_background_peer peer3 27301

# A peer that cannot start (a port in use, a stale pid file) exits at once.
sleep 1
for i in 0 1; do
    if ! kill -0 "${BACKGROUND_PIDS[$i]}" 2>/dev/null; then
        name=$([[ $i == 0 ]] && echo peer2 || echo peer3)
        echo "demo: $name did not start; see the error above or sandbox/$name/p2ppeer.log" >&2
        exit 1
    fi
done

cat <<BANNER
twisted-p2p demo
  peer2 (transfer port 27201) and peer3 (27301) run in the background;
  their logs are in sandbox/peer2/p2ppeer.log and sandbox/peer3/p2ppeer.log.
  peer1 (27101) is this console; its log is sandbox/peer1/.p2ppeer/p2ppeer.log.
  Discovery: UDP port $DISCOVERY_PORT on 127.0.0.1.

Commands: list, peers, download <file>, help, exit
Leaving peer1 (exit, or Ctrl-C) stops the other peers too.

BANNER

cd sandbox/peer1
# Not exec: this shell must outlive peer1 to stop the background peers.
"$TWISTD" -n --pidfile twistd.pid p2ppeer --transfer-port 27101 "${COMMON[@]}"
