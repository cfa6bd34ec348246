"""Per-flow policy: what a policy may answer, the rules table, and who sent a flow."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import pytest

from tunio import configfile
from tunio.dialers import Address, DirectDialer
from tunio.errors import ConfigError
from tunio.owner import OwnerLookup
from tunio.policy import Flow, Owner, Reject, as_policy, decide, load_policy
from tunio.rules import Rule, RuleTable

A, B, DEFAULT = DirectDialer(mark=1), DirectDialer(mark=2), DirectDialer(mark=3)
APP = Address("198.18.255.9", 40000)


def flow(host: str = "192.0.2.7", port: int = 443, protocol: str = "tcp", *,
         name: str | None = None, owner: Owner | None = None) -> Flow:  # fmt: skip
    address = Address(host, port)
    dst = Address(name, port) if name else address
    return Flow(APP, dst, protocol, worker="worker-0", address=address,
                lookup=(lambda _flow: owner))  # fmt: skip


def test_what_a_policy_may_answer() -> None:
    assert decide(None, flow(), DEFAULT) == [DEFAULT]
    assert decide(lambda f: None, flow(), DEFAULT) == [DEFAULT]
    assert decide(lambda f: A, flow(), DEFAULT) == [A]
    assert decide(lambda f: [A, B], flow(), DEFAULT) == [A, B]
    assert decide(lambda f: Reject(errno.EHOSTUNREACH), flow(), DEFAULT) == Reject(
        errno.EHOSTUNREACH
    )
    assert decide(lambda f: [], flow(), DEFAULT) == Reject(
        errno.ECONNREFUSED, "the policy gave an empty list of dialers"
    )


def test_a_policy_that_fails_refuses_the_flow(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_flow: Flow) -> None:
        raise KeyError("oops")

    with caplog.at_level(logging.DEBUG, "tunio.policy"):  # (at debug if one came this second)
        assert decide(broken, flow(), DEFAULT) == Reject(errno.ECONNREFUSED, "the policy failed")
    assert "the policy failed on Flow(tcp" in caplog.text


def test_policies_come_as_functions_objects_and_factories() -> None:
    class Chooser:
        def choose(self, f: Flow) -> object:
            return B

    def factory() -> object:
        return Chooser()

    assert decide(as_policy(lambda f: A), flow(), DEFAULT) == [A]
    assert decide(as_policy(Chooser()), flow(), DEFAULT) == [B]
    assert decide(as_policy(factory), flow(), DEFAULT) == [B]
    assert decide(as_policy(Chooser), flow(), DEFAULT) == [B]
    with pytest.raises(ConfigError, match="give a function of a Flow"):
        as_policy(42)
    assert load_policy("os.path:basename") is __import__("os").path.basename  # a function
    with pytest.raises(ConfigError, match="cannot import"):
        load_policy("no_such_module_xyz:policy")
    with pytest.raises(ConfigError, match="give module:attr"):
        load_policy("nonsense")


def test_the_owner_is_looked_up_once_and_only_when_asked() -> None:
    calls: list[Flow] = []
    me = Owner(1000, 42, "curl")

    def lookup(x: Flow) -> Owner:
        calls.append(x)
        return me

    f = Flow(APP, Address("192.0.2.1", 80), "tcp", lookup=lookup)
    assert calls == []
    assert (f.uid, f.pid, f.process) == (1000, 42, "curl")
    assert calls == [f]
    unknown = Flow(APP, Address("192.0.2.1", 80), "tcp", lookup=lambda _f: None)
    assert (unknown.uid, unknown.pid, unknown.process) == (None, None, None)


def _rules(tmp_path: Path, text: str) -> RuleTable:
    path = tmp_path / "tunio.toml"
    path.write_text(text)
    read = configfile.read(path)
    return RuleTable(read.values["rules"], {"default": DEFAULT, "direct": A,  # type: ignore[arg-type]
                                             "proxy": B})  # fmt: skip


RULES = """
[[rule]]
domain = ["example.com"]
action = "proxy"

[[rule]]
cidr = ["10.0.0.0/8"]
port = [22, "8000-8999"]
action = ["proxy", "direct"]

[[rule]]
uid = [1000]
process = ["curl"]
action = "direct"

[[rule]]
cidr = ["192.0.2.0/24"]
protocol = "udp"
action = "reject"
errno = "EHOSTUNREACH"
"""


def test_rules_decide_by_domain_cidr_port_uid_and_process(tmp_path: Path) -> None:
    table = _rules(tmp_path, RULES)
    assert table(flow(name="example.com")) == [B]
    assert table(flow(name="www.Example.COM.")) == [B]  # under it, any case, a final dot
    assert table(flow(name="notexample.com")) is None  # a suffix of labels, not of letters
    assert table(flow("10.1.2.3", 22)) == [B, A]
    assert table(flow("10.1.2.3", 8500)) == [B, A]
    assert table(flow("10.1.2.3", 9000)) is None  # no rule: the run's own dialer
    assert table(flow(owner=Owner(1000, 7, "curl"))) == [A]
    assert table(flow(owner=Owner(1000, 7, "wget"))) is None  # every condition must hold
    assert table(flow(owner=None)) is None  # unknown owner: a uid rule does not match
    assert table(flow("192.0.2.9", 53, "udp")) == Reject(
        errno.EHOSTUNREACH, f"rule at {tmp_path / 'tunio.toml'}:16"  # the rule's own line
    )
    assert table(flow("192.0.2.9", 53, "tcp")) is None


def test_the_first_rule_that_matches_decides(tmp_path: Path) -> None:
    table = _rules(tmp_path, '[[rule]]\nport = [443]\naction = "direct"\n\n'
                   '[[rule]]\nport = [443]\naction = "proxy"\n')  # fmt: skip
    assert table(flow()) == [A]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[rule]]\nport = [443]\naction = "nope"\n', ":1: action 'nope' is no dialer"),
        ('[[rule]]\naction = "proxy"\n', ":1: a rule needs a condition"),
        ('[[rule]]\nport = [443]\nhost = "x"\n', ":3: rule: unknown key 'host'"),
        ('[[rule]]\nport = [70000]\n', ":2: rule port 70000"),
        ('[[rule]]\ncidr = ["10.0.0.0/33"]\n', ":2: rule cidr"),
        ('[[rule]]\nuid = ["root"]\n', ":2: rule uid"),
        ('[[rule]]\nport = [1]\naction = ["reject", "proxy"]\n', ":3: rule action: reject"),
        ('[[rule]]\nport = [1]\nerrno = "EBOGUS"\n', ":3: rule errno"),
        ('[dialers]\nproxy = 3\n', ":2: dialers.proxy = 3"),
        ('[dialers]\ndirect = "socks5://a:1"\n', ":2: dialers.direct: 'direct' is built in"),
    ],
)
def test_a_bad_rule_names_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _rules(tmp_path, text)
    assert str(tmp_path / "tunio.toml") in str(caught.value)
    assert words in str(caught.value)


@pytest.mark.parametrize("code", ["EHOSTUNREACH", None, 0, -1, True, 2**40])
def test_a_reject_takes_an_errno_number_only(code: object) -> None:
    """Reject("EHOSTUNREACH") (the rules' spelling), None or 0 is refused where it is made, in
    the policy's own line, not by a struct.error inside the worker (which left a UDP app with
    silence) or a refusal with errno 0."""
    with pytest.raises(ConfigError, match=r"^Reject\(.*\): give an errno number \(1\.\.4095\)"):
        Reject(code)  # type: ignore[arg-type]
    # in a policy, it is the policy failing: the flow is refused, and the policy logged
    assert decide(lambda f: Reject(code), flow(), DEFAULT) == Reject(  # type: ignore[arg-type]
        errno.ECONNREFUSED, "the policy failed"
    )


def test_a_reject_named_by_its_errno_name_says_how_to_write_it() -> None:
    with pytest.raises(ConfigError) as caught:
        Reject("EHOSTUNREACH")  # type: ignore[arg-type]
    assert str(caught.value) == ("Reject('EHOSTUNREACH'): give an errno number (1..4095), "
                                 "e.g. Reject(errno.EHOSTUNREACH)")  # fmt: skip


class FailsToMake:
    def __init__(self) -> None:
        raise RuntimeError("cannot make it")

    def choose(self, flow: Flow) -> None: ...


def test_a_policy_object_is_named_after_itself_in_errors() -> None:
    """Options(policy=...) given an object: its error names it as --policy would, module:attr,
    not as the word 'policy'."""
    with pytest.raises(ConfigError) as caught:
        as_policy(FailsToMake)
    assert str(caught.value) == (f"--policy '{__name__}:FailsToMake': making the policy failed: "
                                 "RuntimeError('cannot make it')")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^policy '5' is a int: give a function of a Flow"):
        as_policy(5)


def test_rules_a_library_made_are_named_by_their_index() -> None:
    """A Rule made in code has no FILE:LINE: errors and refusals name it rules[i], not ''."""
    with pytest.raises(ConfigError, match=r"^rules\[1\]: action 'nowhere' is no dialer"):
        RuleTable([Rule(action=("direct",)), Rule(action=("nowhere",))], {"direct": A})
    table = RuleTable([Rule(ports=((25, 25),), action=("reject",)),
                       Rule(ports=((26, 26),), action=("reject",), where="mine.toml:3")],
                      {"direct": A})  # fmt: skip
    assert table(flow(port=25)) == Reject(errno.ECONNREFUSED, "rule at rules[0]")
    assert table(flow(port=26)) == Reject(errno.ECONNREFUSED, "rule at mine.toml:3")
    with pytest.raises(ConfigError, match=r"^rules\[0\]: refusal: Reject\('EHOSTUNREACH'\): "):
        RuleTable([Rule(action=("reject",), refusal="EHOSTUNREACH")], {})  # type: ignore[arg-type]


def test_the_owner_of_a_local_socket_is_found() -> None:
    lookup = OwnerLookup()
    try:
        with socket.create_server(("127.0.0.1", 0)) as server, \
                socket.create_connection(server.getsockname()) as client:  # fmt: skip
            src, dst = Address(*client.getsockname()), Address(*client.getpeername())
            found = lookup.owner("tcp", src, dst)
            assert found == Owner(os.geteuid(), os.getpid(), Path("/proc/self/comm").read_text()
                                  .strip())  # fmt: skip
            # a tuple no socket has: absent, not a guess
            assert lookup.owner("tcp", Address("127.0.0.1", 1), dst) is None
            assert lookup.owner("tcp", Address("no.such.name", 1), dst) is None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            found = lookup.owner("udp", Address(*udp.getsockname()), Address("127.0.0.9", 53))
            assert found is not None
            assert found.pid == os.getpid()
    finally:
        lookup.close()


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_rules_example_is_valid_and_decides_as_it_says() -> None:
    from tunio.dialers import load_dialer  # noqa: PLC0415

    read = configfile.read(EXAMPLES / "rules.toml")
    dialers = {name: load_dialer(spec) for name, spec in read.values["dialers"].items()}  # type: ignore[attr-defined]
    table = RuleTable(read.values["rules"], {**dialers, "default": DEFAULT,  # type: ignore[arg-type]
                                              "direct": A})  # fmt: skip
    assert table(flow(name="www.example.com")) == [dialers["office"], A]
    assert table(flow(owner=Owner(1001))) == [dialers["abroad"]]
    assert table(flow("10.20.1.1", 22)) == [dialers["office"]]
    assert table(flow("10.20.1.1", 22, "udp")) is None
    refused = table(flow("192.0.2.1", 80))
    assert isinstance(refused, Reject)
    assert refused.errno == errno.EHOSTUNREACH


def test_the_split_by_user_example_policy() -> None:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("split_by_user", EXAMPLES / "split_by_user.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    policy = module.split_by_user(1000, B, A)
    outside = "203.0.113.7"
    assert policy(flow(outside, owner=Owner(1000))) == [B, A]  # the proxy, then direct
    assert policy(flow(outside, owner=Owner(1001))) is A
    assert policy(flow(outside, owner=None)) is A  # from a container: not the user's
    assert policy(flow("192.0.2.5", owner=Owner(1000))) == Reject(errno.ENETUNREACH)
