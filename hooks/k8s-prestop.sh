#!/usr/bin/env bash
# Kubernetes preStop hook for a shiftchange container.
#
# The kubelet runs this inside the container before it sends SIGTERM to PID 1.
# `shiftchange handoff` commits, in one transaction, "these servers are stopped,
# their in-flight jobs are back in the queue", then SIGTERMs the supervisor
# (only if its pid and process start time match) and waits for it to exit.
# That works even when the supervisor itself is frozen; a healthy supervisor
# would do the same on the kubelet's SIGTERM, so the hook is a safety net.
#
# With this hook the handoff happens at the start of termination, so
# shutdown.drain buys nothing: jobs are requeued before they could finish.
# If you rely on drain, leave the hook out (see docs/deploying.md).
#
# Usage in the pod spec (see k8s-pod-snippet.yaml):
#   lifecycle: {preStop: {exec: {command: ["/usr/local/bin/shiftchange-prestop"]}}}
#
# Environment (all optional):
#   SHIFTCHANGE_CONFIG            config file, as for every shiftchange command
#   SHIFTCHANGE_DATABASE_URL      overrides database.url
#   SHIFTCHANGE_HANDOFF_TIMEOUT   seconds to wait for the supervisor to exit
#                                 (default 10); keep it > drain + kill_after + 1
#                                 and < terminationGracePeriodSeconds
#   SHIFTCHANGE_SERVER            hand off only this server (name or id);
#                                 default: every running server of this host
#                                 (in a pod, the host name is the pod name)
#   SHIFTCHANGE_BIN               the CLI (default: shiftchange from PATH)
#   SHIFTCHANGE_HOOK_LOG          where the hook logs (default /proc/1/fd/2,
#                                 i.e. the container log); "-" for stderr
#
# Exit status is handoff's: 0 done, 1 runtime failure (e.g. database
# unreachable), 2 usage/config error. Kubernetes records a failing preStop hook
# as a FailedPreStopHook event and goes on to SIGTERM the container anyway, and
# the supervisor then hands off by itself.
set -euo pipefail

timeout="${SHIFTCHANGE_HANDOFF_TIMEOUT:-10}"
bin="${SHIFTCHANGE_BIN:-shiftchange}"

if ! [[ "$timeout" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "shiftchange-prestop: SHIFTCHANGE_HANDOFF_TIMEOUT must be a number of seconds, got '$timeout'" >&2
    exit 2
fi

# A hook's output is not in the container log; PID 1's stderr is (PID 1 is the
# supervisor when the image starts it in exec form). Send ours there, so
# `kubectl logs` shows what the handoff did. "-" keeps the hook's own stderr.
log="${SHIFTCHANGE_HOOK_LOG:-/proc/1/fd/2}"
if [[ "$log" != "-" && -w "$log" ]]; then
    exec 2>>"$log"
fi
exec 1>&2

args=(handoff --timeout "$timeout")
if [[ -n "${SHIFTCHANGE_SERVER:-}" ]]; then
    args+=(--server "$SHIFTCHANGE_SERVER")
fi
if [[ -n "${SHIFTCHANGE_CONFIG:-}" ]]; then
    args+=(--config "$SHIFTCHANGE_CONFIG")
fi

echo "shiftchange-prestop: $bin ${args[*]}"
status=0
"$bin" "${args[@]}" || status=$?
echo "shiftchange-prestop: handoff exited $status"
exit "$status"
