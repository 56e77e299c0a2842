"""The deploy glue: systemd units, hook scripts, the Kubernetes snippet and the
platform table.

Nothing here needs the supervisor package: the hooks are driven against a stub
`shiftchange` that records how it was called, so these tests check what the
scripts do (order of steps, exit codes, what they leave behind), not only that
they parse.
"""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / "hooks"
UNITS = REPO / "systemd"
UNIT_FILES = ["shiftchange.service", "shiftchange@.service"]
HOOK_SCRIPTS = sorted(HOOKS.glob("*.sh"))
CLI_PATH = "/usr/local/bin/shiftchange"

# Contract defaults (shutdown.drain, shutdown.kill_after) and the rule every
# grace period must satisfy: drain + kill_after + ~1 s < grace.
DEFAULT_DRAIN = 0.0
DEFAULT_KILL_AFTER = 2.0
EXIT_MARGIN = 1.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SHELLCHECK = shutil.which("shellcheck")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed: the unit files were NOT verified",
)


def seconds(value) -> float:
    """A duration as written in config, docs or units ("200ms", "10s", "5 s",
    "2min", 30) in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|sec|min|m|h|d)?\s*", str(value))
    assert match, f"not a duration: {value!r}"
    number, unit = float(match.group(1)), match.group(2) or "s"
    factor = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}[unit]
    return number * factor


def test_seconds_parses_the_duration_forms_we_use():
    assert seconds("200ms") == 0.2
    assert seconds("10s") == 10
    assert seconds("5 s") == 5
    assert seconds("2min") == 120
    assert seconds(30) == 30


# --- systemd units ---------------------------------------------------------------


def parse_unit(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order; systemd allows repeated keys."""
    entries: dict[tuple[str, str], list[str]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        assert section, f"{path.name}: key outside a section: {raw!r}"
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


def one(entries, section, key):
    values = entries.get((section, key))
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
    return values[0]


def analyze_verify(unit_path: Path, name: str | None = None) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` and return its status and the output lines
    that concern this unit (other units on the host may print their own noise)."""
    target = unit_path.parent / name if name else unit_path
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    stem = unit_path.name.split("@")[0].removesuffix(".service")
    ours = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if str(unit_path.parent) in line or stem in line
    ]
    return proc.returncode, ours


def copy_with_existing_cli(tmp_path: Path, unit: str) -> Path:
    """The unit with ExecStart pointing at an executable that exists here, so
    verify checks everything else instead of stopping at the missing CLI."""
    stub = tmp_path / "bin" / "shiftchange"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (UNITS / unit).read_text()
    assert CLI_PATH in text
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    copy = unit_dir / unit
    copy.write_text(text.replace(CLI_PATH, str(stub)))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_reports_a_broken_unit(tmp_path):
    """Control: verify exits 0 even on unknown keys, so the tests below look at
    its output too; this proves that output appears for a bad unit here."""
    bad = tmp_path / "units" / "shiftchange-broken.service"
    bad.parent.mkdir()
    bad.write_text("[Service]\nExecStart=/bin/true\nKillMode=sideways\nNoSuchKey=1\n")
    _, lines = analyze_verify(bad)
    assert any("NoSuchKey" in line for line in lines), lines
    assert any("kill mode" in line.lower() for line in lines), lines


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_passes_systemd_analyze_verify(tmp_path, unit):
    copy = copy_with_existing_cli(tmp_path, unit)
    names = [None] if "@" not in unit else [None, unit.replace("@", "@ci")]
    for name in names:
        status, lines = analyze_verify(copy, name)
        assert status == 0, lines
        assert lines == [], f"systemd-analyze verify {name or unit}:\n" + "\n".join(lines)


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_as_shipped_only_lacks_the_installed_cli(unit):
    """Verified in place, the only complaint allowed is that the CLI is not
    installed at /usr/local/bin/shiftchange on this machine."""
    status, lines = analyze_verify(UNITS / unit)
    if Path(CLI_PATH).exists():
        assert status == 0 and lines == [], lines
    else:
        assert lines, "expected verify to notice that the CLI is missing"
        assert all(CLI_PATH in line for line in lines), lines


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_lets_the_supervisor_run_its_own_shutdown(unit):
    entries = parse_unit(UNITS / unit)
    service = "Service"
    assert one(entries, service, "Type") == "notify"
    assert one(entries, service, "NotifyAccess") == "main"
    # SIGTERM to the supervisor only; SIGKILL to the whole cgroup at the end.
    assert one(entries, service, "KillMode") == "mixed"
    assert one(entries, service, "KillSignal") == "SIGTERM"
    assert one(entries, service, "Restart") == "on-failure"
    assert seconds(one(entries, service, "WatchdogSec")) > 0
    # SIGTERM does the handoff: no stop command that could race it.
    assert (service, "ExecStop") not in entries
    stop = seconds(one(entries, service, "TimeoutStopSec"))
    assert stop > DEFAULT_DRAIN + DEFAULT_KILL_AFTER + EXIT_MARGIN
    exec_start = one(entries, service, "ExecStart").split()
    assert exec_start[:3] == [CLI_PATH, "run", "--config"]
    config = exec_start[3]
    if "@" in unit:
        assert config == "/etc/shiftchange/%i.yaml"
    else:
        assert config == "/etc/shiftchange/shiftchange.yaml"


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_is_hardened_but_keeps_a_writable_state_dir(unit):
    entries = parse_unit(UNITS / unit)
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "StateDirectory": "shiftchange",
    }
    for key, value in expected.items():
        assert one(entries, "Service", key) == value, key
    # The default SQLite file (./shiftchange.db) lands in the state directory.
    assert one(entries, "Service", "WorkingDirectory") == "/var/lib/shiftchange"
    # The notify socket is AF_UNIX: restricting it away would break READY=1.
    families = one(entries, "Service", "RestrictAddressFamilies").split()
    assert "AF_UNIX" in families
    assert one(entries, "Install", "WantedBy") == "multi-user.target"


def test_template_names_each_instance_apart():
    entries = parse_unit(UNITS / "shiftchange@.service")
    exec_start = one(entries, "Service", "ExecStart").split()
    assert exec_start[exec_start.index("--name") + 1] == "%H-%i"


# --- hook scripts ----------------------------------------------------------------


def test_the_expected_hooks_exist():
    names = {path.name for path in HOOK_SCRIPTS}
    assert {"k8s-prestop.sh", "deploy-step.sh"} <= names
    assert (HOOKS / "k8s-pod-snippet.yaml").is_file()
    assert (HOOKS / "PLATFORMS.md").is_file()


@pytest.mark.parametrize("script", HOOK_SCRIPTS, ids=lambda p: p.name)
def test_hook_is_strict_bash_and_parses(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed: hooks NOT linted")
@pytest.mark.parametrize("script", HOOK_SCRIPTS, ids=lambda p: p.name)
def test_hook_is_shellcheck_clean(script):
    proc = subprocess.run(
        [SHELLCHECK, "--shell=bash", "--severity=style", str(script)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


STUB_CLI = r"""#!/usr/bin/env bash
# Records each call as: <args> | cwd=<dir> | config=<SHIFTCHANGE_CONFIG> | current=<link>
set -u
current=$(readlink "${STUB_APP_ROOT:-/nonexistent}/current" 2>/dev/null || echo none)
echo "$* | cwd=$PWD | config=${SHIFTCHANGE_CONFIG:-} | current=$current" >>"$STUB_LOG"
case "$1" in
    config|db) code_var="STUB_EXIT_$1_$2" ;;
    *) code_var="STUB_EXIT_$1" ;;
esac
# `run` stays up like a supervisor, unless told to exit at once.
if [[ "$1" == run && -z "${STUB_EXIT_run:-}" ]]; then
    echo $$ >"$STUB_LOG.pid"
    exec sleep 60
fi
exit "${!code_var:-0}"
"""


def write_stub(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB_CLI)
    path.chmod(0o755)
    return path


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def hook_env(tmp_path: Path, **extra) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SHIFTCHANGE_") and key != "NOTIFY_SOCKET"
    }
    env["STUB_LOG"] = str(tmp_path / "calls.log")
    env.update({key: str(value) for key, value in extra.items()})
    return env


# k8s-prestop.sh


def run_prestop(tmp_path, **extra):
    stub_dir = tmp_path / "stubbin"
    write_stub(stub_dir / "shiftchange")
    env = hook_env(tmp_path, SHIFTCHANGE_HOOK_LOG="-", **extra)
    env["PATH"] = f"{stub_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [str(HOOKS / "k8s-prestop.sh")], env=env, capture_output=True, text=True, timeout=30
    )


def test_prestop_hands_off_every_server_of_this_host(tmp_path):
    proc = run_prestop(tmp_path, SHIFTCHANGE_HANDOFF_TIMEOUT="15")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls(tmp_path / "calls.log")
    assert call.startswith("handoff --timeout 15 |")
    assert "--server" not in call
    assert "handoff exited 0" in proc.stderr


def test_prestop_passes_server_and_config(tmp_path):
    config = tmp_path / "shiftchange.yaml"
    config.write_text("{}\n")
    proc = run_prestop(tmp_path, SHIFTCHANGE_SERVER="web-1", SHIFTCHANGE_CONFIG=config)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls(tmp_path / "calls.log")
    assert call.startswith(f"handoff --timeout 10 --server web-1 --config {config} |")


@pytest.mark.parametrize("code", [1, 2])
def test_prestop_reports_a_failed_handoff(tmp_path, code):
    proc = run_prestop(tmp_path, STUB_EXIT_handoff=code)
    assert proc.returncode == code
    assert f"handoff exited {code}" in proc.stderr


def test_prestop_refuses_a_bad_timeout_without_calling_handoff(tmp_path):
    proc = run_prestop(tmp_path, SHIFTCHANGE_HANDOFF_TIMEOUT="soon")
    assert proc.returncode == 2
    assert calls(tmp_path / "calls.log") == []


# deploy-step.sh


@pytest.fixture
def app(tmp_path):
    """An app root with releases r1 (current) and r2, each with a stub CLI."""
    root = tmp_path / "app"
    for name in ("r1", "r2"):
        write_stub(root / "releases" / name / ".venv" / "bin" / "shiftchange")
    (root / "current").symlink_to("releases/r1")
    return root


def deploy(tmp_path, app, *args, path_extra: Path | None = None, **extra):
    env = hook_env(tmp_path, SHIFTCHANGE_APP_ROOT=app, STUB_APP_ROOT=app, **extra)
    if path_extra:
        env["PATH"] = f"{path_extra}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [str(HOOKS / "deploy-step.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def commands(tmp_path) -> list[str]:
    return [call.split(" | ")[0] for call in calls(tmp_path / "calls.log")]


def test_deploy_hands_off_before_switching_current(tmp_path, app):
    proc = deploy(tmp_path, app, "--release", "r2", "--start", "none", "--timeout", "12")
    assert proc.returncode == 0, proc.stderr
    assert commands(tmp_path) == ["config check", "quiet", "handoff --timeout 12"]
    handoff = calls(tmp_path / "calls.log")[1]
    # The old release was still `current` while its jobs were handed off...
    assert "current=releases/r1" in handoff
    # ...with the new release's CLI, run from the new release directory.
    assert f"cwd={app.resolve()}/releases/r2" in handoff
    # ...and `current` points at the new release afterwards, as a relative link.
    assert os.readlink(app / "current") == "releases/r2"
    assert not list(app.glob(".current.*")), "temporary link left behind"


def test_deploy_migrates_before_the_handoff(tmp_path, app):
    proc = deploy(tmp_path, app, "--release", "r2", "--start", "none", "--migrate")
    assert proc.returncode == 0, proc.stderr
    assert commands(tmp_path) == ["config check", "quiet", "db upgrade", "handoff --timeout 30"]


def test_deploy_passes_config_and_server(tmp_path, app):
    config = tmp_path / "conf" / "shiftchange.yaml"
    config.parent.mkdir()
    config.write_text("{}\n")
    proc = deploy(
        tmp_path, app, "--release", "r2", "--start", "none",
        "--config", str(config), "--server", "web-1",
    )
    assert proc.returncode == 0, proc.stderr
    log = calls(tmp_path / "calls.log")
    assert all(f"config={config}" in call for call in log), log
    assert commands(tmp_path)[-2:] == ["quiet --server web-1", "handoff --timeout 30 --server web-1"]


def test_deploy_goes_on_when_quiet_fails(tmp_path, app):
    proc = deploy(tmp_path, app, "--release", "r2", "--start", "none", STUB_EXIT_quiet=1)
    assert proc.returncode == 0, proc.stderr
    assert "warning: quiet failed" in proc.stderr
    assert commands(tmp_path) == ["config check", "quiet", "handoff --timeout 30"]
    assert os.readlink(app / "current") == "releases/r2"


@pytest.mark.parametrize("code", [1, 2])
def test_deploy_keeps_the_old_release_when_handoff_fails(tmp_path, app, code):
    proc = deploy(tmp_path, app, "--release", "r2", "--start", "none", STUB_EXIT_handoff=code)
    assert proc.returncode == code
    assert os.readlink(app / "current") == "releases/r1"
    assert "old release" in proc.stderr


def test_deploy_stops_before_the_handoff_when_the_config_is_bad(tmp_path, app):
    proc = deploy(tmp_path, app, "--release", "r2", "--start", "none", STUB_EXIT_config_check=2)
    assert proc.returncode == 2
    assert commands(tmp_path) == ["config check"]
    assert os.readlink(app / "current") == "releases/r1"


def test_deploy_dry_run_changes_nothing(tmp_path, app):
    proc = deploy(tmp_path, app, "--release", "r2", "--start", "none", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert commands(tmp_path) == ["config check"]
    assert os.readlink(app / "current") == "releases/r1"
    assert "would run:" in proc.stderr and "handoff" in proc.stderr
    assert "nothing was changed" in proc.stderr.splitlines()[-1]
    assert "done:" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--release", "r9"],
        ["--release", "r2", "--start", "upstart"],
        ["--release", "r2", "--timeout", "soon"],
        ["--release", "r2", "--bogus"],
    ],
    ids=["no-release", "missing-release", "bad-start", "bad-timeout", "unknown-flag"],
)
def test_deploy_rejects_bad_usage_without_side_effects(tmp_path, app, args):
    proc = deploy(tmp_path, app, *args)
    assert proc.returncode == 2, proc.stderr
    assert calls(tmp_path / "calls.log") == []
    assert os.readlink(app / "current") == "releases/r1"


def test_deploy_restarts_the_systemd_units_after_the_switch(tmp_path, app):
    stub_dir = tmp_path / "sysbin"
    write_stub(stub_dir / "systemctl")
    proc = deploy(
        tmp_path, app, "--release", "r2", "--unit", "shiftchange@mail.service",
        "--unit", "shiftchange@reports.service", path_extra=stub_dir,
    )
    assert proc.returncode == 0, proc.stderr
    log = calls(tmp_path / "calls.log")
    assert [call.split(" | ")[0] for call in log] == [
        "config check",
        "quiet",
        "handoff --timeout 30",
        "restart shiftchange@mail.service shiftchange@reports.service",
    ]
    assert "current=releases/r2" in log[-1]


def test_deploy_background_start_runs_the_new_release_detached(tmp_path, app):
    log_file = tmp_path / "logs" / "shiftchange.log"
    proc = deploy(
        tmp_path, app, "--release", "r2", "--start", "background", SHIFTCHANGE_LOG=log_file
    )
    pid_file = Path(str(tmp_path / "calls.log") + ".pid")
    try:
        assert proc.returncode == 0, proc.stderr
        assert commands(tmp_path) == ["config check", "quiet", "handoff --timeout 30", "run"]
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # still running after the script returned
        assert os.getsid(pid) == pid, "not in a session of its own"
        assert f"cwd={app.resolve()}/releases/r2" in calls(tmp_path / "calls.log")[-1]
        # It did not keep the deploy lock: a second deploy can take it.
        again = deploy(tmp_path, app, "--release", "r1", "--start", "none")
        assert again.returncode == 0, again.stderr
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_deploy_background_start_reports_a_supervisor_that_dies(tmp_path, app):
    proc = deploy(
        tmp_path, app, "--release", "r2", "--start", "background",
        SHIFTCHANGE_LOG=tmp_path / "s.log", STUB_EXIT_run=3,
    )
    assert proc.returncode == 1
    assert "exited at once" in proc.stderr
    assert commands(tmp_path)[-1] == "run"


# --- Kubernetes snippet ------------------------------------------------------------


def load_snippet():
    docs = [doc for doc in yaml.safe_load_all((HOOKS / "k8s-pod-snippet.yaml").read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert set(by_kind) == {"ConfigMap", "Deployment"}, list(by_kind)
    return by_kind["ConfigMap"], by_kind["Deployment"]


def test_pod_snippet_grace_covers_the_shutdown_sequence():
    config_map, deployment = load_snippet()
    config = yaml.safe_load(config_map["data"]["shiftchange.yaml"])
    drain = seconds(config["shutdown"]["drain"])
    kill_after = seconds(config["shutdown"]["kill_after"])
    pod = deployment["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace > drain + kill_after + EXIT_MARGIN

    (container,) = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    handoff_timeout = seconds(env["SHIFTCHANGE_HANDOFF_TIMEOUT"]["value"])
    # The hook waits long enough for the supervisor to finish its sequence,
    # and returns before the kubelet's SIGKILL.
    assert drain + kill_after + EXIT_MARGIN <= handoff_timeout < grace

    server = config["server"]
    assert seconds(server["dead_after"]) >= 5 * seconds(server["heartbeat_interval"])


def test_pod_snippet_runs_the_supervisor_as_pid_1_with_the_prestop_hook():
    config_map, deployment = load_snippet()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Exec form, no shell in between to swallow SIGTERM.
    assert container["command"] == ["shiftchange", "run"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "/usr/local/bin/shiftchange-prestop"
    ]
    env = {item["name"]: item for item in container["env"]}
    assert "secretKeyRef" in env["SHIFTCHANGE_DATABASE_URL"]["valueFrom"]

    # SHIFTCHANGE_CONFIG names the file that the ConfigMap mount provides.
    config_path = Path(env["SHIFTCHANGE_CONFIG"]["value"])
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount["name"] == volume["name"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert str(config_path.parent) == mount["mountPath"]
    assert config_path.name in config_map["data"]


# --- the platform table --------------------------------------------------------------


def platform_rows():
    """Rows of the settings table in hooks/PLATFORMS.md, as dicts by header."""
    lines = (HOOKS / "PLATFORMS.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Platform"))
    headers = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(headers, cells)))
    return rows


def first_seconds(cell: str) -> float:
    match = re.search(r"[0-9]+(?:\.[0-9]+)?\s*(?:ms|s|min)\b", cell)
    assert match, f"no duration in {cell!r}"
    return seconds(match.group(0).replace(" ", ""))


def test_platform_table_covers_every_platform():
    names = " ".join(row["Platform"] for row in platform_rows())
    for platform in ["Heroku", "Fly.io", "Cloud Run", "ECS", "AppHarbor", "Kubernetes", "systemd"]:
        assert platform in names, platform


@pytest.mark.parametrize("row", platform_rows(), ids=lambda row: row["Platform"])
def test_platform_settings_fit_the_grace(row):
    grace = first_seconds(row["Grace"])
    drain = first_seconds(row["drain"])
    kill_after = first_seconds(row["kill_after"])
    heartbeat = first_seconds(row["heartbeat_interval"])
    dead_after = first_seconds(row["dead_after"])
    assert drain + kill_after + EXIT_MARGIN < grace
    assert dead_after >= 5 * heartbeat
