"""
The files in C{config/}: the example settings file documents every setting
and loads; settings-file mistakes are one clear sentence; the systemd units
pass C{systemd-analyze verify} and are hardened; and the command lines in the
units and the supervisor section are accepted by the peer's own option parser
and by twistd's.
"""

import configparser
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib

import pytest
from support import can_bind
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from twisted_p2p import tap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "config")
EXAMPLE = os.path.join(CONFIG, "peer.example.toml")
UNIT = os.path.join(CONFIG, "systemd", "p2ppeer.service")
TEMPLATE = os.path.join(CONFIG, "systemd", "p2ppeer@.service")
SUPERVISOR = os.path.join(CONFIG, "supervisor", "p2ppeer.conf")

#: Where the shipped units and supervisor section expect twistd.
INSTALLED_TWISTD = "/opt/twisted-p2p/bin/twistd"
#: The twistd of the Python running the tests.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

KNOWN = (
    "transfer-port, discovery-port, host, broadcast, peer, advertise-host, name, "
    "max-peers-per-host, announce-interval, peer-timeout, "
    "shared, downloads, state-dir, console, max-upload-rate, max-uploads, "
    "share-downloads, log-file, log-format, group-key-file, replicas, cache-size, "
    "distribute-interval"
)

#: A commented-out setting: "# key = value".
COMMENTED_SETTING = re.compile(r"^#\s*([a-z][a-z0-9-]*\s*=.*)$", re.MULTILINE)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def free_ports():
    """
    (T, D): T to T+3 free for TCP on every address (the example's host is
    0.0.0.0), and D free for UDP, outside T to T+3; all in 20000-32000,
    below the ephemeral range.
    """
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - 4)
        discovery = rng.randrange(20000, 32000)
        if base <= discovery <= base + 3:
            continue
        transfer_free = all(
            can_bind(socket.SOCK_STREAM, port, "0.0.0.0") for port in range(base, base + 4)
        )
        if transfer_free and can_bind(socket.SOCK_DGRAM, discovery, ""):
            return base, discovery
    pytest.fail("no free transfer and discovery ports in 20000-32000")


def example_with_free_ports(folder):
    """
    The example settings file, copied into C{folder} with free ports in place
    of 27101 and 27000 (which may be in use here); its path.
    """
    transfer, discovery = free_ports()
    text = read(EXAMPLE)
    text, replaced = re.subn(r"^transfer-port = 27101$", f"transfer-port = {transfer}", text, flags=re.M)
    assert replaced == 1, "the example no longer sets transfer-port = 27101"
    text, replaced = re.subn(r"^discovery-port = 27000$", f"discovery-port = {discovery}", text, flags=re.M)
    assert replaced == 1, "the example no longer sets discovery-port = 27000"
    path = os.path.join(folder, "peer.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture
def peer_dir(tmp_path, monkeypatch):
    """
    A working directory with a shared/ folder, as a peer is run in.
    """
    (tmp_path / "shared").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(folder, text, name="peer.toml"):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# --- the example settings file ---


def test_example_loads():
    settings = tap.load_settings(EXAMPLE)
    assert settings["transfer-port"] == 27101
    assert settings["discovery-port"] == tap.DEFAULT_DISCOVERY_PORT


def test_example_documents_every_setting():
    """
    Every setting appears in the example, set or (like log-file, which has no
    useful value to show) commented out as "# key = value"; and nothing else.
    """
    text = read(EXAMPLE)
    set_keys = set(tomllib.loads(text))
    commented_keys = {line.split("=")[0].strip() for line in COMMENTED_SETTING.findall(text)}
    assert set_keys | commented_keys == set(tap.SETTINGS)
    assert set_keys & commented_keys == set()


def test_example_commented_settings_are_valid(tmp_path):
    """
    Uncommenting a commented setting gives a file that still loads.
    """
    commented = COMMENTED_SETTING.findall(read(EXAMPLE))
    assert commented
    for line in commented:
        path = write(tmp_path, line + "\n")
        assert len(tap.load_settings(path)) == 1


def test_example_shows_the_defaults(peer_dir):
    """
    Apart from its ports, the example changes nothing: copying it and
    setting a transfer port gives the same peer as no settings file at all.
    """
    path = example_with_free_ports(peer_dir)
    transfer = str(tomllib.loads(read(path))["transfer-port"])
    discovery = str(tomllib.loads(read(path))["discovery-port"])
    with_file = tap.Options()
    with_file.parseOptions(["--config", path])
    without = tap.Options()
    without.parseOptions(["--transfer-port", transfer, "--discovery-port", discovery])
    assert {key: with_file[key] for key in tap.SETTINGS} == {key: without[key] for key in tap.SETTINGS}


def test_options_from_the_example(peer_dir):
    path = example_with_free_ports(peer_dir)
    with open(path, "rb") as f:
        settings = tomllib.load(f)
    options = tap.Options()
    options.parseOptions(["--config", path])
    assert options["transfer-port"] == settings["transfer-port"]
    assert options["discovery-port"] == settings["discovery-port"]
    assert options["host"] == settings["host"] == "any"
    assert options["broadcast"] == settings["broadcast"] == "auto"
    assert options["peer"] == [] and "peer" not in settings
    assert options["max-peers-per-host"] == settings["max-peers-per-host"] == 64
    assert options["announce-interval"] == settings["announce-interval"] == 5.0
    assert options["peer-timeout"] == settings["peer-timeout"] == 15.0
    assert options["shared"] == str(peer_dir / settings["shared"]) == str(peer_dir / "shared")
    assert options["downloads"] == str(peer_dir / settings["downloads"]) == str(peer_dir / "downloads")
    assert options["state-dir"] == str(peer_dir / settings["state-dir"]) == str(peer_dir / ".p2ppeer")
    assert os.path.isdir(options["downloads"])
    assert os.path.isdir(options["state-dir"])
    assert options["console"] == settings["console"] == "auto"
    assert options["log-file"] is None
    assert options["log-format"] == settings["log-format"] == "text"
    assert settings["max-upload-rate"] == "0" and options["max-upload-rate"] is None
    assert options["max-uploads"] == settings["max-uploads"] == 32
    assert options["share-downloads"] is settings["share-downloads"] is True


def test_example_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "shared").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    options = tap.Options()
    options.parseOptions(["--config", example_with_free_ports(etc)])
    assert options["shared"] == str(elsewhere / "shared")
    assert options["downloads"] == str(elsewhere / "downloads")
    assert options["state-dir"] == str(elsewhere / ".p2ppeer")


def test_command_line_wins_over_the_example(peer_dir):
    path = example_with_free_ports(peer_dir)
    options = tap.Options()
    options.parseOptions(
        [
            "--config", path,
            "--announce-interval", "2",
            "--console", "off",
            "--broadcast", "127.255.255.255",
            "--share-downloads", "no",
            "--max-upload-rate", "25M",
        ]
    )
    assert options["announce-interval"] == 2.0
    assert options["console"] == "off"
    assert options["broadcast"] == "127.255.255.255"
    assert options["share-downloads"] is False
    assert options["max-upload-rate"] == 25 * 2**20  # binary, as the console shows rates
    # What the command line leaves alone still comes from the file.
    assert options["peer-timeout"] == 15.0
    assert options["transfer-port"] == tomllib.loads(read(path))["transfer-port"]


# --- settings-file mistakes ---


def refusal(path, *arguments):
    """
    The message of the UsageError that both L{tap.load_settings} and
    C{--config} give for C{path}; they must agree.
    """
    with pytest.raises(usage.UsageError) as loading:
        tap.load_settings(path)
    with pytest.raises(usage.UsageError) as parsing:
        tap.Options().parseOptions(["--config", path, *arguments])
    assert str(parsing.value) == str(loading.value)
    return str(loading.value)


def test_unknown_setting(peer_dir):
    path = write(peer_dir, 'transfer-port = 27101\ncolour = "red"\n')
    assert refusal(path) == f"{path}: unknown setting 'colour' (known: {KNOWN})"


def test_underscore_setting_is_unknown(peer_dir):
    """
    The keys are the options' long names, with dashes.
    """
    path = write(peer_dir, "transfer_port = 27101\n")
    assert refusal(path) == f"{path}: unknown setting 'transfer_port' (known: {KNOWN})"


def test_table_is_an_unknown_setting(peer_dir):
    path = write(peer_dir, '[settings]\nhost = "0.0.0.0"\n')
    assert refusal(path) == f"{path}: unknown setting 'settings' (known: {KNOWN})"


@pytest.mark.parametrize(
    "line, wanted",
    [
        ('transfer-port = "x"', "setting 'transfer-port' must be an integer, not str 'x'"),
        ('transfer-port = "27101"', "setting 'transfer-port' must be an integer, not str '27101'"),
        ("transfer-port = 27101.0", "setting 'transfer-port' must be an integer, not float 27101.0"),
        ("max-uploads = true", "setting 'max-uploads' must be an integer, not bool True"),
        ("host = 127", "setting 'host' must be a string, not int 127"),
        ('announce-interval = "5"', "setting 'announce-interval' must be an integer or a number, not str '5'"),
        ("share-downloads = 1", "setting 'share-downloads' must be a string or true or false, not int 1"),
        ("max-upload-rate = 2.5", "setting 'max-upload-rate' must be a string or an integer, not float 2.5"),
        ('shared = ["a", "b"]', "setting 'shared' must be a string, not list ['a', 'b']"),
    ],
)
def test_wrong_type(peer_dir, line, wanted):
    path = write(peer_dir, line + "\n")
    assert refusal(path, "--transfer-port", "27101") == f"{path}: {wanted}"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("transfer-port = \n", "Invalid value (at line 1, column 17)"),
        ('host = "a"\nhost = "b"\n', "Cannot overwrite a value (at line 2, column 11)"),
        ('host = "0.0.0.0\n', "Illegal character '\\n' (at line 1, column 16)"),
        ("transfer-port: 27101\n", "Expected '=' after a key in a key/value pair (at line 1, column 14)"),
    ],
)
def test_invalid_toml(peer_dir, text, problem):
    path = write(peer_dir, text)
    assert refusal(path) == f"the settings file {path} is not valid TOML: {problem}"


def test_a_settings_file_that_is_not_utf8_is_refused(peer_dir):
    # Found by tests/test_fuzz_local.py: it used to end twistd with a traceback.
    path = str(peer_dir / "latin1.toml")
    with open(path, "wb") as f:
        f.write('name = "caf\u00e9"\n'.encode("latin-1"))
    assert refusal(path) == f"the settings file {path} is not valid TOML: it is not UTF-8 text"


def test_missing_settings_file(peer_dir):
    path = str(peer_dir / "nowhere.toml")
    assert refusal(path) == f"cannot read the settings file {path}: No such file or directory"


def test_settings_file_is_a_folder(peer_dir):
    path = str(peer_dir / "shared")
    assert refusal(path) == f"cannot read the settings file {path}: Is a directory"


# --- systemd ---


def unit_lines(path):
    """
    The active (not commented) lines of a unit file, stripped.
    """
    return [
        line.strip()
        for line in read(path).splitlines()
        if line.strip() and not line.lstrip().startswith(("#", ";"))
    ]


def directive(path, name):
    [value] = [line.split("=", 1)[1] for line in unit_lines(path) if line.split("=", 1)[0] == name]
    return value


def unit_with_real_twistd(path, folder, name, extra_service_line=None):
    """
    A copy of the unit at C{path} as C{folder/name}, running this Python's
    twistd; with C{extra_service_line} added to its [Service] section.
    """
    text = read(path)
    assert text.count(f"ExecStart={INSTALLED_TWISTD} ") == 1
    text = text.replace(f"ExecStart={INSTALLED_TWISTD} ", f"ExecStart={TWISTD} ")
    if extra_service_line is not None:
        text = text.replace("[Service]\n", f"[Service]\n{extra_service_line}\n")
    copy = os.path.join(folder, name)
    with open(copy, "w", encoding="utf-8") as f:
        f.write(text)
    return copy


def systemd_analyze_verify(*units):
    return subprocess.run(
        ["systemd-analyze", "verify", *units],
        capture_output=True,
        text=True,
        timeout=120,
    )


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed here (it comes with systemd)",
)


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    assert os.access(TWISTD, os.X_OK), f"no twistd next to {sys.executable}"
    units = [
        unit_with_real_twistd(UNIT, tmp_path, "p2ppeer.service"),
        unit_with_real_twistd(TEMPLATE, tmp_path, "p2ppeer@test.service"),
    ]
    result = systemd_analyze_verify(*units)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_systemd_analyze
def test_systemd_analyze_verify_reports_an_unknown_key(tmp_path):
    """
    The check above can fail: a warning is on stderr even when the exit
    status is 0, which is why it asserts an empty stderr.
    """
    unit = unit_with_real_twistd(UNIT, tmp_path, "p2ppeer.service", extra_service_line="Foo=bar")
    result = systemd_analyze_verify(unit)
    assert "Unknown key 'Foo' in section [Service], ignoring." in result.stderr


@needs_systemd_analyze
@pytest.mark.skipif(os.path.exists(INSTALLED_TWISTD), reason=f"{INSTALLED_TWISTD} exists here")
def test_systemd_analyze_verify_reports_a_missing_program(tmp_path):
    unit = os.path.join(tmp_path, "p2ppeer.service")
    shutil.copy(UNIT, unit)
    result = systemd_analyze_verify(unit)
    assert result.returncode != 0
    assert f"Command {INSTALLED_TWISTD} is not executable" in result.stderr


@pytest.mark.parametrize(
    "unit, folder",
    [(UNIT, "/var/lib/p2ppeer"), (TEMPLATE, "/var/lib/p2ppeer/%i")],
    ids=["p2ppeer.service", "p2ppeer@.service"],
)
def test_units_are_hardened(unit, folder):
    lines = unit_lines(unit)
    for hardening in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "Restart=on-failure",
    ):
        assert hardening in lines
    # The peer writes only to its own folder, where it runs.
    assert directive(unit, "WorkingDirectory") == folder
    assert directive(unit, "ReadWritePaths") == folder
    # Needed only for a transfer port below 1024: offered, commented out.
    for capability in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert not [line for line in lines if line.startswith(capability)]
        assert f"# {capability}=CAP_NET_BIND_SERVICE" in read(unit).splitlines()


# --- the command lines: units and supervisor ---


def exec_start(unit):
    return directive(unit, "ExecStart")


def supervisor_command():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SUPERVISOR)
    return parser["program:p2ppeer"]["command"]


COMMAND_LINES = [
    pytest.param(lambda: exec_start(UNIT), "/etc/p2ppeer/peer.toml", id="p2ppeer.service"),
    pytest.param(lambda: exec_start(TEMPLATE), "/etc/p2ppeer/%i.toml", id="p2ppeer@.service"),
    pytest.param(supervisor_command, "/etc/p2ppeer/peer.toml", id="supervisor"),
]


def twistd_arguments(command_line, config, settings_file):
    """
    The arguments after twistd in C{command_line}, with the settings file
    C{config} replaced by C{settings_file}.
    """
    words = shlex.split(command_line)
    assert words[0] == INSTALLED_TWISTD
    arguments = words[1:]
    at = arguments.index("--config")
    assert arguments[at + 1] == config
    arguments[at + 1] = settings_file
    return arguments


@pytest.mark.parametrize("command_line, config", COMMAND_LINES)
def test_peer_options_accept_the_command_line(peer_dir, command_line, config):
    arguments = twistd_arguments(command_line(), config, example_with_free_ports(peer_dir))
    assert "p2ppeer" in arguments
    before = arguments[: arguments.index("p2ppeer")]
    after = arguments[arguments.index("p2ppeer") + 1 :]
    # twistd runs in the foreground (systemd and supervisor track the
    # process) with no pid file.
    assert before in (["--nodaemon", "--pidfile="], ["-n", "--pidfile="])
    options = tap.Options()
    options.parseOptions(after)
    assert options["console"] == "off"
    assert options["log-file"] == "-"


@pytest.mark.parametrize("command_line, config", COMMAND_LINES)
def test_twistd_accepts_the_command_line(peer_dir, command_line, config):
    arguments = twistd_arguments(command_line(), config, example_with_free_ports(peer_dir))
    server = ServerOptions()
    assert "p2ppeer" in [name for name, *_ in server.subCommands], (
        "twistd does not see the p2ppeer plugin: is the repository on PYTHONPATH?"
    )
    server.parseOptions(arguments)
    assert server["nodaemon"]
    assert server["pidfile"] == ""
    assert server.subCommand == "p2ppeer"
    assert isinstance(server.subOptions, tap.Options)
    assert server.subOptions["console"] == "off"
    assert server.subOptions["log-file"] == "-"


def test_log_formats():
    """
    Both units log JSON lines to the journal; supervisor keeps text.
    """
    assert shlex.split(exec_start(UNIT))[-2:] == ["--log-format", "json"]
    assert shlex.split(exec_start(TEMPLATE))[-2:] == ["--log-format", "json"]
    assert "--log-format" not in shlex.split(supervisor_command())


@pytest.mark.parametrize("command_line, config", COMMAND_LINES[:1])
def test_deployed_layout_uses_the_working_directory(tmp_path, monkeypatch, command_line, config):
    """
    As README "Deploying" installs it: the example as /etc/p2ppeer/peer.toml,
    the peer run in /var/lib/p2ppeer (which has shared/ and downloads/), and
    p2ppeer-ctl pointed at /var/lib/p2ppeer/.p2ppeer.
    """
    etc = tmp_path / "etc" / "p2ppeer"
    etc.mkdir(parents=True)
    home = tmp_path / "var" / "lib" / "p2ppeer"
    (home / "shared").mkdir(parents=True)
    (home / "downloads").mkdir()
    monkeypatch.chdir(home)
    arguments = twistd_arguments(command_line(), config, example_with_free_ports(etc))
    options = tap.Options()
    options.parseOptions(arguments[arguments.index("p2ppeer") + 1 :])
    assert options["shared"] == str(home / "shared")
    assert options["state-dir"] == str(home / ".p2ppeer")
