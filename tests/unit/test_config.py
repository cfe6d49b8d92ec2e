"""memosd.config: defaults, precedence, and errors that name the key and its source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from memosd.config import (
    ClusterConfig,
    Config,
    ConfigError,
    LimitsConfig,
    ServerConfig,
    build_arg_parser,
    default_data_dir,
    load_config,
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty home, so no real ~/.config/memosd/memosd.toml is picked up."""
    h = tmp_path / "home"
    h.mkdir()
    return h


def env_with(home: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), **extra}


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults(home: Path) -> None:
    cfg = load_config([], env_with(home))
    assert cfg.server == ServerConfig()
    assert cfg.server.listen == "127.0.0.1:50051"
    assert cfg.server.workers == 16
    assert cfg.server.max_message_bytes == 64 * 1024 * 1024
    assert cfg.store.sync_commits is True
    assert cfg.limits == LimitsConfig()
    assert cfg.embedder.model == "all-MiniLM-L6-v2"
    assert cfg.embedder.device == "auto"
    assert cfg.search.fusion == "rrf"
    assert cfg.search.rrf_k == 5
    assert cfg.search.exact_below == 2048
    assert cfg.search.session_match_weight == 0.2  # kernel/session_match.py
    assert cfg.search.period_lift == 0.2  # kernel/search.py PERIOD_LIFT
    assert cfg.index.save_interval_seconds == 30.0
    assert cfg.log.level == "info"
    assert cfg.config_file is None
    assert cfg.data_dir == home / ".local/share/memosd"


def test_per_user_data_dir(home: Path, tmp_path: Path) -> None:
    assert default_data_dir({"HOME": str(home)}) == home / ".local/share/memosd"
    xdg = tmp_path / "xdg-data"
    assert default_data_dir({"HOME": str(home), "XDG_DATA_HOME": str(xdg)}) == xdg / "memosd"
    # The XDG spec says relative values are ignored.
    assert default_data_dir({"HOME": str(home), "XDG_DATA_HOME": "rel"}) == home / ".local/share/memosd"
    # Under systemd with StateDirectory=, the service manager's directory wins.
    env = {"HOME": str(home), "XDG_DATA_HOME": str(xdg), "STATE_DIRECTORY": "/var/lib/memosd:/var/lib/other"}
    assert default_data_dir(env) == Path("/var/lib/memosd")
    assert load_config([], env).data_dir == Path("/var/lib/memosd")


def test_precedence_file_env_flag(home: Path, tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "memosd.toml",
        """
        data_dir = "from-file"
        [server]
        listen = "0.0.0.0:1000"
        workers = 4
        [limits]
        max_item_bytes = 111
        max_k = 5
        [search]
        dense_weight = 2
        """,
    )
    # File only.
    cfg = load_config(["--config", str(path)], env_with(home))
    assert cfg.config_file == path
    assert cfg.server.listen == "0.0.0.0:1000"
    assert cfg.server.workers == 4
    assert cfg.limits.max_item_bytes == 111
    assert cfg.search.dense_weight == 2.0 and isinstance(cfg.search.dense_weight, float)
    assert cfg.data_dir == tmp_path / "from-file"  # relative to the file

    # Env over file.
    env = env_with(
        home,
        MEMOSD_CONFIG=str(path),
        MEMOSD_LISTEN="127.0.0.1:2000",
        MEMOSD_LIMITS__MAX_ITEM_BYTES="222",
        MEMOSD_DATA_DIR=str(tmp_path / "from-env"),
        MEMOSD_STORE__SYNC_COMMITS="false",
    )
    cfg = load_config([], env)
    assert cfg.server.listen == "127.0.0.1:2000"
    assert cfg.limits.max_item_bytes == 222
    assert cfg.limits.max_k == 5  # untouched file value survives
    assert cfg.server.workers == 4
    assert cfg.store.sync_commits is False
    assert cfg.data_dir == tmp_path / "from-env"

    # Flags over env.
    cfg = load_config(
        [
            "--listen",
            "[::1]:3000",
            "--set",
            "limits.max_item_bytes=333",
            "--set",
            "server.workers=8",
            "--data-dir",
            str(tmp_path / "from-flag"),
            "--log-level",
            "DEBUG",
        ],
        env,
    )
    assert cfg.server.listen == "[::1]:3000"
    assert cfg.limits.max_item_bytes == 333
    assert cfg.server.workers == 8
    assert cfg.data_dir == tmp_path / "from-flag"
    assert cfg.log.level == "debug"


def test_flag_config_beats_env_config(home: Path, tmp_path: Path) -> None:
    a = write_toml(tmp_path / "a.toml", "[log]\nlevel = 'error'\n")
    b = write_toml(tmp_path / "b.toml", "[log]\nlevel = 'warning'\n")
    cfg = load_config(["--config", str(b)], env_with(home, MEMOSD_CONFIG=str(a)))
    assert cfg.config_file == b and cfg.log.level == "warning"


def test_default_config_file_is_optional_and_used_when_present(home: Path) -> None:
    assert load_config([], env_with(home)).config_file is None
    path = write_toml(home / ".config/memosd/memosd.toml", "[embedder]\ndevice = 'cpu'\n")
    cfg = load_config([], env_with(home))
    assert cfg.config_file == path
    assert cfg.embedder.device == "cpu"


def test_named_flag_beats_set(home: Path) -> None:
    cfg = load_config(["--listen", "h:1", "--set", "server.listen=h:2"], env_with(home))
    assert cfg.server.listen == "h:1"


def test_file_errors_name_key_and_file(home: Path, tmp_path: Path) -> None:
    cases = {
        "[limits]\nmax_item_bytes = 'big'\n": ("limits.max_item_bytes", "an integer"),
        "[server]\nworkers = true\n": ("server.workers", "an integer"),
        "[store]\nsync_commits = 1\n": ("store.sync_commits", "a boolean"),
        "[limits]\nmax_itme_bytes = 1\n": ("limits.max_itme_bytes", "max_item_bytes"),
        "[nosuch]\nx = 1\n": ("[nosuch]", "sections are: server, store"),
        "bogus = 1\n": ("bogus", "expected data_dir or section.key"),
        "server = 3\n": ("server", "a table"),
        "[embedder]\ndevice = 'tpu'\n": ("embedder.device", "auto, cpu, cuda"),
        "[limits]\nmax_k = 0\n": ("limits.max_k", "> 0"),
        "[server]\nlisten = 'localhost'\n": ("server.listen", "host:port"),
        "[server]\nlisten = 'localhost:70000'\n": ("server.listen", "0-65535"),
        "[log]\nlevel = 'loud'\n": ("log.level", "debug, info"),
    }
    for text, (key, expected) in cases.items():
        path = write_toml(tmp_path / "bad.toml", text)
        with pytest.raises(ConfigError) as err:
            load_config(["--config", str(path)], env_with(home))
        msg = str(err.value)
        assert key in msg and str(path) in msg and expected in msg, (text, msg)


def test_file_missing_or_not_toml(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"flag --config.*does not exist"):
        load_config(["--config", str(tmp_path / "nope.toml")], env_with(home))
    with pytest.raises(ConfigError, match="MEMOSD_CONFIG"):
        load_config([], env_with(home, MEMOSD_CONFIG=str(tmp_path / "nope.toml")))
    path = write_toml(tmp_path / "broken.toml", "[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(path)], env_with(home))


def test_env_errors_name_key_and_variable(home: Path) -> None:
    cases = {
        "MEMOSD_LIMITS__MAX_ITEM_BYTES": ("lots", "limits.max_item_bytes", "an integer"),
        "MEMOSD_LIMITS__MAX_QUERY_BYTES": ("-1", "limits.max_query_bytes", "> 0"),
        "MEMOSD_STORE__SYNC_COMMITS": ("maybe", "store.sync_commits", "a boolean"),
        "MEMOSD_SEARCH__DENSE_WEIGHT": ("nan", "search.dense_weight", "finite"),
        "MEMOSD_SEARCH__NOPE": ("1", "search.nope", "[search] has"),
        "MEMOSD_SEARCH__SESSION_MATCH_WEIGHT": ("-0.1", "search.session_match_weight", ">= 0"),
        "MEMOSD_SEARCH__PERIOD_LIFT": ("-1", "search.period_lift", ">= 0"),
        "MEMOSD_NOPE__X": ("1", "nope.x", "no section 'nope'"),
        "MEMOSD_LOG_LEVEL": ("info", "MEMOSD_LOG_LEVEL", "MEMOSD_LOG__LEVEL"),
        "MEMOSD_QUOTAS__MAX_FOLLOWS_PER_PRINCIPAL": ("0", "quotas.max_follows_per_principal", "> 0"),
        "MEMOSD_SERVER__STREAM_IDLE_SECONDS": ("0", "server.stream_idle_seconds", "> 0"),
        "MEMOSD_LISTEN": ("nowhere", "server.listen", "host:port"),
        "MEMOSD_RUNTIME__COMPOSE": ("blended", "runtime.compose", "exact, composed, auto"),
        "MEMOSD_RUNTIME__COMPOSE_RECOMPUTE": ("1.5", "runtime.compose_recompute", "from 0 to 1"),
        "MEMOSD_RUNTIME__COMPOSE_DEVIATION": ("-0.1", "runtime.compose_deviation", "from 0 to 1"),
        "MEMOSD_RUNTIME__COMPOSE_TEMPERATURE": ("0", "runtime.compose_temperature", "above 0"),
        "MEMOSD_RUNTIME__COMPOSE_SCALE": ("-1", "runtime.compose_scale", "above 0"),
    }
    for var, (value, key, expected) in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config([], env_with(home, **{var: value}))
        msg = str(err.value)
        assert key in msg and var in msg and expected in msg, (var, msg)


def test_flag_errors_name_key_and_flag(home: Path) -> None:
    cases = [
        (["--set", "limits.max_k=ten"], "limits.max_k", "flag --set limits.max_k=ten", "an integer"),
        (["--set", "limits.max_k"], "limits.max_k", "flag --set", "section.key=value"),
        (["--set", "limits.nope=1"], "limits.nope", "flag --set", "[limits] has"),
        (["--listen", "h:-1"], "server.listen", "flag --listen", "host:port"),
        (["--log-level", "shout"], "log.level", "flag --log-level", "one of"),
    ]
    for argv, key, source, expected in cases:
        with pytest.raises(ConfigError) as err:
            load_config(argv, env_with(home))
        msg = str(err.value)
        assert key in msg and source in msg and expected in msg, (argv, msg)


def test_compose_defaults_to_exact_and_takes_a_mode_in_any_case(home: Path) -> None:
    default = load_config([], env_with(home)).runtime
    assert (default.compose, default.compose_recompute) == ("exact", 0.01)
    chosen = load_config(["--set", "runtime.compose=AUTO", "--set", "runtime.compose_recompute=0"],
                         env_with(home)).runtime
    assert (chosen.compose, chosen.compose_recompute) == ("auto", 0.0)
    assert default.compose_deviation == 0.0  # only the first tokens, unless asked
    assert load_config(["--set", "runtime.compose_deviation=0.02"], env_with(home)).runtime.compose_deviation == 0.02
    # APE's adjustment of the placed keys is off unless asked (1 and 1: the plain composition)
    assert (default.compose_temperature, default.compose_scale) == (1.0, 1.0)
    ape = load_config(["--set", "runtime.compose_temperature=0.85", "--set", "runtime.compose_scale=0.9"],
                      env_with(home)).runtime
    assert (ape.compose_temperature, ape.compose_scale) == (0.85, 0.9)


def test_env_values_are_converted(home: Path) -> None:
    env = env_with(
        home,
        MEMOSD_SERVER__GRACE_SECONDS="2.5",
        MEMOSD_SEARCH__FUSION="RRF",
        MEMOSD_EMBEDDER__MODEL="/models/minilm",
        MEMOSD_STORE__SYNC_COMMITS="Yes",
        MEMOSD_LIMITS__MAX_STAGED_CHANGES="1_000",
    )
    cfg = load_config([], env)
    assert cfg.server.grace_seconds == 2.5
    assert cfg.search.fusion == "rrf"
    assert cfg.embedder.model == "/models/minilm"
    assert cfg.store.sync_commits is True
    assert cfg.limits.max_staged_changes == 1000


def test_unrelated_env_is_ignored(home: Path) -> None:
    cfg = load_config([], env_with(home, PATH="/bin", MEMOSDX="1"))
    assert cfg.server.listen == "127.0.0.1:50051"


def test_config_is_frozen_and_serialisable(home: Path) -> None:
    cfg = load_config([], env_with(home))
    with pytest.raises(AttributeError):
        cfg.server.workers = 1  # type: ignore[misc]
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["limits"]["max_item_bytes"] == 32768
    assert d["data_dir"] == str(cfg.data_dir)
    assert set(d) == {
        "data_dir",
        "server",
        "store",
        "limits",
        "quotas",
        "embedder",
        "search",
        "index",
        "runtime",
        "log",
        "security",
        "scheduler",
        "lifecycle",
        "metrics",
        "http",
        "cluster",
        "reader",
        "config_file",
    }
    assert Config(data_dir=Path("/x")).server == ServerConfig()


def test_quotas_come_from_the_environment_and_zero_turns_one_off(home: Path) -> None:
    cfg = load_config([], env_with(home, MEMOSD_QUOTAS__MAX_MOUNTS_PER_PRINCIPAL="0",
                                   MEMOSD_QUOTAS__MAX_STAGED_BYTES_PER_PRINCIPAL="4096"))
    assert (cfg.quotas.max_mounts_per_principal, cfg.quotas.max_staged_bytes_per_principal) == (0, 4096)
    with pytest.raises(ConfigError, match=r"quotas\.max_mounts_per_principal"):
        load_config([], env_with(home, MEMOSD_QUOTAS__MAX_MOUNTS_PER_PRINCIPAL="-1"))


def test_arg_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_arg_parser()
    assert parser.prog == "memosd"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("memosd ")
    help_text = parser.format_help()
    for flag in ("--config", "--data-dir", "--listen", "--log-level", "--set"):
        assert flag in help_text


def test_runtime_section(home: Path) -> None:
    cfg = load_config(["--set", "runtime.device=CUDA:1", "--set", "runtime.pool_bytes=1024"],
                      env_with(home, MEMOSD_RUNTIME__MODEL="none", MEMOSD_RUNTIME__KV_DTYPE="bfloat16"))
    assert cfg.runtime.model == "none" and cfg.runtime.device == "cuda:1"
    assert cfg.runtime.pool_bytes == 1024 and cfg.runtime.kv_dtype == "bfloat16"
    assert cfg.runtime.retrieve_k == 4 and cfg.runtime.dtype == "auto"
    for bad in ("runtime.device=tpu", "runtime.kv_dtype=float32", "runtime.retrieve_k=101", "runtime.model=",
                "runtime.pool_bytes=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(["--set", bad], env_with(home))


def test_default_reply_length_must_be_within_the_limit(home: Path) -> None:
    with pytest.raises(ConfigError, match="max_tokens_limit"):
        load_config(["--set", "runtime.max_tokens_limit=64"], env_with(home))
    assert load_config(["--set", "runtime.max_tokens_limit=64", "--set", "runtime.max_tokens=64"],
                       env_with(home)).runtime.max_tokens == 64


def test_tls_settings_must_be_complete(home: Path) -> None:
    with pytest.raises(ConfigError, match="go together"):
        load_config([], env_with(home, MEMOSD_SECURITY__TLS_CERT_FILE="/x/cert.pem"))
    with pytest.raises(ConfigError, match="needs TLS"):
        load_config([], env_with(home, MEMOSD_SECURITY__TLS_CLIENT_CA_FILE="/x/ca.pem"))
    cfg = load_config([], env_with(home, MEMOSD_SECURITY__AUTH="false"))
    assert cfg.security.auth is False and cfg.security.audit is True


def test_metrics_port_follows_listen_port_zero_unless_set(home: Path) -> None:
    env = env_with(home)
    assert load_config([], env).metrics.listen == "127.0.0.1:9464"
    assert load_config(["--listen", "127.0.0.1:7000"], env).metrics.listen == "127.0.0.1:9464"
    # Port 0 for gRPC: metrics on a free loopback port too (not on the gRPC host: metrics have no auth).
    assert load_config(["--listen", "0.0.0.0:0"], env).metrics.listen == "127.0.0.1:0"
    assert load_config([], {**env, "MEMOSD_LISTEN": "[::1]:0"}).metrics.listen == "127.0.0.1:0"
    # Set by any source, it is kept as set.
    assert load_config(["--listen", "h:0", "--set", "metrics.listen=127.0.0.1:9999"], env).metrics.listen \
        == "127.0.0.1:9999"
    assert load_config(["--listen", "h:0"], {**env, "MEMOSD_METRICS__LISTEN": ""}).metrics.listen == ""


def test_print_config_is_every_key_and_reads_back_the_same(home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from memosd.config import SECTIONS
    from memosd.config_toml import render
    from memosd.daemon import main

    env = env_with(home, MEMOSD_LIMITS__MAX_K="77")
    argv = ["--listen", "127.0.0.1:0", "--set", 'embedder.model=my "quoted" model', "--data-dir", str(tmp_path / "d")]
    cfg = load_config(argv, env)
    text = render(cfg)
    assert 'listen = "127.0.0.1:0"' in text and "max_k = 77" in text and "sync_commits = true" in text
    assert all(f"\n[{section}]\n" in text for section in SECTIONS)
    saved = write_toml(tmp_path / "effective.toml", text)
    again = load_config(["--config", str(saved)], env_with(home))
    assert again.to_dict() | {"config_file": None} == cfg.to_dict()
    # memosd --print-config prints it and exits 0 without starting (no data dir is made).
    for var in [v for v in os.environ if v.startswith("MEMOSD_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("MEMOSD_LIMITS__MAX_K", "77")
    assert main(["--print-config", *argv]) == 0
    assert capsys.readouterr().out == text
    assert not (tmp_path / "d").exists()


def test_http_listen_is_off_by_default_and_set_from_the_environment(home: Path) -> None:
    assert load_config([], env_with(home)).http.listen == ""
    assert load_config([], env_with(home, MEMOSD_HTTP__LISTEN="127.0.0.1:0")).http.listen == "127.0.0.1:0"
    with pytest.raises(ConfigError, match=r"http\.listen"):
        load_config([], env_with(home, MEMOSD_HTTP__LISTEN="nowhere"))


def test_cluster_is_off_by_default(home: Path) -> None:
    cfg = load_config([], env_with(home))
    assert cfg.cluster == ClusterConfig() and cfg.cluster.etcd == () and cfg.cluster.lease_seconds == 5
    assert cfg.to_dict()["cluster"] == {"etcd": [], "node_name": "", "advertise": "", "lease_seconds": 5,
                                        "tls_ca_file": ""}


def test_cluster_from_file_env_and_flags(home: Path, tmp_path: Path) -> None:
    path = write_toml(tmp_path / "memosd.toml", """
[cluster]
etcd = ["127.0.0.1:2379", "http://10.0.0.2:2379", "[::1]:2379"]
node_name = "node-a.1"
advertise = "10.0.0.1:50051"
lease_seconds = 4
""")
    cfg = load_config(["--config", str(path)], env_with(home))
    assert cfg.cluster == ClusterConfig(("127.0.0.1:2379", "http://10.0.0.2:2379", "[::1]:2379"), "node-a.1",
                                        "10.0.0.1:50051", 4)
    # Text (environment, --set) is comma-separated; the flag wins over the environment.
    env = env_with(home, MEMOSD_CLUSTER__ETCD="a:1, b:2,", MEMOSD_CLUSTER__NODE_NAME="n1",
                   MEMOSD_CLUSTER__ADVERTISE="h:5")
    assert load_config([], env).cluster.etcd == ("a:1", "b:2")
    assert load_config(["--set", "cluster.etcd=c:3"], env).cluster.etcd == ("c:3",)
    # An empty list from any source is a single node again, and then needs no name or address.
    assert load_config(["--set", "cluster.etcd="], env_with(home, MEMOSD_CLUSTER__ETCD="a:1")).cluster.etcd == ()


def test_cluster_errors_are_clear(home: Path, tmp_path: Path) -> None:
    named = ["--set", "cluster.node_name=n1", "--set", "cluster.advertise=h:5"]
    for bad, message in (
        ("cluster.etcd=localhost", r"invalid cluster\.etcd = 'localhost' \(from flag --set .*\): expected a list of etcd"),
        ("cluster.etcd=https://h:2379", r"https is not supported yet"),
        ("cluster.etcd=h:0", r"cluster\.etcd"),
        ("cluster.node_name=Node_A", r"invalid cluster\.node_name = 'Node_A'.*a-z 0-9"),
        ("cluster.advertise=0.0.0.0:50051", r"cluster\.advertise.*no wildcard"),
        ("cluster.advertise=h:0", r"cluster\.advertise"),
        ("cluster.lease_seconds=1", r"cluster\.lease_seconds.*from 2 to 3600"),
        ("cluster.lease_seconds=2.5", r"cluster\.lease_seconds.*an integer"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config([*named, "--set", bad], env_with(home))
    with pytest.raises(ConfigError, match=r"cluster\.etcd is set, so cluster\.node_name must be set too"):
        load_config(["--set", "cluster.etcd=h:2379", "--set", "cluster.advertise=h:5"], env_with(home))
    # No advertise: the bound gRPC address, which must then be one others can dial.
    cfg = load_config(["--set", "cluster.etcd=h:2379", "--set", "cluster.node_name=n1"], env_with(home))
    assert cfg.cluster.advertise == "" and cfg.server.listen == "127.0.0.1:50051"
    for wildcard in ("0.0.0.0:50051", "[::]:0"):
        with pytest.raises(ConfigError, match=r"is a wildcard address, so cluster\.advertise must say"):
            load_config(["--set", "cluster.etcd=h:2379", "--set", "cluster.node_name=n1", "--listen", wildcard],
                        env_with(home))
    assert load_config(["--set", "cluster.etcd=h:2379", "--set", "cluster.node_name=n1", "--listen", "0.0.0.0:1",
                        "--set", "cluster.advertise=10.0.0.1:1"], env_with(home)).cluster.advertise == "10.0.0.1:1"
    path = write_toml(tmp_path / "bad.toml", "[cluster]\netcd = \"h:2379\"\n")
    with pytest.raises(ConfigError, match=r"invalid cluster\.etcd = 'h:2379' \(from config file .*\): expected a list"):
        load_config(["--config", str(path)], env_with(home))
    path = write_toml(tmp_path / "bad2.toml", "[cluster]\netcd = [2379]\n")
    with pytest.raises(ConfigError, match=r"expected a list of strings"):
        load_config(["--config", str(path)], env_with(home))


def test_print_config_shows_the_cluster_and_reads_it_back(home: Path, tmp_path: Path) -> None:
    from memosd.config_toml import render

    cfg = load_config(["--set", "cluster.etcd=127.0.0.1:2379,http://h:2380", "--set", "cluster.node_name=n1",
                       "--set", "cluster.advertise=127.0.0.1:50051"], env_with(home))
    text = render(cfg)
    assert '\n[cluster]\netcd = ["127.0.0.1:2379", "http://h:2380"]\nnode_name = "n1"\n' in text
    again = load_config(["--config", str(write_toml(tmp_path / "eff.toml", text))], env_with(home))
    assert again.cluster == cfg.cluster
    assert 'etcd = []' in render(load_config([], env_with(home)))


def test_reader_endpoints_are_none_by_default_and_checked(home: Path) -> None:
    """Extract may call only the endpoints the operator lists: none unless [reader] endpoints says so."""
    assert load_config([], env={"HOME": str(home)}).reader.endpoints == ()
    cfg = load_config([], env={"HOME": str(home), "MEMOSD_READER__ENDPOINTS": "https://api.example.com/v1,http://127.0.0.1:"})
    assert cfg.reader.endpoints == ("https://api.example.com/v1", "http://127.0.0.1:")
    with pytest.raises(ConfigError, match=r"reader\.endpoints"):
        load_config([], env={"HOME": str(home), "MEMOSD_READER__ENDPOINTS": "ftp://files.example.com"})
