"""The scale-out recipe (docs/deploy.md) as shipped in ``configs/deploy/``.

- The relay, for real on loopback: nginx-rtmp running ``configs/deploy/nginx-rtmp.conf``
  (only its listen address changed) relays two published inputs to two ``broadcast-filter
  run`` processes, each started from a shipped instance config (the demo model at 64x64 so
  it is cheap, and free ports), and takes their outputs back; an independent PyAV viewer
  per output decodes them. Killing one daemon (SIGKILL) leaves the other's output running;
  the restarted daemon publishes its stream again. Judged by frame counts, never by rates.
- The files: the Kubernetes manifests parse and agree with the instance configs they carry
  (GPU request, probes on the API's health path and port), the instance configs load with
  the daemon's own loader, the systemd unit has the keys docs/deploy.md describes
  (``systemd-analyze verify`` where present).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import peers
import psutil
import pytest
import yaml
from conftest import require_tool
from daemon_harness import wait_for

from broadcast_filter.control.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "configs" / "deploy"
WATCH = str(Path(__file__).with_name("frame_watch.py"))
PEERS = str(Path(__file__).with_name("peers.py"))
#: the test size and rate: the demo model at 64x64 keeps up with two daemons on 2 cores
SIZE, FPS = (64, 64), 15
#: frames that count as "delivering": about 2 s of output at FPS, whatever the load
ENOUGH = 2 * FPS
#: generous: two daemons import torch and load the model at once on a busy 2-core machine
START_TIMEOUT, DELIVER_TIMEOUT = 240.0, 120.0


@pytest.fixture(autouse=True)
def _stop_peers():
    """Every process a test started is stopped by PID, also when the test failed."""
    yield
    peers.stop_all()


# ------------------------------------------------------------------ the shipped files

CONFIGMAP, SECRET = "broadcast-filter-config", "broadcast-filter-api"
MOUNT = "/etc/broadcast-filter/config"


def k8s_documents() -> list[dict[str, Any]]:
    """Every document of every manifest under configs/deploy/k8s/."""
    docs = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            docs.append(doc)
    return docs


def of_kind(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """The documents of that kind (and name)."""
    docs = [doc for doc in k8s_documents() if doc["kind"] == kind]
    return [doc for doc in docs if name is None or doc["metadata"]["name"] == name]


def daemon_deployments() -> list[dict[str, Any]]:
    """The Deployments that run a daemon (not the media server)."""
    return [d for d in of_kind("Deployment") if d["metadata"]["name"] != "media-server"]


def probe_command(container: dict[str, Any]) -> list[str]:
    """The health probe's command; startup, readiness and liveness all run the same one."""
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    commands = [probe["exec"]["command"] for probe in probes]
    assert commands[0] == commands[1] == commands[2]
    return commands[0]


# ------------------------------------------------------------------ the relay, for real


class Viewer:
    """``tests/frame_watch.py`` on one output URL; the time each decoded frame arrived."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.sizes: set[str] = set()
        self.proc = peers.spawn(
            [sys.executable, WATCH, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.sizes.add(line.strip())
            self.times.append(time.monotonic())

    def since(self, t: float) -> int:
        """Frames decoded at or after ``t``."""
        return sum(a >= t for a in list(self.times))


def nginx_config(folder: Path, port: int) -> Path:
    """A full nginx.conf around the shipped ``rtmp {}`` block, listening on loopback:``port``."""
    block = (DEPLOY / "nginx-rtmp.conf").read_text()
    block, changed = re.subn(r"listen 1935;", f"listen 127.0.0.1:{port};", block)
    assert changed == 1, "configs/deploy/nginx-rtmp.conf no longer says 'listen 1935;'"
    (folder / "logs").mkdir(parents=True)
    path = folder / "nginx.conf"
    path.write_text(
        f"load_module {peers.NGINX_MODULE};\n"
        "daemon off;\nmaster_process off;\nworker_processes 1;\n"
        f"pid {folder}/nginx.pid;\nerror_log {folder}/logs/error.log warn;\n"
        "events { worker_connections 64; }\n" + block
    )
    return path


def cheap(data: dict[str, Any], api_port: int) -> dict[str, Any]:
    """A shipped daemon config with what a CPU test must change: the demo model at 64x64, the
    demo presets and a free API port. Everything else stays as shipped."""
    data["model"] = {"id": "demo", "taesd": "demo", "device": "cpu"}
    data["resolution"], data["fps"] = list(SIZE), FPS
    data["presets"] = {"folder": str(ROOT / "configs" / "demo_presets"), "start": "sepia"}
    data["api"]["port"] = api_port
    return data


def site_instance(name: str, folder: Path, rtmp_port: int) -> Instance:
    """The shipped instance config ``name`` (:func:`cheap`), on the test's nginx port."""
    data = yaml.safe_load((DEPLOY / "instances" / f"{name}.yaml").read_text())

    def local(url: str) -> str:
        assert url.startswith("rtmp://127.0.0.1:1935/"), url
        return url.replace(":1935/", f":{rtmp_port}/")

    data["source"]["url"] = local(data["source"]["url"])
    data["sinks"] = [local(url) for url in data["sinks"]]
    api_port = peers.free_port()
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cheap(data, api_port)))
    return Instance(name, path, api_port)


class Instance:
    """One ``broadcast-filter run`` process; its log is beside its config."""

    def __init__(
        self, name: str, config: Path, api_port: int, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.config, self.api_port = name, config, api_port
        self.env = env or {}
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Instance:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "broadcast_filter.cli", "run", "--config", str(self.config)]
        with self.log.open("a") as log:
            self.proc = peers.spawn(argv, stdout=log, stderr=subprocess.STDOUT, env=env | self.env)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would; wait until its I/O children (RTMP
        source and sink processes) are gone too, as they must for a restart to take the same
        output key."""
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        assert children, "the daemon has no I/O child processes"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_for("the killed daemon's I/O children to exit",
                 lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                 for c in children), 30)  # fmt: skip

    def health(self) -> int | None:
        """The HTTP status of ``GET /api/health`` (what the probes ask), ``None`` if no answer."""
        url = f"http://127.0.0.1:{self.api_port}/api/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def status(self) -> dict[str, Any]:
        """``GET /api/status``."""
        url = f"http://127.0.0.1:{self.api_port}/api/status"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.load(answer)

    def probe(self, token: str = "unused") -> int:
        """The exit status of the Kubernetes manifests' health probe command, pointed at this
        instance's API port, with ``token`` in the environment as the Secret puts it there
        (an instance without a token ignores the one the probe sends)."""
        (deployment,) = daemon_deployments()[:1]
        argv = probe_command(deployment["spec"]["template"]["spec"]["containers"][0])
        code = argv[-1].replace(":8760/", f":{self.api_port}/")
        assert argv[:2] == ["python", "-c"] and code != argv[-1], argv
        env = dict(os.environ, BROADCAST_FILTER_TOKEN=token)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              timeout=60).returncode  # fmt: skip

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]


def publisher(url: str, start: int) -> subprocess.Popen:
    """A PyAV publisher in its own process: stamped 64x64 frames for up to 15 minutes."""
    argv = [sys.executable, PEERS, "publish", "--url", url, "--format", "flv", "--fps", str(FPS),
            "--size", f"{SIZE[0]}x{SIZE[1]}", "--frames", str(900 * FPS),
            "--start", str(start)]  # fmt: skip
    return peers.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def delivering(instance: Instance, viewer: Viewer, since: float, timeout: float) -> int:
    """Wait until ``viewer`` decoded ENOUGH frames since ``since`` and the instance's health
    check says 200; return the frames counted."""
    try:
        wait_for(f"{ENOUGH} frames of {viewer.url}", lambda: viewer.since(since) >= ENOUGH, timeout)
        wait_for(f"{instance.name}'s /api/health to say 200", lambda: instance.health() == 200, 30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{instance.name}'s log ends:\n{instance.tail()}") from None
    return viewer.since(since)


@pytest.mark.slow
@pytest.mark.peers
def test_nginx_relays_two_daemons_one_killed_the_other_goes_on_and_the_restart_returns(
    tmp_path: Path,
):
    require_tool("nginx")
    if missing := peers.nginx_missing():
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    port = peers.free_port()
    nginx_dir = tmp_path / "nginx"
    conf = nginx_config(nginx_dir, port)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    peers.spawn([nginx, "-p", str(nginx_dir), "-c", str(conf), "-e", "stderr"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    peers.wait_port(port, timeout=20)
    rtmp = f"rtmp://127.0.0.1:{port}"
    publisher(f"{rtmp}/live/cam1", start=0)
    publisher(f"{rtmp}/live/cam2", start=1_000_000)
    a = site_instance("cam1", tmp_path, port).start()
    b = site_instance("cam2", tmp_path, port).start()
    view_a, view_b = Viewer(f"{rtmp}/out/cam1"), Viewer(f"{rtmp}/out/cam2")

    t0 = time.monotonic()
    first_a = delivering(a, view_a, t0, START_TIMEOUT)
    first_b = delivering(b, view_b, t0, START_TIMEOUT)
    print(f"\nboth outputs decode: cam1 {first_a}, cam2 {first_b} frames, "
          f"{time.monotonic() - t0:.0f} s after start")  # fmt: skip
    assert view_a.sizes == view_b.sizes == {f"{SIZE[0]} {SIZE[1]}"}
    # the Kubernetes probe passes on a delivering daemon (polled, like every check of a live
    # daemon here: a loaded machine may stall its output past the health check's 1 s)
    wait_for("the probe to pass on cam1", lambda: a.probe() == 0, 30, step=1.0)
    wait_for("the probe to pass on cam2", lambda: b.probe() == 0, 30, step=1.0)

    a.kill()
    killed_at = time.monotonic()
    after_kill = delivering(b, view_b, killed_at, DELIVER_TIMEOUT)
    gone = a.health()
    print(f"after SIGKILL of cam1: cam2 delivered {after_kill} new frames; "
          f"cam1's health check: {gone}")  # fmt: skip
    assert gone is None  # nothing answers on the killed daemon's port
    assert a.probe() != 0
    wait_for("cam2's source to be up", lambda: b.status()["source_up"], 30)  # still relayed

    a.start()
    restarted_at = time.monotonic()
    back = delivering(a, view_a, restarted_at, START_TIMEOUT)
    print(f"restarted cam1 delivered {back} frames, {time.monotonic() - restarted_at:.0f} s "
          f"after the restart")  # fmt: skip
    during = delivering(b, view_b, restarted_at, DELIVER_TIMEOUT)
    print(f"cam2 delivered {during} frames since cam1's restart, {view_b.since(killed_at)} "
          f"since the kill")  # fmt: skip
    assert b.proc is not None and b.proc.poll() is None


@pytest.mark.slow
def test_k8s_probe_passes_with_the_secrets_token_and_not_without(tmp_path: Path):
    """A daemon from the ConfigMap's cam1 config (:func:`cheap`, the test pattern in, no
    output): the API on the pod's address with the token, as in the cluster. The probe passes
    with the token the Secret gives it and fails with another; a request without a token
    (all an httpGet probe could send) is refused."""
    (configmap,) = of_kind("ConfigMap", CONFIGMAP)
    data = yaml.safe_load(configmap["data"]["cam1.yaml"])
    data["source"], data["sinks"] = {"url": "testsrc"}, ["null"]
    api_port = peers.free_port()
    path = tmp_path / "cam1.yaml"
    path.write_text(yaml.safe_dump(cheap(data, api_port)))
    token = secrets.token_hex(16)
    daemon = Instance("k8s-cam1", path, api_port, env={"BROADCAST_FILTER_TOKEN": token}).start()
    try:
        wait_for("the probe to pass", lambda: daemon.probe(token) == 0, START_TIMEOUT, step=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe daemon's log ends:\n{daemon.tail()}") from None
    assert daemon.probe("wrong-token") != 0
    assert daemon.health() == 401


# ------------------------------------------------------------------ what the files say


def k8s_configs(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The ConfigMap's daemon configs, laid out as the pods mount them (config/ beside the
    presets/ ConfigMap made from configs/presets), each loaded by the daemon's own loader."""
    (configmap,) = of_kind("ConfigMap", CONFIGMAP)
    shutil.copytree(ROOT / "configs" / "presets", folder / "presets")
    (folder / "config").mkdir()
    monkeypatch.setenv("BROADCAST_FILTER_TOKEN", "test-token")
    loaded = {}
    for key, text in configmap["data"].items():
        (folder / "config" / key).write_text(text)
        config = loaded[key] = load_config(folder / "config" / key)
        assert (config.presets_folder / f"{config.presets.start}.yaml").is_file(), key
    return loaded


def test_k8s_manifests_match_the_kubernetes_api_schemas():
    """Every field in its place, strictly (unknown fields are errors), against Kubernetes 1.25
    (the oldest schemas the validator ships) and the newest it knows; the ServiceMonitor is a
    CRD it has no schema for (checked below)."""
    validator = pytest.importorskip("kubernetes_validate")
    for version in ("1.25", validator.latest_version()):
        for doc in k8s_documents():
            if doc["kind"] != "ServiceMonitor":
                validator.validate(doc, version, strict=True)


def test_k8s_deployments_ask_one_gpu_and_probe_their_configs_api_health(tmp_path, monkeypatch):
    configs = k8s_configs(tmp_path, monkeypatch)
    deployments = daemon_deployments()
    assert len(deployments) == len(configs) >= 2
    seen = set()
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        spec, pod = deployment["spec"], deployment["spec"]["template"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", name
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        run, flag, path = container["args"]
        assert (run, flag) == ("run", "--config") and path.startswith(f"{MOUNT}/"), name
        key = path.removeprefix(f"{MOUNT}/")
        seen.add(key)
        api = configs[key].api
        assert api is not None and api.bind == "0.0.0.0", key  # the kubelet comes from outside
        (port,) = container["ports"]
        assert port == {"name": "api", "containerPort": api.port}, name
        command = probe_command(container)
        assert f'"http://127.0.0.1:{api.port}/api/health"' in command[-1], name
        (token,) = [e for e in container["env"] if e["name"] == api.token_env]
        assert token["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "token"}, name
        notes = pod["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true", name
        assert notes["prometheus.io/port"] == str(api.port), name
        assert notes["prometheus.io/path"] == "/metrics", name
        # the config and the presets folder it names are the two ConfigMaps' mounts
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v.get("configMap", {}).get("name") for v in pod["spec"]["volumes"]}
        presets = os.path.normpath(Path(MOUNT) / configs[key].presets.folder)
        assert volumes[mounts[MOUNT]] == CONFIGMAP, name
        assert volumes[mounts[presets]] == "broadcast-filter-presets", name
    assert seen == set(configs)


def test_k8s_service_and_service_monitor_scrape_the_api_port_with_the_token(tmp_path, monkeypatch):
    ports = {c.api.port for c in k8s_configs(tmp_path, monkeypatch).values() if c.api}
    (service,) = of_kind("Service", "broadcast-filter")
    (port,) = service["spec"]["ports"]
    assert {port["port"]} == ports and port["name"] == port["targetPort"] == "api"
    assert service["spec"]["publishNotReadyAddresses"]  # a stalled pod is still scraped
    labels = daemon_deployments()[0]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (monitor,) = of_kind("ServiceMonitor")
    selects = monitor["spec"]["selector"]["matchLabels"]
    assert selects.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("api", "/metrics")
    assert endpoint["authorization"]["credentials"] == {"name": SECRET, "key": "token"}


def test_k8s_daemons_reach_the_media_server_service():
    (service,) = of_kind("Service", "media-server")
    (port,) = service["spec"]["ports"]
    (configmap,) = of_kind("ConfigMap", CONFIGMAP)
    for key, text in configmap["data"].items():
        data = yaml.safe_load(text)
        stream = key.removesuffix(".yaml")
        base = f"rtmp://media-server:{port['port']}"
        assert data["source"]["url"] == f"{base}/live/{stream}", key
        assert data["sinks"] == [f"{base}/out/{stream}"], key


def test_instance_configs_load_and_each_owns_its_stream_and_api_port():
    rtmp = (DEPLOY / "nginx-rtmp.conf").read_text()
    apps = set(re.findall(r"application (\w+) \{", rtmp))
    ports = []
    paths = sorted((DEPLOY / "instances").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        config = load_config(path)
        name = path.stem
        assert config.source.url == f"rtmp://127.0.0.1:1935/live/{name}", path
        assert [s.url for s in config.sinks] == [f"rtmp://127.0.0.1:1935/out/{name}"], path
        assert (config.presets_folder / f"{config.presets.start}.yaml").is_file(), path
        assert config.api is not None and config.api.bind == "127.0.0.1", path
        ports.append(config.api.port)
    assert apps == {"live", "out"}
    assert len(set(ports)) == len(ports), f"two instances share an API port: {ports}"


UNIT = DEPLOY / "systemd" / "broadcast-filter@.service"
PREFIX = "/opt/broadcast-filter"


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values]}}`` of a systemd unit (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            sections[section] = {}
            continue
        key, _, value = line.partition("=")
        sections[section].setdefault(key, []).append(value)
    return sections


def test_systemd_unit_runs_the_instance_config_always_restarts_and_is_hardened(tmp_path):
    unit = unit_keys(UNIT.read_text())
    service = unit["Service"]
    (start,) = service["ExecStart"]
    argv = start.split()
    assert argv[:4] == [f"{PREFIX}/.venv/bin/broadcast-filter", "run", "--config",
                        f"{PREFIX}/configs/deploy/instances/%i.yaml"]  # fmt: skip
    assert (ROOT / "configs" / "deploy" / "instances").is_dir()
    assert service["WorkingDirectory"] == [PREFIX]
    assert service["Restart"] == ["always"]
    assert service["RestartPreventExitStatus"] == ["2"]  # the CLI's "configuration error"
    assert service["Environment"].count("HOME=%C/broadcast-filter") == 1
    assert service["CacheDirectory"] == ["broadcast-filter"]
    assert service["EnvironmentFile"] == ["/etc/broadcast-filter/%i.env"]  # required, per instance
    for key, value in {"DynamicUser": "yes", "User": "broadcast-filter", "NoNewPrivileges": "yes",
                       "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes"}.items():  # fmt: skip
        assert service[key] == [value], key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    example = (DEPLOY / "systemd" / "instance.env.example").read_text()
    assert re.search(r"^CUDA_VISIBLE_DEVICES=\d+$", example, re.M)
    # systemd's own check, where systemd is installed: the template as instance cam1, its
    # ExecStart pointed at an executable that exists here
    analyze = shutil.which("systemd-analyze")
    program = Path(sys.executable).with_name("broadcast-filter")
    if analyze is None or not program.exists():
        pytest.skip("systemd-analyze or the broadcast-filter script is missing here")
    instance = tmp_path / "broadcast-filter@cam1.service"
    text = UNIT.read_text().replace(f"{PREFIX}/.venv/bin/broadcast-filter", str(program))
    instance.write_text(text)
    result = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
