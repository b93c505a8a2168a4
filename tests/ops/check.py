#!/usr/bin/env python3
"""Checks the operations files with the real tools: the Helm chart (rendered and linted
by Helm's own library, every object validated against the Kubernetes API schemas),
the alert rules (promtool check and unit tests), the Grafana dashboard (its JSON, and
every query parsed by promtool) and docker-compose.yml (`docker-compose config`); and
scripts/services itself: on a busy machine, a fresh DSA_DEV_HOME with ports of its own
gets a second Garage (the installed binary, never a build) on the first run; and
DSA_PG_TUNED=1 on a stopped throwaway Debian cluster of its own port (DSA_PG_PORT)
starts it, sets trust, writes the recommended settings and restarts it once, and a
second run changes nothing. That Garage, the cluster and the home are removed again.

Run by scripts/test after scripts/services and tests/ops/install-tools. That the metric names used by the
dashboard and the alerts are exported by a real scrape is checked by the Rust
integration test `maintain_reports_the_backlog_and_every_name_the_dashboard_and_alerts_use`.
Prints one line per check and a closing "N passed, N failed".
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dsa-ingest"
DASHBOARD = CHART / "dashboards" / "dsa-ingest.json"
OPS = ROOT / "tests" / "ops"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion), whose API
# schemas the objects must satisfy; kubernetes-validate ships them.
KUBE_VERSION = "1.25.0"
# A release name of Helm's maximum length, so that every name the chart builds from it
# is shown to fit into 63 characters.
LONG_RELEASE = "a-release-name-of-fifty-three-characters-for-the-test"
# Kinds from custom resource definitions: kubernetes-validate knows only the built-in
# API; these are checked by structure here (and the rules by promtool).
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}

passed: list[str] = []
failed: list[str] = []


def check(name: str):
    """Runs the decorated function as one named check, recording its outcome."""

    def run(function):
        try:
            function()
        except Exception as error:  # noqa: BLE001 - every failure is reported
            failed.append(name)
            print(f"FAIL {name}: {error}", flush=True)
        else:
            passed.append(name)
            print(f"ok   {name}", flush=True)
        return function

    return run


def run_tool(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout


def objects(manifests: dict[str, str]) -> list[dict]:
    found = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("__path__", path)
                found.append(document)
    return found


def render(values: dict, name: str) -> list[dict]:
    chart = helm.Chart.load(CHART)
    try:
        chart.validate_schema(values)
        return objects(chart.render(values, name=name, namespace="ingest", is_install=True))
    finally:
        chart.close() if hasattr(chart, "close") else None


def lint(values: dict) -> None:
    report = helm.lint(CHART, values, strict=True, namespace="ingest", kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if problems or report.get("errors"):
        raise RuntimeError(json.dumps({"messages": problems, "errors": report.get("errors")}, indent=2))


def find(found: list[dict], kind: str, component: str | None = None) -> dict:
    for item in found:
        labels = item["metadata"].get("labels", {})
        if item["kind"] == kind and (component is None or labels.get("app.kubernetes.io/component") == component):
            return item
    raise RuntimeError(f"no {kind} {component or ''}")


DEFAULT_VALUES = {"existingSecret": "dsa-ingest-credentials"}
OVERRIDE_VALUES = yaml.safe_load((OPS / "override-values.yaml").read_text())
# Default values with the rules switched on: the rules the unit tests exercise.
RULES_VALUES = {**DEFAULT_VALUES, "prometheusRule": {"enabled": True}}

rendered: dict[str, list[dict]] = {}


@check("helm lint, default values")
def _():
    lint(DEFAULT_VALUES)


@check("helm lint, everything switched on")
def _():
    lint(OVERRIDE_VALUES)


@check("render, default values")
def _():
    rendered["default"] = render(DEFAULT_VALUES, "dsa-ingest")
    kinds = sorted(o["kind"] for o in rendered["default"])
    expected = ["ConfigMap", "Deployment", "Deployment", "Job", "PodDisruptionBudget", "Service", "ServiceAccount"]
    if kinds != expected:
        raise RuntimeError(f"kinds {kinds}, expected {expected}")


@check("render, everything switched on, longest release name")
def _():
    rendered["override"] = render(OVERRIDE_VALUES, LONG_RELEASE)
    kinds = {o["kind"] for o in rendered["override"]}
    missing = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"} - kinds
    if missing:
        raise RuntimeError(f"missing {missing}")
    watch = find(rendered["override"], "Deployment", "watch")["spec"]["template"]["spec"]
    if watch["serviceAccountName"] != find(rendered["override"], "ServiceAccount")["metadata"]["name"]:
        raise RuntimeError("the watchers do not use the ServiceAccount")
    consume = find(rendered["override"], "Deployment", "consume")
    if "replicas" in consume["spec"]:
        raise RuntimeError("with KEDA the ScaledObject owns the replica count")
    rules = find(rendered["override"], "PrometheusRule")["spec"]["groups"][0]["rules"]
    names = [rule["alert"] for rule in rules]
    if "DsaIngestSearchRefreshFailing" in names or len(names) != 7:
        raise RuntimeError(f"an alert set to null must go: {names}")
    if not all(rule["annotations"]["runbook_url"].startswith("https://runbooks.example.com/") for rule in rules):
        raise RuntimeError("runbook_url missing")


@check("the schema refuses values of the wrong type")
def _():
    chart = helm.Chart.load(CHART)
    for bad in ({"replicaCount": "two"}, {"prometheusRule": {"enabled": "yes"}}, {"podDisruptionBudget": {"maxUnavailable": []}}, {"unknownSetting": 1}):
        try:
            chart.validate_schema({**DEFAULT_VALUES, **bad})
        except helm.HelmError:
            continue
        raise RuntimeError(f"accepted {bad}")


@check("every rendered object is valid for the Kubernetes API")
def _():
    for which, found in rendered.items():
        for item in found:
            path = item.pop("__path__")
            if item["kind"] in CUSTOM_KINDS:
                if not item.get("apiVersion") or not item.get("spec"):
                    raise RuntimeError(f"{which} {path}: {item['kind']} without apiVersion or spec")
                continue
            try:
                kubernetes_validate.validate(item, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise RuntimeError(f"{which} {path} ({item['kind']}): {error.message} at {list(error.path)}") from None
            item["__path__"] = path


@check("names and label values fit into 63 characters")
def _():
    for which, found in rendered.items():
        for item in found:
            metadata = item["metadata"]
            texts = [metadata["name"], *metadata.get("labels", {}).values()]
            template = item.get("spec", {}).get("template", {}).get("metadata", {})
            texts += list(template.get("labels", {}).values())
            for text in texts:
                if len(str(text)) > 63:
                    raise RuntimeError(f"{which}: {item['kind']} has {text!r} ({len(str(text))} characters)")


@check("spool volume and ephemeral storage are derived from the settings")
def _():
    consume = find(rendered["default"], "Deployment", "consume")["spec"]["template"]["spec"]
    volume = next(v for v in consume["volumes"] if v["name"] == "tmp")
    # 4 workers x 5 GiB + 256 MiB.
    expected = f"{4 * 5 * 1024 + 256}Mi"
    requested = consume["containers"][0]["resources"]["requests"]["ephemeral-storage"]
    if volume["emptyDir"]["sizeLimit"] != expected or requested != expected:
        raise RuntimeError(f"{volume}, {requested}; expected {expected}")
    consume = find(rendered["override"], "Deployment", "consume")["spec"]["template"]["spec"]
    volume = next(v for v in consume["volumes"] if v["name"] == "tmp")
    if volume["emptyDir"]["sizeLimit"] != f"{2 * 1024 + 256}Mi":
        raise RuntimeError(f"override: {volume}")
    if consume["containers"][0]["resources"]["requests"]["ephemeral-storage"] != "4Gi":
        raise RuntimeError("an explicit ephemeral-storage request must win")
    if consume["serviceAccountName"] != find(rendered["override"], "ServiceAccount")["metadata"]["name"]:
        raise RuntimeError("the pods do not use the ServiceAccount")


@check("the dashboard ConfigMap carries the dashboard unchanged")
def _():
    config_map = next(
        o for o in rendered["override"] if o["kind"] == "ConfigMap" and "dsa-ingest.json" in o.get("data", {})
    )
    if config_map["metadata"]["labels"].get("grafana_dashboard") != "1":
        raise RuntimeError("the sidecar label is missing")
    if json.loads(config_map["data"]["dsa-ingest.json"]) != json.loads(DASHBOARD.read_text()):
        raise RuntimeError("the ConfigMap's dashboard differs from the file")


def promtool_rules(groups: list[dict], directory: Path) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    run_tool("promtool", "check", "rules", str(path))
    return path


@check("promtool check rules and promtool test rules on the rendered alerts")
def _():
    found = render(RULES_VALUES, "dsa-ingest")
    rule = find(found, "PrometheusRule")
    names = [r["alert"] for r in rule["spec"]["groups"][0]["rules"]]
    expected = [
        "DsaIngestImportRunningTooLong", "DsaIngestFailedImportRateHigh", "DsaIngestDeadLettersWaiting",
        "DsaIngestOutboxBacklog", "DsaIngestSpoolDiskFilling", "DsaIngestNoConsumers",
        "DsaIngestSearchRefreshFailing", "DsaIngestSweeperStalled",
    ]
    if names != expected:
        raise RuntimeError(f"alerts {names}")
    for r in rule["spec"]["groups"][0]["rules"]:
        if not {"summary", "description"} <= set(r["annotations"]) or "severity" not in r["labels"]:
            raise RuntimeError(f"{r['alert']} lacks severity, summary or description")
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        promtool_rules(rule["spec"]["groups"], directory)
        shutil.copy(OPS / "alerts-test.yaml", directory / "alerts-test.yaml")
        run_tool("promtool", "test", "rules", "alerts-test.yaml", cwd=directory)
        # Every alert is exercised by the unit tests, firing at least once.
        tests = yaml.safe_load((OPS / "alerts-test.yaml").read_text())["tests"]
        fired = {t["alertname"] for test in tests for t in test["alert_rule_test"] if t["exp_alerts"]}
        if set(expected) - fired:
            raise RuntimeError(f"no test makes {set(expected) - fired} fire")


@check("promtool check rules on the rules rendered with every option")
def _():
    rule = find(rendered["override"], "PrometheusRule")
    with tempfile.TemporaryDirectory() as directory:
        promtool_rules(rule["spec"]["groups"], Path(directory))


# Grafana's variables, replaced by values of their kind so promtool can parse a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
}


@check("the dashboard is well-formed and every query parses")
def _():
    dashboard = json.loads(DASHBOARD.read_text())
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        raise RuntimeError("schemaVersion must be a number the current Grafana reads (36 or later)")
    for key in ("title", "uid", "panels", "templating", "time"):
        if key not in dashboard:
            raise RuntimeError(f"no {key}")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource" or {"job", "instance"} - set(variables):
        raise RuntimeError("needs a datasource variable and job and instance selectors")
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        raise RuntimeError("panel ids repeat")
    expressions = []
    for panel in dashboard["panels"]:
        grid = panel.get("gridPos", {})
        if not {"h", "w", "x", "y"} <= set(grid) or grid["x"] + grid["w"] > 24:
            raise RuntimeError(f"panel {panel.get('title')}: bad gridPos {grid}")
        if panel["type"] == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            raise RuntimeError(f"panel {panel['title']} does not use the datasource variable")
        if not panel.get("targets"):
            raise RuntimeError(f"panel {panel['title']} has no query")
        for target in panel["targets"]:
            expressions.append((panel["title"], target["expr"]))
    for variable in variables.values():
        query = variable.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query["query"])
            if match:
                expressions.append((f"variable {variable['name']}", match.group(1)))
    rules = []
    for number, (title, expression) in enumerate(expressions):
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        if "$" in expression:
            raise RuntimeError(f"{title}: unknown variable in {expression}")
        rules.append({"record": f"dashboard:query_{number}", "expr": expression})
    with tempfile.TemporaryDirectory() as directory:
        promtool_rules([{"name": "dashboard", "rules": rules}], Path(directory))
    print(f"     {len(expressions)} queries in {len(ids)} panels", flush=True)


@check("docker-compose config, with and without the monitoring profile")
def _():
    env = dict(os.environ)
    run_tool("docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet")
    out = run_tool("docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", "monitoring", "config")
    services = yaml.safe_load(out)["services"]
    for name in ("prometheus", "grafana", "rabbitmq"):
        if name not in services:
            raise RuntimeError(f"no {name} service")
    for name, service in services.items():
        image = service.get("image", "")
        if image and (":" not in image or image.endswith(":latest")):
            raise RuntimeError(f"{name}: image {image} is not pinned")
    rabbitmq = services["rabbitmq"]["image"]
    if not re.search(r":4\.\d+\.\d+", rabbitmq):
        raise RuntimeError(f"RabbitMQ must be 4.x at an exact version: {rabbitmq}")
    del env


@check("promtool check config on the monitoring profile's Prometheus")
def _():
    run_tool("promtool", "check", "config", str(ROOT / "monitoring" / "prometheus.yml"))
    for path in (ROOT / "monitoring" / "grafana").rglob("*.yaml"):
        yaml.safe_load(path.read_text())


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, distinct, picked by the kernel."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def installed_garage() -> str:
    """The Garage 2.x binary scripts/services would pick; this check never builds one."""
    candidates = [shutil.which("garage"), str(Path.home() / ".cargo" / "bin" / "garage")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if re.search(r"(^|[^0-9.])v?2\.[0-9]+", version.stdout + version.stderr):
                return candidate
    raise RuntimeError("no Garage 2.x is installed: run scripts/services first (this check does not build Garage)")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stop_processes_of(home: Path) -> None:
    """Stops every process whose command line names a file under `home` (the Garage
    this check started, and a starter that had not yet become it), and only those."""
    ours = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and f"{home}/" in command_line(int(d.name))]
    for pid in ours:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for pid in ours:
        while Path(f"/proc/{pid}").exists() and f"{home}/" in command_line(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)


def fresh_dev_home(extra_ports: int = 0) -> tuple[Path, dict[str, str], list[int]]:
    """A new DSA_DEV_HOME and the environment that runs scripts/services for it, with a
    Garage of its own on three free ports; returns those ports, then `extra_ports` more."""
    garage = installed_garage()
    home = Path(tempfile.mkdtemp(prefix="dsa-dev-home-"))
    ports = free_ports(3 + extra_ports)
    env = {
        **os.environ,
        "DSA_DEV_HOME": str(home),
        "DSA_GARAGE_S3_PORT": str(ports[0]),
        "DSA_GARAGE_RPC_PORT": str(ports[1]),
        "DSA_GARAGE_ADMIN_PORT": str(ports[2]),
        # The installed binary comes first, so the script finds it before anything else.
        "PATH": f"{Path(garage).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return home, env, ports


@check("scripts/services starts a second Garage for a fresh DSA_DEV_HOME on a busy machine, first time")
def _():
    home, env, (s3_port, rpc_port, admin_port) = fresh_dev_home()
    # Startup detection once failed when the server was slow to exec: the starter
    # first closes every descriptor it inherited. Every core kept busy, and as many
    # inherited descriptors as a CI runner may leave open, make a slow start the rule
    # (the detection before the fix failed this way in four tries out of four).
    busy: list[subprocess.Popen] = []
    inherited: list[int] = []
    # 4000 descriptors need a soft limit above the common default of 1024; raised as
    # far as the hard limit allows, and the count kept below it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4000 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    pipes = 2000 if limit == resource.RLIM_INFINITY else min(2000, (limit - 256) // 2)
    try:
        busy.extend(
            subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
            for _ in range(max(2, os.cpu_count() or 2))
        )
        for _ in range(pipes):
            inherited.extend(os.pipe())
        first = subprocess.run(
            [str(ROOT / "scripts" / "services")], env=env, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, pass_fds=inherited, timeout=900,
        )
        if first.returncode != 0:
            raise RuntimeError(f"scripts/services exited {first.returncode}:\n{first.stderr}")
        if first.stdout.strip() != str(home / "services.env"):
            raise RuntimeError(f"stdout {first.stdout!r}, expected the settings file's path")
        if "building Garage" in first.stderr or "starting Garage" not in first.stderr:
            raise RuntimeError(f"expected a start of the installed Garage:\n{first.stderr}")
        settings = dict(line.split("=", 1) for line in (home / "services.env").read_text().splitlines())
        if settings["S3_ENDPOINT"] != f"http://127.0.0.1:{s3_port}":
            raise RuntimeError(f"S3_ENDPOINT {settings['S3_ENDPOINT']}, expected port {s3_port}")
        pid = int((home / "garage.pid").read_text())
        if f"{home}/garage.toml" not in command_line(pid) or " server" not in command_line(pid):
            raise RuntimeError(f"pid {pid} is not the Garage of {home}: {command_line(pid)!r}")
        for port in (s3_port, rpc_port, admin_port):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        # A second run finds this Garage up and leaves it alone.
        second = subprocess.run(
            [str(ROOT / "scripts" / "services")], env=env, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, pass_fds=inherited, timeout=300,
        )
        if second.returncode != 0 or "starting Garage" in second.stderr:
            raise RuntimeError(f"the second run exited {second.returncode}:\n{second.stderr}")
        if int((home / "garage.pid").read_text()) != pid:
            raise RuntimeError("the second run replaced the running Garage")
    finally:
        for process in busy:
            process.kill()
            process.wait()
        for fd in inherited:
            os.close(fd)
        stop_processes_of(home)
        shutil.rmtree(home, ignore_errors=True)


def pg_setting(port: int, query: str) -> str:
    return run_tool("psql", "-w", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
                    "-tAc", query).strip()


@check("DSA_PG_TUNED=1 scripts/services starts, trusts and tunes a stopped cluster of its own, restarting it once")
def _():
    version = sorted(os.listdir("/usr/lib/postgresql"), key=lambda v: [int(p) for p in v.split(".")])[-1]
    home, env, ports = fresh_dev_home(extra_ports=1)
    pg_port = ports[3]
    cluster = f"dsa-tuned-{pg_port}"
    env.update({"DSA_PG_PORT": str(pg_port), "DSA_PG_TUNED": "1"})

    def services() -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(ROOT / "scripts" / "services")], env=env, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"scripts/services exited {done.returncode}:\n{done.stderr}")
        return done

    # As scripts/services does it: root runs the cluster tools itself, anyone else
    # through sudo without a password prompt.
    as_root = [] if os.geteuid() == 0 else ["sudo", "-n"]
    # A Debian cluster as a fresh install leaves it: stopped, and asking loopback
    # clients for a password.
    run_tool(*as_root, "pg_createcluster", version, cluster, "-p", str(pg_port))
    try:
        first = services()
        for step in ("starting PostgreSQL cluster", "setting trust authentication",
                     "setting shared_buffers", "restarting PostgreSQL cluster"):
            if step not in first.stderr:
                raise RuntimeError(f"no {step!r} in the first run:\n{first.stderr}")
        settings = dict(line.split("=", 1) for line in (home / "services.env").read_text().splitlines())
        if f"127.0.0.1:{pg_port}/" not in settings["DATABASE_URL"]:
            raise RuntimeError(f"DATABASE_URL {settings['DATABASE_URL']} is not on port {pg_port}")
        memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:"))
        wanted = {
            "shared_buffers": f"{memory_kb // 4 // 1024}MB",
            "max_wal_size": "16GB",
            "wal_compression": "lz4",
            "wal_buffers": "64MB",
            "checkpoint_timeout": "30min",
            "autovacuum": "on",
        }
        # What the configuration files say, and that the server runs with it: a value
        # waiting for a restart shows as pending_restart.
        for name, value in wanted.items():
            written = pg_setting(pg_port, f"""select setting from pg_file_settings
                                              where name = '{name}' order by seqno desc limit 1""")
            if written != value:
                raise RuntimeError(f"{name} written as {written!r}, expected {value!r}")
            if pg_setting(pg_port, f"select pending_restart from pg_settings where name = '{name}'") != "f":
                raise RuntimeError(f"{name} = {value} is written but waits for a restart")
        running = pg_setting(pg_port, "select setting::bigint * 8 / 1024 || 'MB' from pg_settings where name = 'shared_buffers'")
        if running != wanted["shared_buffers"]:
            raise RuntimeError(f"the server runs with shared_buffers {running}, expected {wanted['shared_buffers']}")
        started = pg_setting(pg_port, "select pg_postmaster_start_time()")
        second = services()
        if "setting " in second.stderr or "restarting" in second.stderr:
            raise RuntimeError(f"the second run changed the server:\n{second.stderr}")
        if pg_setting(pg_port, "select pg_postmaster_start_time()") != started:
            raise RuntimeError("the second run restarted PostgreSQL")
    finally:
        stop_processes_of(home)
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run([*as_root, "pg_dropcluster", "--stop", version, cluster], capture_output=True,
                       stdin=subprocess.DEVNULL)
        # pg_dropcluster leaves the configuration directory behind when it holds a file
        # it did not write (the pg_hba.conf.orig that scripts/services keeps).
        subprocess.run([*as_root, "rm", "-rf", str(Path("/etc/postgresql") / version / cluster)],
                       capture_output=True, stdin=subprocess.DEVNULL)


print(f"{len(passed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
