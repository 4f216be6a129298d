# Shell helpers for scripts that drive a daemon's QMP monitor on its standard input/output, as scripts
# written for qemu-storage-daemon do. Source it, then: start_daemon DAEMON [ARGS…]; send JSON; expect TEXT.

# Start "$@" with its monitor on standard input/output (--chardev stdio, --monitor) as a coprocess.
start_daemon() {
    coproc DAEMON { exec "$@" --chardev stdio,id=mon0 --monitor chardev=mon0; }
    daemon_pid=$DAEMON_PID
    # A script that fails half-way must not leave the daemon running (it outlives its standard input).
    trap 'kill "$daemon_pid" 2>/dev/null || true' EXIT
}

# The daemon's output with what differs between runs and daemons masked: event timestamps, the
# greeting's version, generated node names.
mask() {
    sed -e 's/"timestamp": {"seconds": [0-9]*, "microseconds": [0-9]*}/"timestamp": T/' \
        -e 's/^{"QMP": {"version": .*, "capabilities"/{"QMP": {"version": V, "capabilities"/' \
        -e 's/#block[0-9]*/#block/g'
}

send() {
    echo "$1" >&"${DAEMON[1]}"
}

# Print what the daemon says (masked) until a line containing $1 (fail after 120 s of silence).
expect() {
    local line
    while IFS= read -r -t 120 line <&"${DAEMON[0]}"; do
        line=${line%$'\r'}
        printf '%s\n' "$line" | mask
        [[ $line == *"$1"* ]] && return 0
    done
    echo "daemon ended or went silent before: $1"
    return 1
}

# quit, and print the daemon's exit status.
quit_daemon() {
    send '{"execute": "quit"}'
    expect '"return"'
    local status=0
    wait "$daemon_pid" || status=$?
    echo "daemon exit status $status"
}
