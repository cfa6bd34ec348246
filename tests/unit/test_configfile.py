"""tunio-run --config FILE: every flag has a key, flags override the file, and a bad key or
value is one error naming the file, the line and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tunio import cli, config, configfile, defaults
from tunio.errors import ConfigError
from tunio.settings import SETTINGS

REPO = Path(__file__).resolve().parents[2]


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunio.toml"
    path.write_text(text)
    return path


def _options(argv: list[str]) -> config.Options:
    return cli.options_from(cli.build_parser().parse_args(argv))


def test_every_setting_has_a_flag_and_a_key_of_the_same_name() -> None:
    parser = cli.build_parser()
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    fields = {f.name for f in dataclasses.fields(config.Options)} - {"origins"}
    tables = set(configfile.TABLES.values())  # [dialers] and [[rule]]: a file's only
    for setting in SETTINGS:
        assert f"--{setting.flag}" in flags
        assert setting.key == setting.flag.replace("-", "_")
        assert setting.field in fields
    # no option without a flag and a key, but for the tables a file alone can hold
    assert {s.field for s in SETTINGS} | tables == fields
    assert not {s.field for s in SETTINGS} & tables


def test_a_file_sets_options_and_flags_override_it(tmp_path: Path) -> None:
    path = _file(tmp_path, """
tun = "tun7"
address = ["198.18.255.1/24", "fd00:18::1/64"]
mtu = 9000
route = ["default"]
egress_mark = "0x10"
dialer = ["socks5://10.0.0.1:1080", "http://10.0.0.2:3128"]
connect_timeout = 3
no_offload = true
workers = 3
""")
    options = _options(["--config", str(path), "--mtu", "1400", "--workers", "1"])
    assert options.tun == "tun7"
    assert options.address == ("198.18.255.1/24", "fd00:18::1/64")
    assert options.routes == ("default",)
    assert options.egress_mark == 16
    assert options.dialer == ("socks5://10.0.0.1:1080", "http://10.0.0.2:3128")
    assert options.connect_timeout == 3.0
    assert options.offload is False
    assert (options.mtu, options.workers) == (1400, 1)  # the flags win
    assert options.origins["tun"] == f"{path}:2"
    assert "mtu" not in options.origins  # in force from the command line


def test_an_empty_array_is_none(tmp_path: Path) -> None:
    assert _options(["--config", str(_file(tmp_path, "route = []\n"))]).routes == ()
    with pytest.raises(ConfigError, match="--address is required"):
        config.validate(_options(["--config", str(_file(tmp_path, "address = []\n"))]))


def test_a_repeated_flag_replaces_the_files_array(tmp_path: Path) -> None:
    path = _file(tmp_path, 'route = ["10.0.0.0/8", "default"]\n')
    assert _options(["--config", str(path)]).routes == ("10.0.0.0/8", "default")
    assert _options(["--config", str(path), "--route", "192.0.2.0/24"]).routes == (
        "192.0.2.0/24",
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('tun = "a"\nmtux = 9000\n', ":2: unknown key 'mtux'"),
        ('mtu = "big"\n', ':1: mtu = "big": expected an integer'),
        ("mtu = true\n", ":1: mtu = true: expected an integer"),
        ("auto_bypass = 1\n", ":1: auto_bypass = 1: expected true or false"),
        ("connect_timeout = nan\n", ":1: connect_timeout = nan: expected a number"),
        ('log_level = "loud"\n', ':1: log_level = "loud": use one of debug, info, warning'),
        ('egress_mark = "mark"\n', ':1: egress_mark = "mark": expected a number (or 0x hex)'),
        ('route = ["default", 3]\n', ":1: route = 3: expected a string"),
        ("mtu = \n", ":1: not valid TOML"),
        ("mtu = 9000\nmtu = 1500\n", ":2: not valid TOML: a key given twice (or a value set "
                                      "again): mtu = 1500"),
        ('[dialers]\na = "direct"\n[dialers]\n', ":3: not valid TOML: Cannot declare "
                                                 "('dialers',) twice: [dialers]"),
        ('tun = "a"\n\n[workers]\nx = 1\n', ":3: workers = {'x': 1}: expected an integer"),
        ('tun = "a"\nworkers.x = 1\n', ":2: workers = {'x': 1}: expected an integer"),
    ],
)
def test_a_bad_key_or_value_names_file_line_and_key(
    tmp_path: Path, text: str, words: str
) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        configfile.read(path)
    assert str(path) in str(caught.value)
    assert words in str(caught.value)


def test_a_value_the_checks_refuse_is_reported_at_its_line(tmp_path: Path) -> None:
    path = _file(tmp_path, '# a comment\ntun = "tun7"\nmtu = 10\n')
    options = _options(["--config", str(path)])
    with pytest.raises(ConfigError) as caught:
        config.validate(options)
    assert config.explain(caught.value, options) == (
        f"{path}:3: mtu = 10 is out of range: use 68..65535"
    )
    # the same value from the command line is reported by its flag
    flagged = _options(["--config", str(path), "--mtu", "10"])
    with pytest.raises(ConfigError) as caught:
        config.validate(flagged)
    assert config.explain(caught.value, flagged) == "--mtu 10 is out of range: use 68..65535"


def test_an_address_error_from_a_file_names_its_line(tmp_path: Path) -> None:
    path = _file(tmp_path, 'address = "fd00::1/127"\n')
    options = _options(["--config", str(path)])
    with pytest.raises(ConfigError) as caught:
        config.validate(options)
    assert config.explain(caught.value, options).startswith(
        f"{path}:1: address = fd00::1/127: give a prefix of /126 or wider"
    )


def test_print_config_shows_the_effective_settings_and_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, 'mtu = 9000\nroute = ["default"]\ndialer = "socks5://10.0.0.1:1080"\n')
    argv = ["--config", str(path), "--runtime-dir", str(tmp_path / "rt"), "--workers", "3"]
    assert cli.main([*argv, "--print-config"]) == 0
    shown = capsys.readouterr().out
    assert "mtu = 9000\n" in shown
    assert 'route = ["default"]\n' in shown
    assert "workers = 3\n" in shown
    assert "# egress_mark is not set\n" in shown
    assert f"# max_pending is not set: {defaults.MAX_PENDING}, or max_flows if lower\n" in shown
    again = _file(tmp_path, shown)
    assert _options(["--config", str(again)]) == _options(argv)


def test_print_config_keeps_the_dialers_and_the_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(REPO / "examples" / "rules.toml"), "--runtime-dir", str(tmp_path)]
    assert cli.main([*argv, "--print-config"]) == 0
    shown = capsys.readouterr().out
    assert "\n[dialers]\noffice = \"socks5://10.0.0.5:1080\"\n" in shown
    assert '\n[[rule]]\ncidr = ["10.20.0.0/16"]\nport = [22, "8000-8999"]\n' in shown
    assert 'errno = "EHOSTUNREACH"' in shown
    first, again = _options(argv), _options(["--config", str(_file(tmp_path, shown))])

    def unplaced(options: config.Options) -> list[object]:
        return [dataclasses.replace(rule, where="") for rule in options.rules]

    assert len(first.rules) == 4
    assert unplaced(again) == unplaced(first)
    assert dict(again.dialers) == {k: v for k, v in first.dialers.items()}


def test_the_example_file_is_valid() -> None:
    read = configfile.read(REPO / "examples" / "tunio.toml")
    options = config.Options(**read.values, origins=read.origins)  # type: ignore[arg-type]
    config.validate(options)
    assert set(read.values) >= {"tun", "address", "routes", "exclude", "dialer", "auto_bypass"}


def test_a_missing_file_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert f"--config {tmp_path / 'nope.toml'}: No such file or directory" in err[0]


def test_tcp_keepalive_is_three_numbers_or_off() -> None:
    assert config.parse_keepalive("120,30,4") == (120, 30, 4)
    assert config.parse_keepalive(" OFF ") is None
    assert config.parse_keepalive(defaults.TCP_KEEPALIVE) == defaults.TCP_KEEPALIVE_PROBES
