#!/usr/bin/env bash
# Deploy step: move this host's shiftchange supervisor to a new release
# without stranding a job.
#
# Release layout (Capistrano style):
#   $APP_ROOT/releases/<name>/      one directory per release; the CLI is at
#                                   <release>/$SHIFTCHANGE_BIN_PATH
#   $APP_ROOT/current -> releases/<name>
#
# Steps, in order; a failure stops the script with a non-zero status:
#   1. check   the new release's CLI runs `config check` (nothing changed yet)
#      quiet   `shiftchange quiet`: this host's servers stop claiming new jobs
#              and keep running theirs, so nothing new starts on a server about
#              to be stopped while the steps below run (a failure here is only
#              a warning: the handoff still moves every job)
#   2. migrate `shiftchange db upgrade` with the new release (only --migrate;
#              the schema must keep serving the old release on other hosts)
#   3. handoff `shiftchange handoff`: one transaction marks this host's
#              servers stopped and requeues their in-flight jobs, then each
#              supervisor gets SIGTERM and is waited for (works even if it is
#              frozen). Uses the new release's CLI, so a release that needs a
#              newer schema fails here, before anything was stopped. Jobs are
#              requeued at once, so use shutdown.drain: 0s with this script.
#   4. switch  `current` -> the new release, atomically (rename of a symlink)
#   5. start   the new release's supervisor (see --start)
# A failure in 1-3 leaves the old release as `current`; if 3 failed, the old
# supervisor may still run and has its jobs. A failure in 4-5 leaves no
# supervisor on this host; its jobs wait in the queue for any other server.
# Roll back by running this script again with the previous release.
#
# Usage:
#   deploy-step.sh --release NAME|DIR [--app-root DIR] [--config PATH]
#                  [--timeout SECONDS] [--server NAME_OR_ID]
#                  [--start systemd|background|none] [--unit UNIT]...
#                  [--migrate] [--dry-run]
#
# Environment (flags win):
#   SHIFTCHANGE_APP_ROOT         --app-root (default /srv/app)
#   SHIFTCHANGE_CONFIG           --config; also read by every shiftchange
#                                command. Unset: ./shiftchange.yaml in the
#                                new release directory, else built-in defaults.
#   SHIFTCHANGE_DATABASE_URL     passed through; overrides database.url
#   SHIFTCHANGE_HANDOFF_TIMEOUT  --timeout (default 30): seconds handoff waits
#                                for a supervisor to exit; keep it above
#                                shutdown.drain + shutdown.kill_after + 1
#   SHIFTCHANGE_SERVER           --server: hand off this server only (default:
#                                every running server registered from this host)
#   SHIFTCHANGE_START            --start (default systemd)
#   SHIFTCHANGE_UNITS            units for --start systemd, space separated
#                                (default shiftchange.service); the unit's
#                                ExecStart must reach $APP_ROOT/current, e.g.
#                                /usr/local/bin/shiftchange -> that release's CLI
#   SHIFTCHANGE_BIN_PATH         CLI inside a release (default .venv/bin/shiftchange)
#   SHIFTCHANGE_LOG              log file for --start background
#                                (default $APP_ROOT/shared/log/shiftchange.log)
#
# Run it as root or as the supervisor's user: handoff must be allowed to
# signal the supervisor. See docs/deploying.md.
set -euo pipefail

prog="deploy-step"
app_root="${SHIFTCHANGE_APP_ROOT:-/srv/app}"
config="${SHIFTCHANGE_CONFIG:-}"
timeout="${SHIFTCHANGE_HANDOFF_TIMEOUT:-30}"
server="${SHIFTCHANGE_SERVER:-}"
start="${SHIFTCHANGE_START:-systemd}"
read -r -a units <<<"${SHIFTCHANGE_UNITS:-shiftchange.service}"
bin_path="${SHIFTCHANGE_BIN_PATH:-.venv/bin/shiftchange}"
log_file="${SHIFTCHANGE_LOG:-}"
release=""
migrate=0
dry_run=0
units_from_flags=0

say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { say "error: $*"; exit "${2:-1}"; }
usage_error() { say "$1"; say "usage: $prog --release NAME|DIR [--app-root DIR] [--config PATH] [--timeout S] [--server NAME] [--start systemd|background|none] [--unit UNIT]... [--migrate] [--dry-run]"; exit 2; }

# Run a command that changes something; under --dry-run only show it.
run() {
    if (( dry_run )); then
        say "would run: $*"
    else
        say "run: $*"
        "$@"
    fi
}

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --release)  need_value "$@"; release="$2"; shift 2 ;;
        --app-root) need_value "$@"; app_root="$2"; shift 2 ;;
        --config)   need_value "$@"; config="$2"; shift 2 ;;
        --timeout)  need_value "$@"; timeout="$2"; shift 2 ;;
        --server)   need_value "$@"; server="$2"; shift 2 ;;
        --start)    need_value "$@"; start="$2"; shift 2 ;;
        --unit)
            need_value "$@"
            if (( ! units_from_flags )); then units=(); units_from_flags=1; fi
            units+=("$2"); shift 2 ;;
        --migrate)  migrate=1; shift ;;
        --dry-run)  dry_run=1; shift ;;
        -h|--help)  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *)          usage_error "unknown argument: $1" ;;
    esac
done

# --- Validate everything before touching anything -----------------------------
[[ -n "$release" ]] || usage_error "--release is required"
[[ "$timeout" =~ ^[0-9]+([.][0-9]+)?$ ]] || usage_error "--timeout must be a number of seconds, got '$timeout'"
case "$start" in
    systemd|background|none) ;;
    *) usage_error "--start must be systemd, background or none, got '$start'" ;;
esac
if [[ "$start" == systemd ]]; then
    (( ${#units[@]} > 0 )) || usage_error "--start systemd needs at least one unit"
    command -v systemctl >/dev/null || die "--start systemd, but systemctl is not installed" 2
fi
[[ -d "$app_root" ]] || die "app root $app_root is not a directory" 2
app_root="$(cd "$app_root" && pwd -P)"

# A bare name means $APP_ROOT/releases/NAME; anything with a slash is a path.
if [[ "$release" == */* ]]; then
    release_dir="$release"
else
    release_dir="$app_root/releases/$release"
fi
[[ -d "$release_dir" ]] || die "release directory $release_dir does not exist" 2
release_dir="$(cd "$release_dir" && pwd -P)"
cli="$release_dir/$bin_path"
[[ -x "$cli" ]] || die "no executable shiftchange CLI at $cli (set SHIFTCHANGE_BIN_PATH)" 2

# The commands below run in the release directory: make a relative config
# path absolute first, and hand it to every command through the environment.
if [[ -n "$config" ]]; then
    [[ "$config" == /* ]] || config="$PWD/$config"
    [[ -f "$config" ]] || die "config file $config does not exist" 2
    export SHIFTCHANGE_CONFIG="$config"
fi
log_file="${log_file:-$app_root/shared/log/shiftchange.log}"

# Where `current` should point: relative when the release is under releases/,
# so the tree can be moved or mounted elsewhere.
if [[ "$release_dir" == "$app_root/releases/"* ]]; then
    link_target="releases/${release_dir#"$app_root/releases/"}"
else
    link_target="$release_dir"
fi

# One deploy per app root at a time.
if command -v flock >/dev/null; then
    exec 9>>"$app_root/.deploy-step.lock"
    flock -n 9 || die "another deploy-step holds $app_root/.deploy-step.lock"
fi

cd "$release_dir"

# --- 1. check ------------------------------------------------------------------
say "release $release_dir"
"$cli" config check || die "config check failed for the new release; nothing was changed" 2

# --- quiet ---------------------------------------------------------------------
quiet=("$cli" quiet)
[[ -z "$server" ]] || quiet+=(--server "$server")
run "${quiet[@]}" || say "warning: quiet failed; going on (the handoff below still moves every job)"

# --- 2. migrate ----------------------------------------------------------------
if (( migrate )); then
    run "$cli" db upgrade || die "db upgrade failed; nothing else was changed"
fi

# --- 3. handoff ----------------------------------------------------------------
handoff=("$cli" handoff --timeout "$timeout")
[[ -z "$server" ]] || handoff+=(--server "$server")
status=0
run "${handoff[@]}" || status=$?
if (( status != 0 )); then
    die "handoff exited $status; \`current\` still points at the old release" "$status"
fi

# --- 4. switch -----------------------------------------------------------------
# ln -sfn would unlink and recreate (a moment with no `current`); renaming a
# new symlink over the old one is atomic.
tmp_link="$app_root/.current.$$"
run ln -sfn "$link_target" "$tmp_link"
run mv -T "$tmp_link" "$app_root/current"

# --- 5. start ------------------------------------------------------------------
case "$start" in
    systemd)
        # Type=notify: restart returns once the new supervisor has sent
        # READY=1, i.e. it is registered and claiming. After the handoff the
        # unit is already stopped, so this is a plain start; if it still runs
        # (not selected by --server), systemd's SIGTERM hands its jobs off.
        run systemctl restart "${units[@]}"
        ;;
    background)
        # For hosts without a service manager. setsid: its own session, so a
        # closed deploy terminal (SIGHUP) does not reach it.
        run mkdir -p "$(dirname "$log_file")"
        if (( dry_run )); then
            say "would run: setsid $cli run >>$log_file 2>&1 &"
        else
            say "run: setsid $cli run >>$log_file 2>&1 &"
            # 9>&-: the supervisor must not inherit the deploy lock.
            setsid "$cli" run >>"$log_file" 2>&1 </dev/null 9>&- &
            pid=$!
            sleep 2
            # Still our child: if it has exited, wait reaps it at once and
            # returns its status; if it runs, the job is still listed.
            if ! jobs -rp | grep -qx "$pid"; then
                wait "$pid" || true
                die "the new supervisor exited at once; see $log_file"
            fi
            say "supervisor running, pid $pid, log $log_file"
        fi
        ;;
    none)
        say "not starting a supervisor (--start none): your process manager must start $app_root/current/$bin_path run"
        ;;
esac
if (( dry_run )); then
    say "dry run: nothing was changed (current would point at $link_target)"
else
    say "done: current -> $link_target"
fi
