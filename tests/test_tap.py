"""
L{twisted_p2p.tap}: the options, each refusal in its own words, and the
service tree L{makeService} builds (constructed, never started).
"""

import os
import random
import socket
from types import SimpleNamespace

import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.python import usage

from support import can_bind
from twisted_p2p import service as service_module
from twisted_p2p import tap, tls, transfer
from twisted_p2p.group import write_new_key
from twisted_p2p.identity import Identity
from twisted_p2p.limits import MAX_PEER_TARGETS, MAX_PEERS, MAX_PEERS_PER_HOST
from twisted_p2p.index import FolderWatcher
from twisted_p2p.service import (
    ConsoleService,
    ControlService,
    DiscoveryService,
    DistributionService,
    PeerService,
    WorkersService,
)

HOST = "127.0.0.1"


def free_transfer_base():
    """
    A port T with T to T+3 free for TCP on 127.0.0.1, from 20000-32000 (below
    the ephemeral range, so the UDP port from L{free_udp_port} cannot clash).
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - 4)
        sockets = []
        try:
            for port in range(base, base + 4):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind((HOST, port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    pytest.fail("no four consecutive free TCP ports in 20000-32000")


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("", 0))
        return s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """
    A working directory with a shared/ folder.
    """
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared").mkdir()
    return tmp_path


@pytest.fixture
def ports():
    return free_transfer_base(), free_udp_port()


def parse(*args):
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def refusal(*args):
    with pytest.raises(usage.UsageError) as e:
        parse(*args)
    return str(e.value)


def good_args(ports, *extra):
    base, discovery = ports
    return (
        "--transfer-port", str(base),
        "--discovery-port", str(discovery),
        "--host", HOST,
        *extra,
    )


# -- refusals -----------------------------------------------------------------


def test_transfer_port_is_required(folder):
    assert refusal() == "--transfer-port is required, for example --transfer-port 27101"


@pytest.mark.parametrize("port", ["0", "-1", "65533", "65535", "70000"])
def test_transfer_port_out_of_range(folder, port):
    assert refusal("--transfer-port", port) == (
        f"--transfer-port {port} is out of range: the peer uses T to T+3, "
        "so T must be from 1 to 65532"
    )


@pytest.mark.parametrize("port", ["abc", "27101.5", "", "0x6a00"])
def test_transfer_port_not_a_number(folder, port):
    assert refusal("--transfer-port", port) == (
        f"--transfer-port must be a whole number, not {port!r}"
    )


def test_short_transfer_port_option(folder):
    assert refusal("-t", "x") == "--transfer-port must be a whole number, not 'x'"


@pytest.mark.parametrize("port", ["0", "65536"])
def test_discovery_port_out_of_range(folder, port):
    assert refusal("--transfer-port", "20000", "--discovery-port", port) == (
        f"--discovery-port {port} is out of range (1 to 65535)"
    )


def test_discovery_port_not_a_number(folder):
    assert refusal("--transfer-port", "20000", "--discovery-port", "udp") == (
        "--discovery-port must be a whole number, not 'udp'"
    )


@pytest.mark.parametrize("discovery", [20000, 20001, 20002, 20003])
def test_discovery_port_clashes_with_the_transfer_ports(folder, discovery):
    assert refusal("--transfer-port", "20000", "--discovery-port", str(discovery)) == (
        f"--discovery-port {discovery} clashes with the transfer ports 20000-20003; "
        "choose a discovery port outside that range"
    )


@pytest.mark.parametrize("discovery", [19999, 20004])
def test_discovery_port_next_to_the_transfer_ports(tmp_path, monkeypatch, discovery):
    # No shared folder: getting as far as the folder check means the ports
    # passed.
    monkeypatch.chdir(tmp_path)
    message = refusal("--transfer-port", "20000", "--discovery-port", str(discovery))
    assert message.startswith("the shared folder shared does not exist")


@pytest.mark.parametrize("value", ["nope", "256.1.1.1", "10.0.0", "fe80::1%eth0", ""])
def test_bad_host(folder, value):
    assert refusal("--transfer-port", "20000", "--host", value) == (
        f"--host {value!r} is not an IPv4 or IPv6 address (or 'any')"
    )


@pytest.mark.parametrize("value", ["nope", "256.1.1.1", "10.0.0", "2001:db8::1"])
def test_bad_broadcast(folder, value):
    assert refusal("--transfer-port", "20000", "--broadcast", value) == (
        f"--broadcast {value!r} is not an IPv4 address or an IPv6 multicast address (or 'auto')"
    )


def test_broadcast_of_a_family_the_host_does_not_use(folder):
    assert refusal("--transfer-port", "20000", "--host", "::1", "--broadcast", "127.255.255.255") == (
        "--broadcast 127.255.255.255 is IPv4, but --host ::1 is not"
    )


@pytest.mark.parametrize("value", ["0.0.0.0", "224.0.0.1", "example.org", "fe80::1%eth0"])
def test_bad_advertise_host(folder, value):
    assert refusal("--transfer-port", "20000", "--advertise-host", value) == (
        f"--advertise-host {value!r} is not a unicast IP address"
    )


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("198.18.5.1", ("198.18.5.1", None)),
        ("198.18.5.1:27001", ("198.18.5.1", 27001)),
        ("fd00::1", ("fd00::1", None)),
        ("[fd00::1]:27001", ("fd00::1", 27001)),
        ("[FD00:0::1]", ("fd00::1", None)),
        ("peer-2.lab", ("peer-2.lab", None)),
        ("peer-2.lab:9", ("peer-2.lab", 9)),
    ],
)
def test_peer_target(text, parsed):
    assert tap.parse_peer(text) == parsed


@pytest.mark.parametrize(
    "text", ["", "[fd00::1", "[fd00::1]x", "[peer]:1", "a_b", "-a.lab", "1.2.3", "::g", "0.0.0.0"]
)
def test_bad_peer_target(text):
    with pytest.raises(usage.UsageError, match="is not HOST or HOST:PORT"):
        tap.parse_peer(text)


@pytest.mark.parametrize("text", ["198.18.5.1:0", "198.18.5.1:65536", "198.18.5.1:x", "[fd00::1]:"])
def test_bad_peer_port(text):
    with pytest.raises(usage.UsageError, match="the port must be from 1 to 65535"):
        tap.parse_peer(text)


def test_peer_is_repeatable_and_never_taken_for_peer_timeout(folder, ports):
    options = parse(*good_args(ports, "--peer", "198.18.5.1", "--peer", "198.18.6.1:27001"))
    assert options["peer"] == [("198.18.5.1", None), ("198.18.6.1", 27001)]
    # Before --peer existed, getopt took it for an abbreviation of --peer-timeout.
    assert options["peer-timeout"] == 15.0
    assert parse(*good_args(ports))["peer"] == []


def test_peer_of_a_family_the_host_does_not_use(folder, ports):
    assert refusal(*good_args(ports, "--peer", "fd00::1")) == (
        "--peer 'fd00::1' is IPv6, but --host does not use IPv6"
    )


def test_too_many_peers(folder, ports):
    args = []
    for n in range(MAX_PEER_TARGETS + 1):
        args += ["--peer", f"198.18.5.{n % 250 + 1}:{n + 1}"]
    assert refusal(*good_args(ports, *args)) == f"at most {MAX_PEER_TARGETS} --peer may be given"


@pytest.mark.parametrize("peer", ['["198.18.5.1", "[fd00::1]:9"]', '"198.18.5.1"'])
def test_peer_in_the_settings_file(folder, ports, peer):
    (folder / "peer.toml").write_text(f"peer = {peer}\n")
    options = parse("--config", "peer.toml", *good_args(ports)[:4])
    assert options["peer"][0] == ("198.18.5.1", None)
    if "fd00" in peer:
        assert options["peer"][1] == ("fd00::1", 9)


def test_peer_in_the_settings_file_must_be_strings(folder, ports):
    (folder / "peer.toml").write_text("peer = [1]\n")
    assert refusal("--config", "peer.toml", *good_args(ports)[:4]) == (
        "peer in a settings file must be a list of strings"
    )
    (folder / "peer.toml").write_text("peer = 1\n")
    assert refusal("--config", "peer.toml", *good_args(ports)[:4]) == (
        "peer.toml: setting 'peer' must be a list of strings or a string, not int 1"
    )


def test_name(folder, ports, monkeypatch):
    monkeypatch.setattr(tap.socket, "gethostname", lambda: "lab-host\x1b")
    assert parse(*good_args(ports))["name"] == "lab-host?"
    assert parse(*good_args(ports, "--name", " kitchen "))["name"] == "kitchen"
    assert parse(*good_args(ports, "--name", "x" * 100))["name"] == "x" * 64
    assert refusal(*good_args(ports, "--name", "  ")) == "--name must have a printable character"


def test_max_peers_per_host(folder, ports):
    assert parse(*good_args(ports))["max-peers-per-host"] == MAX_PEERS_PER_HOST
    assert parse(*good_args(ports, "--max-peers-per-host", "200"))["max-peers-per-host"] == 200
    for bad in ("0", str(MAX_PEERS + 1)):
        assert refusal(*good_args(ports, "--max-peers-per-host", bad)) == (
            f"--max-peers-per-host must be from 1 to {MAX_PEERS}"
        )


def test_ipv6_host(folder, ports):
    if not service_module.ipv6_available():
        pytest.skip("no IPv6 on this machine")
    base, discovery = ports
    options = parse("--transfer-port", str(base), "--discovery-port", str(discovery), "--host", "::1")
    assert options["host"] == "::1"


def test_host_not_of_this_machine(folder, ports):
    base, discovery = ports
    message = refusal(
        "--transfer-port", str(base), "--discovery-port", str(discovery), "--host", "192.0.2.1"
    )
    assert message == "--host 192.0.2.1 is not an address of this machine"


@pytest.mark.parametrize(
    "interval, message",
    [
        ("0", "--announce-interval must be more than 0 and at most 3600 seconds"),
        ("-1", "--announce-interval must be more than 0 and at most 3600 seconds"),
        ("3601", "--announce-interval must be more than 0 and at most 3600 seconds"),
        ("nan", "--announce-interval must be a finite number of seconds"),
        ("inf", "--announce-interval must be a finite number of seconds"),
        ("soon", "--announce-interval must be a number of seconds, not 'soon'"),
    ],
)
def test_bad_announce_interval(folder, interval, message):
    assert refusal("--transfer-port", "20000", "--announce-interval", interval) == message


@pytest.mark.parametrize("timeout", ["5", "4", "0"])
def test_peer_timeout_not_longer_than_the_interval(folder, timeout):
    assert refusal("--transfer-port", "20000", "--peer-timeout", timeout) == (
        "--peer-timeout must be longer than --announce-interval (5 s), "
        "or every peer would expire between announcements"
    )


def test_bad_console_mode(folder):
    assert refusal("--transfer-port", "20000", "--console", "maybe") == (
        "--console must be auto, on or off, not 'maybe'"
    )


def test_missing_shared_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refusal("--transfer-port", "20000") == (
        "the shared folder shared does not exist; create it or pass --shared"
    )
    assert refusal("--transfer-port", "20000", "--shared", "elsewhere") == (
        "the shared folder elsewhere does not exist; create it or pass --shared"
    )


def test_downloads_and_shared_the_same(folder):
    assert refusal("--transfer-port", "20000", "--downloads", "shared") == (
        "--downloads and --shared must be different folders"
    )


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_transfer_port_in_use(folder, ports, offset):
    base, _ = ports
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind((HOST, base + offset))
        busy.listen(1)
        assert refusal(*good_args(ports)) == (
            f"port {base + offset} is already in use: stop what uses it or "
            "pass another --transfer-port"
        )
    finally:
        busy.close()


def test_under_twistd_a_refusal_is_one_sentence(folder, capsys):
    options = tap.Options()
    options.parent = {"nodaemon": True, "logfile": None, "logger": None}
    with pytest.raises(SystemExit) as e:
        options.parseOptions([])
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        "twistd p2ppeer: error: --transfer-port is required, for example --transfer-port 27101\n"
    )


# -- accepted -----------------------------------------------------------------


def test_good_options(folder, ports):
    base, discovery = ports
    options = parse(*good_args(ports))
    assert options["transfer-port"] == base
    assert options["discovery-port"] == discovery
    assert options["host"] == HOST
    assert options["broadcast"] == "auto"
    assert options["advertise-host"] is None
    assert options["announce-interval"] == 5.0
    assert options["shared"] == str(folder / "shared")
    # Created when missing.
    assert options["downloads"] == str(folder / "downloads")
    assert options["state-dir"] == str(folder / ".p2ppeer")
    assert os.path.isdir(folder / "downloads")
    assert os.path.isdir(folder / ".p2ppeer")


def test_peer_timeout_defaults_to_three_intervals(folder, ports):
    assert parse(*good_args(ports))["peer-timeout"] == 15.0
    assert parse(*good_args(ports, "--announce-interval", "2"))["peer-timeout"] == 6.0
    assert parse(*good_args(ports, "--announce-interval", "0.5"))["peer-timeout"] == 1.5


def test_peer_timeout_given(folder, ports):
    assert parse(*good_args(ports, "--peer-timeout", "7.5"))["peer-timeout"] == 7.5


def test_settings_file(folder, ports):
    base, discovery = ports
    (folder / "conf").mkdir()
    (folder / "files").mkdir()
    (folder / "conf" / "peer.toml").write_text(
        f'transfer-port = {base}\ndiscovery-port = {discovery}\nhost = "{HOST}"\n'
        'shared = "files"\nannounce-interval = 2\n'
    )
    options = parse("--config", "conf/peer.toml", "--announce-interval", "3")
    assert options["transfer-port"] == base
    # Relative to the working directory, not to the file's folder.
    assert options["shared"] == str(folder / "files")
    # The command line wins.
    assert options["announce-interval"] == 3.0
    assert options["peer-timeout"] == 9.0


def test_settings_file_unknown_key(folder):
    (folder / "peer.toml").write_text("transfer_port = 27101\n")
    message = refusal("--config", "peer.toml")
    assert message.startswith("peer.toml: unknown setting 'transfer_port' (known: ")


def test_settings_file_wrong_type(folder):
    (folder / "peer.toml").write_text('transfer-port = "27101"\n')
    assert refusal("--config", "peer.toml") == (
        "peer.toml: setting 'transfer-port' must be an integer, not str '27101'"
    )


def test_settings_file_missing(folder):
    assert refusal("--config", "nowhere.toml") == (
        "cannot read the settings file nowhere.toml: No such file or directory"
    )


# -- makeService ----------------------------------------------------------------


@pytest.fixture
def global_reactor():
    from twisted.internet import reactor

    return reactor


def stdin_is(monkeypatch, kind):
    monkeypatch.setattr(service_module, "stdin_kind", lambda fd=0: kind)


def test_make_service(folder, ports, global_reactor, monkeypatch):
    stdin_is(monkeypatch, "tty")
    base, discovery = ports
    options = parse(*good_args(ports, "--console", "on"))
    peer = tap.makeService(options, global_reactor)
    assert isinstance(peer, PeerService)
    assert isinstance(peer, MultiService)
    assert not peer.running
    children = list(peer)
    assert [type(c) for c in children] == [
        WorkersService,
        TimerService,
        FolderWatcher,
        StreamServerEndpointService,
        StreamServerEndpointService,
        StreamServerEndpointService,
        StreamServerEndpointService,
        DistributionService,
        DiscoveryService,
        ControlService,
        ConsoleService,
    ]
    port_services = children[3:7]
    assert [(s.endpoint._port, s.endpoint._interface) for s in port_services] == [
        (base + offset, HOST) for offset in range(4)
    ]
    assert [type(s.factory) for s in port_services] == [
        transfer.ReceiverFactory,
        transfer.SenderFactory,
        transfer.DistributorFactory,
        transfer.DistributeeFactory,
    ]
    assert port_services[0].factory.inbox is peer.inbox
    assert port_services[1].factory.uploads is peer.uploads
    # No parent: logs stay where twistd puts them.
    assert options["log-target"] is None
    # The peer id follows from the key pair kept in the state dir.
    assert Identity.load_or_create(str(folder / ".p2ppeer")).peer_id == peer.peer_id
    # Without a group key the group is open: no TLS, no seal.
    assert peer.security is None and peer.discovery._seal is None


def test_make_service_in_a_private_group(folder, ports, global_reactor, monkeypatch):
    stdin_is(monkeypatch, "tty")
    key = write_new_key(str(folder / "group.key"))
    options = parse(*good_args(ports, "--group-key-file", "group.key"))
    assert options["group-key"].group_id == key.group_id
    peer = tap.makeService(options, global_reactor)
    port_services = [c for c in peer if isinstance(c, StreamServerEndpointService)]
    assert len(port_services) == 4
    # The receiver port (T) is plain TCP: its streams are sealed with keys
    # from the request connections' TLS.  The other three are the group's
    # TLS, over the endpoint an open peer has.
    receiver, *others = port_services
    assert isinstance(receiver.endpoint, transfer.ReceiverEndpoint)
    assert receiver.endpoint._port == ports[0]
    assert all(isinstance(s.endpoint, tls.GroupServerEndpoint) for s in others)
    assert [s.endpoint.wrapped._port for s in others] == [ports[0] + n for n in range(1, 4)]
    assert peer.discovery._seal.group_id == key.group_id
    assert peer.security.credentials.identity.peer_id == peer.peer_id


def test_group_key_file_in_a_settings_file(folder, ports):
    write_new_key(str(folder / "team.key"))
    (folder / "peer.toml").write_text('group-key-file = "team.key"\n')
    options = parse("--config", "peer.toml", *good_args(ports))
    assert options["group-key"] is not None


def test_group_key_file_refusals(folder, ports):
    assert refusal(*good_args(ports, "--group-key-file", "missing.key")) == (
        "cannot read the group key file missing.key: No such file or directory"
    )
    (folder / "open.key").write_text("00" * 32 + "\n")
    (folder / "open.key").chmod(0o644)
    assert "is open to other users (mode 0644); make it private: chmod 600 open.key" in refusal(
        *good_args(ports, "--group-key-file", "open.key")
    )


def test_make_service_without_a_console(folder, ports, global_reactor, monkeypatch):
    stdin_is(monkeypatch, "tty")
    options = parse(*good_args(ports, "--console", "off"))
    peer = tap.makeService(options, global_reactor)
    assert not any(isinstance(c, ConsoleService) for c in peer)
    assert len(list(peer)) == 10


@pytest.mark.parametrize(
    "stdin, console", [("tty", True), ("pipe", True), ("file", True), ("null", False), ("closed", False)]
)
def test_make_service_console_auto(folder, ports, global_reactor, monkeypatch, stdin, console):
    stdin_is(monkeypatch, stdin)
    peer = tap.makeService(parse(*good_args(ports)), global_reactor)
    assert any(isinstance(c, ConsoleService) for c in peer) == console


@pytest.mark.parametrize(
    "mode, stdin, enabled",
    [
        ("off", "tty", False),
        ("on", "null", True),
        ("on", "closed", False),
        ("auto", "tty", True),
        ("auto", "pipe", True),
        ("auto", "file", True),
        ("auto", "null", False),
        ("auto", "closed", False),
    ],
)
def test_console_enabled(mode, stdin, enabled):
    assert tap.console_enabled(mode, stdin) == enabled


def test_console_log_under_twistd_nodaemon(folder, ports, global_reactor, monkeypatch):
    stdin_is(monkeypatch, "tty")
    options = parse(*good_args(ports, "--console", "on"))
    options.parent = {"nodaemon": True, "logfile": None, "logger": None}
    tap.makeService(options, global_reactor)
    assert options["log-target"] == (str(folder / ".p2ppeer" / "p2ppeer.log"), "text")


@pytest.mark.parametrize(
    "parent",
    [
        {"nodaemon": False, "logfile": None, "logger": None},
        {"nodaemon": True, "logfile": "peer.log", "logger": None},
        {"nodaemon": True, "logfile": None, "logger": "some.observer"},
    ],
)
def test_no_console_log_otherwise(folder, ports, global_reactor, monkeypatch, parent):
    stdin_is(monkeypatch, "tty")
    options = parse(*good_args(ports, "--console", "on"))
    options.parent = parent
    tap.makeService(options, global_reactor)
    assert options["log-target"] is None


@pytest.mark.parametrize(
    "extra, parent, target",
    [
        (["--log-file", "peer.log"], {"nodaemon": True}, ("peer.log", "text")),
        (["--log-format", "json"], {"nodaemon": True}, ("-", "json")),
        (["--log-format", "json"], {"nodaemon": False}, ("twistd.log", "json")),
        (["--log-file", "-", "--log-format", "json"], {"nodaemon": True}, ("-", "json")),
    ],
)
def test_log_options(folder, ports, global_reactor, monkeypatch, extra, parent, target):
    stdin_is(monkeypatch, "null")
    options = parse(*good_args(ports, *extra))
    options.parent = dict({"logfile": None, "logger": None}, **parent)
    tap.makeService(options, global_reactor)
    assert options["log-target"] == target


def test_log_options_clash_with_twistd_logfile(folder, ports):
    options = tap.Options()
    options.parent = {"nodaemon": True, "logfile": "twistd.log", "logger": None}
    with pytest.raises(SystemExit):
        options.parseOptions(list(good_args(ports, "--log-format", "json")))


# -- catalog fetches ------------------------------------------------------------


class ClockReactor(task.Clock):
    """
    Enough of a reactor to build a PeerService and run its timers.
    """

    def getThreadPool(self):
        return None


def test_catalog_fetches_are_limited_and_timed_out(folder, ports, monkeypatch):
    clock = ClockReactor()
    peer = PeerService(parse(*good_args(ports)), clock, console_enabled=False)
    opened = []

    def never_answers(p):
        d = defer.Deferred()
        opened.append(d)
        return d

    monkeypatch.setattr(peer, "_open_client", never_answers)
    results = [
        peer._fetch_catalog(SimpleNamespace(host=f"192.0.2.{n}"))
        for n in range(service_module.CATALOG_FETCHES + 3)
    ]
    # Only so many at once; the rest wait for a place.
    assert len(opened) == service_module.CATALOG_FETCHES
    clock.advance(service_module.CATALOG_FETCH_TIMEOUT)
    # The silent ones time out and give their places to the others.
    failed = []
    for d in results[: service_module.CATALOG_FETCHES]:
        d.addErrback(lambda f: failed.append(f.type))
    assert failed == [defer.TimeoutError] * service_module.CATALOG_FETCHES
    assert len(opened) == service_module.CATALOG_FETCHES + 3
    for d in results[service_module.CATALOG_FETCHES :]:
        d.addErrback(lambda f: None)
    clock.advance(service_module.CATALOG_FETCH_TIMEOUT)


def test_every_address_listens_on_ipv4_and_ipv6(folder, ports, global_reactor, monkeypatch):
    stdin_is(monkeypatch, "null")
    monkeypatch.setattr(service_module, "ipv6_available", lambda: True)
    base, discovery = ports
    options = parse("--transfer-port", str(base), "--discovery-port", str(discovery),
                    "--host", "any", "--console", "off")
    peer = tap.makeService(options, global_reactor)
    endpoints = [c.endpoint for c in peer if isinstance(c, StreamServerEndpointService)]
    # The receiver port's endpoints read chunks straight into their buffers.
    assert [type(e).__name__ for e in endpoints] == ["ReceiverEndpoint"] * 2 + [
        "TCP4ServerEndpoint", "TCP6OnlyServerEndpoint"] * 3
    assert [e._port for e in endpoints] == [p for p in range(base, base + 4) for _ in (4, 6)]


def test_connect_picks_the_family(folder, ports, monkeypatch):
    clock = ClockReactor()
    peer = PeerService(parse(*good_args(ports)), clock, console_enabled=False)
    made = []
    for name, family in (("TCP4ClientEndpoint", "4"), ("TCP6ClientEndpoint", "6")):
        monkeypatch.setattr(
            service_module, name,
            lambda reactor, host, port, family=family, **kw: made.append((family, host)) or FakeEndpoint(),
        )
    peer._connect("198.18.0.2", 27102, object())
    peer._connect("fd00::2", 27102, object())
    peer._connect("fe80::2%eth0", 27102, object())
    assert made == [("4", "198.18.0.2"), ("6", "fd00::2"), ("6", "fe80::2%eth0")]


class FakeEndpoint:
    def connect(self, factory):
        return defer.Deferred()


def test_a_second_peer_in_the_same_state_dir_binds_nothing(folder, ports, global_reactor,
                                                           monkeypatch, capfd):
    stdin_is(monkeypatch, "null")
    options = parse(*good_args(ports))
    first = service_module.lock_state_dir(options["state-dir"])
    try:
        peer = tap.makeService(options, global_reactor)
        with pytest.raises(SystemExit) as e:
            peer.privilegedStartService()
        assert e.value.code == 1
        # Nothing was bound or started: no port, no announce with our id.
        assert not any(child.running for child in peer)
        base, _ = ports
        assert all(can_bind(socket.SOCK_STREAM, base + offset) for offset in range(4))
        # One sentence on the terminal (twistd sends sys.stderr to the log).
        err = capfd.readouterr().err
        assert err == (
            f"twistd p2ppeer: error: another peer (pid {os.getpid()}) is running with the "
            f"state dir {options['state-dir']}; stop it, or start this one in its own "
            "folder or with its own --state-dir\n"
        )
    finally:
        first.unlock()


def test_a_lock_left_by_a_dead_peer_is_taken_over(folder, ports):
    options = parse(*good_args(ports))
    # A pid that is not running: the lock of a peer killed with SIGKILL.
    os.symlink("999999999", os.path.join(options["state-dir"], service_module.LOCK_NAME))
    lock = service_module.lock_state_dir(options["state-dir"])
    assert lock.locked
    lock.unlock()


def test_help_says_how_to_run_in_the_foreground():
    text = str(tap.Options())
    # Without -n twistd runs the peer in the background, silently.
    assert "twistd -n --pidfile peer.pid p2ppeer" in " ".join(text.split())
    assert "without -n the peer starts in the background" in " ".join(text.split())
    assert "--pidfile gives each peer its own pid file" in " ".join(text.split())


def test_version(capsys):
    from twisted_p2p.version import version

    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"twisted-p2p {version()}\n"
    assert version() == "0.1.0"


def test_quiet(folder, ports):
    assert parse(*good_args(ports))["quiet"] == 0
    assert parse(*good_args(ports, "--quiet"))["quiet"] == 1
    assert parse(*good_args(ports, "-q"))["quiet"] == 1


@pytest.mark.parametrize("text, rate", [("0", None), ("25M", 25 << 20), ("800K", 800 << 10), ("500000", 500000)])
def test_upload_rate_suffixes_are_binary_like_the_console(text, rate):
    assert tap.parse_rate(text) == rate


@pytest.mark.parametrize("text, message", [
    ("fast", "--max-upload-rate must be bytes per second such as 500000, 800K or 25M "
             "(K, M, G: KiB, MiB, GiB), not 'fast'"),
    ("100", "--max-upload-rate below 1K would stall transfers; use at least 1K"),
])
def test_upload_rate_refusals(text, message):
    with pytest.raises(usage.UsageError) as e:
        tap.parse_rate(text)
    assert str(e.value) == message


def test_distribution_defaults(folder, ports):
    options = parse(*good_args(ports))
    assert options["replicas"] == tap.DEFAULT_REPLICAS == 2
    assert options["cache-size"] == 1 << 30
    assert options["distribute-interval"] == 10.0


def test_distribution_options(folder, ports):
    options = parse(*good_args(
        ports, "--replicas", "3", "--cache-size", "1.5G", "--distribute-interval", "0.5"
    ))
    assert options["replicas"] == 3
    assert options["cache-size"] == 3 << 29
    assert options["distribute-interval"] == 0.5
    assert parse(*good_args(ports, "--cache-size", "0"))["cache-size"] == 0


def test_distribution_settings_from_a_file(folder, ports):
    (folder / "peer.toml").write_text(
        'replicas = 0\ncache-size = "64M"\ndistribute-interval = 2\n'
    )
    options = parse(*good_args(ports, "--config", "peer.toml"))
    assert (options["replicas"], options["cache-size"], options["distribute-interval"]) == (
        0, 64 << 20, 2.0)
    (folder / "peer.toml").write_text("cache-size = 1000\n")
    assert parse(*good_args(ports, "--config", "peer.toml"))["cache-size"] == 1000


@pytest.mark.parametrize("args, message", [
    (("--replicas", "17"), "--replicas must be from 0 to 16"),
    (("--replicas", "-1"), "--replicas must be from 0 to 16"),
    (("--replicas", "two"), "--replicas must be a whole number, not 'two'"),
    (("--cache-size", "lots"), "--cache-size must be bytes such as 500000000, 800M or 2G "
                              "(K, M, G: KiB, MiB, GiB), or 0 to host nothing; not 'lots'"),
    (("--cache-size", "-1G"), "--cache-size must be bytes such as 500000000, 800M or 2G "
                              "(K, M, G: KiB, MiB, GiB), or 0 to host nothing; not '-1G'"),
    (("--distribute-interval", "0"),
     "--distribute-interval must be more than 0 and at most 86400 seconds"),
    (("--distribute-interval", "soon"),
     "--distribute-interval must be a number of seconds, not 'soon'"),
])
def test_distribution_refusals(folder, ports, args, message):
    assert refusal(*good_args(ports, *args)) == message
