"""The deployment files checked against the code: Dockerfile, deploy/compose.yaml, deploy/k8s.

A port, a topic, a setting, a route or a CLI command changed in the code without the matching
change in the deployment files fails here, without Docker or a cluster: the files are read as
data and compared with what the code says (Settings, CORE_TOPICS, the services' own apps, the
`dealstream` command's parser).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import json
import os
import re
import shlex
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock
from urllib.parse import urlparse

import pytest
import yaml
from fastapi import FastAPI
from starlette.routing import Match

from services import cli
from shared.bus.kafka import TOPIC_CONFIGS
from shared.contracts.topics import CORE_TOPICS
from shared.metrics import CONSUMER_LAG
from shared.settings import Settings, load_rules

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

SERVICES = cli.SERVICES
DEFAULT_PORTS = {service: Settings.model_fields[f"{service}_port"].default for service in SERVICES}
SETTING_NAMES = {f"DEALSTREAM_{name.upper()}" for name in Settings.model_fields}
# The one DEALSTREAM_* name that is not a setting: it tells the image's HEALTHCHECK which
# service the container runs (Settings ignores it).
NOT_SETTINGS = {"DEALSTREAM_SERVICE"}
# Settings whose values are secrets: never committed, in compose or in Kubernetes.
SECRET_SETTINGS = {"token_secret", "database_url", "kafka_sasl_password", "smtp_password",
                   "webhook_secret"}  # fmt: skip
# What every DealStream container of a real deployment must be given.
REQUIRED_ENV = {
    "DEALSTREAM_KAFKA",
    "DEALSTREAM_DATABASE_URL",
    "DEALSTREAM_TOKEN_SECRET",
    "DEALSTREAM_TOPIC_REPLICATION",
    "DEALSTREAM_TOPIC_MIN_INSYNC_REPLICAS",
    "DEALSTREAM_KAFKA_IDEMPOTENCE",
    "DEALSTREAM_HTTP_HOST",
    "DEALSTREAM_CONFIG_FILE",
    "DEALSTREAM_PUBLIC_URL",
}
PLACEHOLDER = "CHANGE-ME"
LAG_METRIC = "dealstream_consumer_lag"


@pytest.fixture(autouse=True)
def no_dealstream_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built here see only what the deployment files give, not this shell's variables."""
    for name in list(os.environ):
        if name.startswith("DEALSTREAM_"):
            monkeypatch.delenv(name)


# Reading the files.


@cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined and
    comments dropped, the way Docker reads them."""
    parsed = []
    current = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        keyword, _, arguments = (current + line).strip().partition(" ")
        parsed.append((keyword.upper(), arguments.strip()))
        current = ""
    return tuple(parsed)


def instructions(keyword: str) -> list[str]:
    return [arguments for key, arguments in dockerfile() if key == keyword]


def dockerfile_env() -> dict[str, str]:
    """The ENV of the image's final stage."""
    final = max(i for i, (key, _) in enumerate(dockerfile()) if key == "FROM")
    env: dict[str, str] = {}
    for key, arguments in dockerfile()[final:]:
        if key == "ENV":
            for word in shlex.split(arguments):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def healthcheck_command() -> list[str]:
    (healthcheck,) = instructions("HEALTHCHECK")
    _, _, command = healthcheck.partition(" CMD ")
    parsed: list[str] = json.loads(command)
    return parsed


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def dealstream_containers() -> dict[str, dict[str, Any]]:
    """The compose services that run the DealStream image (built from the Dockerfile)."""
    return {name: spec for name, spec in compose_services().items() if "build" in spec}


def kafka_brokers() -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in compose_services().items()
        if spec.get("image", "").startswith("apache/kafka:")
        and "KAFKA_NODE_ID" in spec.get("environment", {})
    }


INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<word>[^}]*))?\}")


def interpolated(value: str) -> str:
    """A compose value as the container would get it: `${NAME:-default}` gives its default,
    `${NAME:?message}` (a value the operator must give) a stand-in naming it."""

    def one(match: re.Match[str]) -> str:
        if match["op"] and match["op"].endswith("-"):
            return match["word"]
        return f"<{match['name']}>"

    return INTERPOLATION.sub(one, value.replace("$$", "$"))


def settings_of(env: Mapping[str, str]) -> Settings:
    """The Settings a container with the environment `env` starts with."""
    given: dict[str, Any] = {
        name.removeprefix("DEALSTREAM_").lower(): interpolated(str(value))
        for name, value in env.items()
        if name in SETTING_NAMES
    }
    return Settings(**given)


@cache
def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text("utf-8"))
    return loaded


@cache
def k8s_resources() -> tuple[dict[str, Any], ...]:
    """Every document of every resource file the kustomization lists."""
    documents: list[dict[str, Any]] = []
    for resource in kustomization()["resources"]:
        text = (K8S / resource).read_text(encoding="utf-8")
        documents.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return tuple(documents)


def k8s(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in k8s_resources() if doc["kind"] == kind}


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment: its ConfigMaps and Secrets (envFrom), then its own `env`."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s("ConfigMap")[source["configMapRef"]["name"]]["data"])
        if "secretRef" in source:
            env.update(k8s("Secret")[source["secretRef"]["name"]]["stringData"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "<from elsewhere>")
    return env


def dealstream_k8s_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, container) for every container running the DealStream image."""
    for kind in ("Deployment", "Job"):
        for name, workload in k8s(kind).items():
            for container in pod_spec(workload)["containers"]:
                if container["image"] == "dealstream":
                    yield name, container


def named_port(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def service_app(service: str) -> FastAPI:
    """The service's own HTTP app, built as its __main__ does, with stand-ins for the database,
    the event store and the clock (nothing is called on them while routes are looked up)."""
    create_api = importlib.import_module(f"services.{service}.api").create_api
    given: dict[str, Any] = {}
    for name, parameter in inspect.signature(create_api).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            continue
        if name == "settings":
            given[name] = Settings()
        elif name == "readiness":
            given[name] = lambda: None
        else:
            given[name] = MagicMock(name=name)
    app: FastAPI = create_api(**given)
    return app


def serves(app: FastAPI, path: str) -> bool:
    """Whether `GET path` reaches a route of `app` (asked of the routes, no handler runs)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "",
             "headers": [], "query_string": b""}  # fmt: skip
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


def consumer_groups(service: str) -> set[str]:
    """The consumer group ids the service's code consumes with: the third argument of each
    `BatchConsumer(name, settings, group_id, ...)` in its package."""
    groups: set[str] = set()
    for module in (ROOT / "services" / service).glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else None
            called = node.func.id if isinstance(node.func, ast.Name) else called
            if called != "BatchConsumer":
                continue
            given = [k.value for k in node.keywords if k.arg == "group_id"] + node.args[2:3]
            groups.update(
                g.value for g in given if isinstance(g, ast.Constant) and isinstance(g.value, str)
            )
    return groups


def deploy_files() -> list[Path]:
    return [DOCKERFILE, DOCKERIGNORE, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]


def topic_creations() -> list[dict[str, Any]]:
    """Every `kafka-topics.sh --create` the compose topic-init service runs, with its options."""
    script = "\n".join(compose_services()["topic-init"]["command"]).replace("$$", "$")
    created = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if not words or not words[0].endswith("kafka-topics.sh") or "--create" not in words:
            continue
        options: dict[str, Any] = {"config": {}}
        for flag, value in itertools.pairwise(words):
            if flag == "--config":
                key, _, setting = value.partition("=")
                options["config"][key] = setting
            elif flag in ("--topic", "--partitions", "--replication-factor"):
                options[flag.removeprefix("--")] = value
        created.append(options)
    return created


# The topics.


def test_every_topic_the_code_uses_is_created_by_compose() -> None:
    created = [creation["topic"] for creation in topic_creations()]
    assert sorted(created) == sorted(CORE_TOPICS)


def test_compose_creates_the_topics_as_the_settings_say_with_min_insync_replicas_2() -> None:
    settings = settings_of(compose_services()["capture"]["environment"])
    assert settings.topic_replication == 3
    assert settings.topic_min_insync_replicas == 2
    for creation in topic_creations():
        assert int(creation["partitions"]) == settings.topic_partitions, creation
        assert int(creation["replication-factor"]) == settings.topic_replication, creation
        wanted = {"min.insync.replicas": "2", **TOPIC_CONFIGS.get(creation["topic"], {})}
        assert creation["config"] == wanted, creation


def test_compose_runs_three_kraft_brokers_each_a_controller_voter() -> None:
    brokers = kafka_brokers()
    assert len(brokers) == 3
    node_ids = {}
    for name, spec in brokers.items():
        env = spec["environment"]
        assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", spec["image"]), "pin a Kafka 4.x release"
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert f"INTERNAL://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        node_ids[env["KAFKA_NODE_ID"]] = name
    voters = {
        voter.split("@")[0]: voter.split("@")[1].split(":")[0]
        for env in (spec["environment"] for spec in brokers.values())
        for voter in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    }
    assert voters == node_ids
    assert len({spec["environment"]["CLUSTER_ID"] for spec in brokers.values()}) == 1
    for name, spec in dealstream_containers().items():
        bootstrap = settings_of(spec["environment"]).bootstrap_servers()
        assert sorted(bootstrap.split(",")) == sorted(f"{b}:9092" for b in brokers), name


def test_compose_pins_an_official_postgres_release() -> None:
    assert re.fullmatch(r"postgres:\d+\.\d+", compose_services()["postgres"]["image"])


# The settings.


def test_every_dealstream_variable_in_the_deploy_files_is_a_setting() -> None:
    named = {
        name: path.relative_to(ROOT)
        for path in deploy_files()
        for name in re.findall(r"\bDEALSTREAM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text("utf-8"))
    }
    unknown = {name: str(path) for name, path in named.items() if name not in SETTING_NAMES}
    assert set(unknown) <= NOT_SETTINGS, f"not fields of shared.settings.Settings: {unknown}"
    assert NOT_SETTINGS <= set(named), "an exception nobody needs any more: drop it"
    assert REQUIRED_ENV <= set(named)


def test_the_deploy_files_give_every_setting_a_value_it_accepts() -> None:
    environments = {f"compose {n}": s["environment"] for n, s in dealstream_containers().items()}
    environments.update({f"k8s {n}": container_env(c) for n, c in dealstream_k8s_containers()})
    environments["Dockerfile"] = dockerfile_env()
    for where, env in environments.items():
        settings = settings_of(env)  # raises on a value the setting refuses
        assert settings.http_host == "0.0.0.0", where
        assert str(settings.config_file) == "/etc/dealstream/dealstream.toml", where


def test_every_dealstream_container_gets_what_a_real_cluster_needs() -> None:
    environments = {f"compose {n}": s["environment"] for n, s in dealstream_containers().items()}
    environments.update({f"k8s {n}": container_env(c) for n, c in dealstream_k8s_containers()})
    assert len(environments) == 2 * (len(SERVICES) + 1)  # the services and the migration
    for where, env in environments.items():
        assert REQUIRED_ENV <= set(env), f"{where} lacks {REQUIRED_ENV - set(env)}"
        settings = settings_of(env)
        assert settings.topic_replication == 3, where
        assert settings.topic_min_insync_replicas == 2, where
        assert settings.idempotent_producer(), where


def test_kubernetes_reaches_kafka_with_sasl_whose_password_is_a_secret() -> None:
    for name, container in dealstream_k8s_containers():
        settings = settings_of(container_env(container))
        assert settings.kafka_security_protocol == "SASL_SSL", name
        assert settings.kafka_sasl_username, name
    secret_keys = {key for s in k8s("Secret").values() for key in s["stringData"]}
    assert {"DEALSTREAM_DATABASE_URL", "DEALSTREAM_TOKEN_SECRET",
            "DEALSTREAM_KAFKA_SASL_PASSWORD"} <= secret_keys  # fmt: skip


def test_no_secret_is_committed() -> None:
    secret_names = {f"DEALSTREAM_{name.upper()}" for name in SECRET_SETTINGS}
    # Compose: from the operator's environment (deploy/.env), required, never written here.
    required = r"\$\{\w+:\?[^}]*\}"  # ${NAME:?message}
    containers = {**dealstream_containers(), "postgres": compose_services()["postgres"]}
    for name, spec in containers.items():
        for variable, value in spec["environment"].items():
            if variable == "DEALSTREAM_DATABASE_URL":  # the password within the URL
                assert re.fullmatch(rf"postgresql://\w+:{required}@[\w.:-]+/\w+", value), name
            elif variable in secret_names or variable == "POSTGRES_PASSWORD":
                assert re.fullmatch(required, value), f"{name}: {variable}"
    # Kubernetes: the Secret is a template of placeholders; the ConfigMaps hold no secret.
    for secret in k8s("Secret").values():
        for variable, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{variable} must stay a placeholder"
    for config_map in k8s("ConfigMap").values():
        assert not secret_names & set(config_map["data"]), config_map["metadata"]["name"]
    for name, container in dealstream_k8s_containers():
        written = {v["name"] for v in container.get("env", []) if "value" in v}
        assert not written & secret_names, name
    # The example env file has names only; the real one is ignored by git.
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8").splitlines()
    assignments = [line for line in example if line and not line.startswith("#")]
    assert assignments and all(line.endswith("=") for line in assignments), assignments
    assert ".env" in (DEPLOY / ".gitignore").read_text(encoding="utf-8").splitlines()


# The ports, probes and routes.


@pytest.mark.parametrize("service", SERVICES)
def test_compose_runs_each_service_on_its_settings_port_with_a_healthz_check(service: str) -> None:
    spec = compose_services()[service]
    port = getattr(settings_of(spec["environment"]), f"{service}_port")
    assert port == DEFAULT_PORTS[service]
    assert spec["command"] == [service]
    assert spec["ports"] == [f"{port}:{port}"]
    check = " ".join(spec["healthcheck"]["test"])
    assert re.findall(r"https?://[^'\" ]+", check) == [f"http://127.0.0.1:{port}/healthz"]
    depends = spec["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert depends["topic-init"]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert all(depends[broker]["condition"] == "service_healthy" for broker in kafka_brokers())


@pytest.mark.parametrize("service", SERVICES)
def test_kubernetes_ports_probes_and_scrape_annotations_match_the_settings(service: str) -> None:
    deployment = k8s("Deployment")[service]
    (container,) = pod_spec(deployment)["containers"]
    port = getattr(settings_of(container_env(container)), f"{service}_port")
    assert port == DEFAULT_PORTS[service]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["args"] == [service]
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    if "startupProbe" in container:
        probes["startupProbe"] = container["startupProbe"]["httpGet"]
    assert {named_port(container, probe["port"]) for probe in probes.values()} == {port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    (service_port,) = k8s("Service")[service]["spec"]["ports"]
    assert service_port["port"] == port
    assert named_port(container, service_port["targetPort"]) == port


@pytest.mark.parametrize("service", SERVICES)
def test_every_probe_and_scrape_path_is_a_route_the_service_serves(service: str) -> None:
    deployment = k8s("Deployment")[service]
    (container,) = pod_spec(deployment)["containers"]
    paths = {container[kind]["httpGet"]["path"] for kind in container if kind.endswith("Probe")}
    paths.add(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    checks = [" ".join(compose_services()[service]["healthcheck"]["test"]), *healthcheck_command()]
    paths.update(urlparse(url).path for url in re.findall(r"https?://[^'\" ]+", " ".join(checks)))
    assert paths == {"/healthz", "/readyz", "/metrics"}
    app = service_app(service)
    assert {path for path in paths if not serves(app, path)} == set()
    assert not serves(app, "/no-such-route")


# The image.


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_healthcheck_asks_the_healthz_of_the_service_it_runs_on_its_settings_port(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    asked: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: asked.append(url))
    monkeypatch.setenv("DEALSTREAM_SERVICE", service)
    exec(command[2], {"__name__": "__main__"})
    assert asked == [f"http://127.0.0.1:{DEFAULT_PORTS[service]}/healthz"]


def test_the_image_healthcheck_fails_when_no_service_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: asked.append(url))
    with pytest.raises(SystemExit) as exited:
        exec(healthcheck_command()[2], {"__name__": "__main__"})
    assert exited.value.code and asked == []


def test_the_image_exposes_the_settings_ports_and_listens_on_every_interface() -> None:
    exposed = {int(port) for line in instructions("EXPOSE") for port in line.split()}
    assert exposed == set(DEFAULT_PORTS.values())
    assert dockerfile_env()["DEALSTREAM_HTTP_HOST"] == "0.0.0.0"


def test_the_image_runs_as_a_non_root_user() -> None:
    user = instructions("USER")[-1].split(":")[0]
    assert user not in ("root", "0", "")
    created = re.search(r"useradd .*--uid (\d+)", " ".join(instructions("RUN")))
    assert created, "the image creates its user"
    uid = int(created.group(1))
    assert uid > 0 and user in (str(uid), "dealstream")
    for name, workload in [*k8s("Deployment").items(), *k8s("Job").items()]:
        context = pod_spec(workload)["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] == uid, name
        for container in pod_spec(workload)["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_the_image_is_built_in_stages_from_python_3_11_slim_without_dev_extras() -> None:
    (base,) = [a for a in instructions("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert base == "PYTHON_IMAGE=python:3.11-slim"
    stages = instructions("FROM")
    assert len(stages) >= 2 and all(s.startswith("${PYTHON_IMAGE}") for s in stages)
    installs = [r for r in instructions("RUN") if "pip install" in r]
    assert any(re.search(r"pip install \.(\s|$)", r) for r in installs)
    assert not any("[dev]" in r or "-e " in r for r in installs)
    assert any(c.startswith("--from=build /opt/venv") for c in instructions("COPY"))


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    sources = [c.split()[0] for c in instructions("COPY") if not c.startswith("--from")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is left out by .dockerignore"
    # What `pip install .` needs from pyproject.toml is there too.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= allowed


def test_every_command_the_deploy_files_give_the_image_is_a_dealstream_command() -> None:
    assert json.loads(instructions("ENTRYPOINT")[0]) == ["dealstream"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["dealstream"] == "services.cli:main"
    commands = {f"compose {n}": s["command"] for n, s in dealstream_containers().items()}
    commands.update({f"k8s {n}": c["args"] for n, c in dealstream_k8s_containers()})
    runs = {where: cli.parser().parse_args(command).run for where, command in commands.items()}
    for service in SERVICES:
        assert runs[f"compose {service}"] is cli.cmd_service
        assert runs[f"k8s {service}"] is cli.cmd_service
    assert runs["compose migrate"] is cli.cmd_migrate
    assert runs["k8s migrate"] is cli.cmd_migrate
    assert k8s("Job")["migrate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# The business rules file.


def test_the_rules_file_is_mounted_where_every_container_looks_for_it() -> None:
    config = Path(dockerfile_env()["DEALSTREAM_CONFIG_FILE"])
    for name, spec in dealstream_containers().items():
        assert settings_of(spec["environment"]).config_file == config, name
        mounts = {m.split(":")[1]: DEPLOY / m.split(":")[0] for m in spec["volumes"]}
        assert mounts[str(config)].resolve() == K8S / "dealstream.toml", name
    (generator,) = kustomization()["configMapGenerator"]
    assert generator["files"] == [config.name]
    for name, workload in k8s("Deployment").items():
        (container,) = pod_spec(workload)["containers"]
        assert settings_of(container_env(container)).config_file == config, name
        volumes = {
            v["name"]: v["configMap"]["name"]
            for v in pod_spec(workload)["volumes"]
            if "configMap" in v
        }
        mounted = {m["mountPath"]: volumes.get(m["name"]) for m in container["volumeMounts"]}
        assert mounted[str(config.parent)] == generator["name"], name


def test_the_sample_rules_file_is_valid_and_routes_to_a_team_it_defines() -> None:
    rules = load_rules(K8S / "dealstream.toml")
    teams = {team.id for team in rules.directory.teams}
    assert rules.routing.default_team in teams
    assert {rule.team for rule in rules.routing.rules} <= teams
    assert {user.team for user in rules.directory.users if user.team} <= teams


# The kustomize base.


def test_every_resource_in_the_kustomization_exists_and_every_manifest_is_listed() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    assert all((K8S / resource).is_file() for resource in listed)
    for generator in kustomization()["configMapGenerator"]:
        assert all((K8S / file).is_file() for file in generator["files"])
    manifests = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")}
    assert manifests - {"kustomization.yaml"} == set(listed)


def test_every_service_has_a_deployment_service_disruption_budget_and_autoscaler() -> None:
    for service in SERVICES:
        deployment = k8s("Deployment")[service]
        pods = deployment["spec"]["template"]["metadata"]["labels"]
        selected = deployment["spec"]["selector"]["matchLabels"]
        assert selected.items() <= pods.items()
        assert k8s("Service")[service]["spec"]["selector"] == selected
        assert k8s("PodDisruptionBudget")[service]["spec"]["selector"]["matchLabels"] == selected
        target = k8s("HorizontalPodAutoscaler")[service]["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", service)
    # Services are told apart by their component label, or one would select another's pods.
    components = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for d in k8s("Deployment").values()
    }
    assert components == set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_autoscalers_follow_the_consumer_lag_and_never_outnumber_the_partitions(
    service: str,
) -> None:
    autoscaler = k8s("HorizontalPodAutoscaler")[service]
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    spec = autoscaler["spec"]
    (container,) = pod_spec(k8s("Deployment")[service])["containers"]
    partitions = settings_of(container_env(container)).topic_partitions
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"] <= partitions
    (lag,) = [m["external"] for m in spec["metrics"] if m["type"] == "External"]
    assert lag["metric"]["name"] == LAG_METRIC
    # The gauge's `service` label is the consumer group id: the one the service's code uses.
    assert lag["metric"]["selector"]["matchLabels"]["service"] in consumer_groups(service)
    assert lag["target"]["type"] == "AverageValue"


def test_the_lag_metric_is_the_services_own_and_its_adapter_rule_is_documented() -> None:
    assert [metric.name for metric in CONSUMER_LAG.describe()] == [LAG_METRIC]
    assert "service" in CONSUMER_LAG._labelnames  # what the autoscalers select on
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    assert "prometheus-adapter" in readme
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.DOTALL)
    rules = [rule for block in blocks for rule in yaml.safe_load(block).get("externalRules", [])]
    (rule,) = rules
    assert rule["name"]["as"] == LAG_METRIC
    assert LAG_METRIC in rule["seriesQuery"]
    assert "by (service)" in rule["metricsQuery"]


def test_kubernetes_pods_have_resource_requests_and_limits() -> None:
    for name, container in dealstream_k8s_containers():
        resources = container["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[bound]), f"{name} {bound}"
