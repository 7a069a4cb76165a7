#!/usr/bin/env python3
"""Offline validation of k8s/: build every kustomization, validate every
resource, and check the manifests against the code they deploy.

Run by scripts/validate-k8s.sh, which installs what this needs into
target/k8s-venv (k8s/tools/requirements.txt) and passes the kustomize
library. What validates what (k8s/README.md, "Validation"):

- kustomize: the real one (sigs.k8s.io/kustomize/api, the library kubectl
  embeds), as the shared library the PyPI wheel pykustomize bundles, called
  through ctypes;
- built-in kinds: the Kubernetes JSON schemas bundled by kubernetes-validate,
  strict (unknown fields fail);
- ScaledObject, ServiceMonitor: the pydantic models cloudcoil generates from
  the KEDA and prometheus-operator CRD schemas, strict types, unknown fields
  fail;
- Strimzi kinds: no schema is obtainable offline (skipped, reason printed);
- the sluice checks: each stage's TOML against docs/configuration.md, memory
  limits against service.memory_limit_bytes, probes, grace periods,
  ownership (leases for more than one instance, the sink static), names
  shared with the code (streams, consumers, metrics), selectors.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib.metadata
import json
import re
import sys
import tomllib
import types
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILDS = ["k8s/base", "k8s/overlays/dev", "k8s/overlays/prod"]
STAGES = ["source", "enrich", "window", "sink"]
BINARY = {s: f"sluice-{s}" for s in STAGES}
WORKLOAD_KIND = {"source": "Deployment", "enrich": "StatefulSet", "window": "StatefulSet", "sink": "StatefulSet"}
INPUT_HOP = {"enrich": "raw", "window": "enriched", "sink": "rows"}
# The stage whose senders publish each stage's input (KEDA may wake a stage
# on its sender's metrics: with none of its own pods running it has none).
UPSTREAM = {"enrich": "source", "window": "enrich", "sink": "window"}
# The scaling floors issue 6 asks for: source, enrich and window can sleep
# (their input waits in Kafka or JetStream); the sink serves the API.
MIN_REPLICAS = {"source": 0, "enrich": 0, "window": 0, "sink": 1}
GRACE_MARGIN_S = 2          # docs: drain_timeout + 2 s under the grace period
SINK_MIRROR_S = 2           # the sink's PostgreSQL mirror may take 2 s more
STRIMZI_SKIP = ("no package on PyPI, npm or Debian ships the Strimzi CRD schemas "
                "(strimzi-kafka-cli fetches the Strimzi release at run time); checked instead: "
                "the strimzi.io/cluster references, KafkaTopic vs kafka.topic, bootstrap vs kafka.brokers")


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.checks = 0

    def check(self, ok: bool, message: str) -> bool:
        self.checks += 1
        if not ok:
            self.errors.append(message)
        return ok

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


# --- kustomize -------------------------------------------------------------

class Kustomize:
    """kustomize build through libpykustomize.so (pykustomize's bundled Go library)."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        self.lib.pykustomize_build.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        self.lib.pykustomize_build.restype = ctypes.c_int
        self.lib.pykustomize_last_error.restype = ctypes.c_void_p
        self.lib.pykustomize_free.argtypes = [ctypes.c_void_p]
        self.lib.pykustomize_version_string.restype = ctypes.c_void_p
        self.version = ctypes.string_at(self.lib.pykustomize_version_string()).decode()

    def build(self, directory: Path) -> str:
        # The defaults of `kustomize build` / `kubectl kustomize`: load
        # restrictions rootOnly, no plugins, no helm, legacy resource order.
        options = json.dumps({"load_restrictions": 0, "reorder": "legacy", "add_managedby_label": False,
                              "enable_plugins": False, "enable_helm": False, "helm_command": ""})
        out = ctypes.c_void_p()
        if self.lib.pykustomize_build(str(directory).encode(), options.encode(), ctypes.byref(out)) != 0:
            error = self.lib.pykustomize_last_error()
            raise RuntimeError(ctypes.string_at(error).decode() if error else "kustomize build failed")
        try:
            return ctypes.string_at(out.value).decode()
        finally:
            self.lib.pykustomize_free(out)


# --- what the code and the docs say -----------------------------------------

def code_facts() -> dict:
    """Names the manifests share with the code, read from the sources."""
    facts: dict = {}
    doc = (ROOT / "docs/configuration.md").read_text()
    # Which binary reads which section: the table under "Distributed mode".
    sections: dict[str, set[str]] = {b: set() for b in BINARY.values()}
    header = None
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[0] == "section" and "`sluice-source`" in cells:
            header = [c.strip("`") for c in cells]
            continue
        if header and cells and re.fullmatch(r"`\[\w+\]`", cells[0]):
            for binary, mark in zip(header[1:], cells[1:]):
                if binary in sections and mark == "✓":
                    sections[binary].add(cells[0].strip("`[]"))
        elif header and not cells:
            header = None
    if not all(sections.values()):
        raise SystemExit("docs/configuration.md: the section table of the services was not found")
    facts["sections"] = sections
    # Every key of the four services: the complete example file of the docs
    # (services/cli/tests/config_docs.rs checks it against the code).
    m = re.search(r"## A complete file for the services.*?```toml\n(.*?)```", doc, re.S)
    if not m:
        raise SystemExit("docs/configuration.md: 'A complete file for the services' not found")
    facts["keys"] = {s: set(v) for s, v in tomllib.loads(m.group(1)).items()}
    settings = (ROOT / "services/runtime/src/settings.rs").read_text()
    m = re.search(r"const NOT_SETTINGS: &\[&str\] = &\[(.*?)\];", settings, re.S)
    facts["not_settings"] = set(re.findall(r'"([A-Z_]+)"', m.group(1))) if m else set()
    metrics = (ROOT / "services/runtime/src/observe/metrics.rs").read_text()
    m = re.search(r"pub const NAMES: \[&str; \d+\] = \[(.*?)\];", metrics, re.S)
    if not m:
        raise SystemExit("services/runtime/src/observe/metrics.rs: NAMES not found")
    facts["metrics"] = set(re.findall(r'"(sluice_\w+)"', m.group(1)))
    hop = (ROOT / "services/runtime/src/transport/hop.rs").read_text()
    facts["consumer_naming"] = 'format!("{}-kg{:05}", self.name(), kg.0)' in hop
    return facts


# --- helpers ------------------------------------------------------------------

def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name), None)


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def quantity_bytes(q: str | int) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", str(q))
    if not m:
        raise ValueError(f"unsupported quantity {q!r}")
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*([a-z]+)", duration):
        total += int(number) * units[unit]
    return total


# --- schemas ------------------------------------------------------------------

class Schemas:
    def __init__(self, k8s_version: str) -> None:
        import functools

        import kubernetes_validate.utils as kv
        # Read each schema file once, not once per resource.
        kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)
        self.kv = kv
        self.k8s_version = k8s_version
        self.models: dict[tuple[str, str], tuple[type, str]] = {}
        self.counts: collections.Counter = collections.Counter()
        self.sources: dict[str, str] = {}
        self.skipped: collections.Counter = collections.Counter()

    def crd_model(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self.models:
            if key == ("keda.sh/v1alpha1", "ScaledObject"):
                from cloudcoil.models.keda import v1alpha1 as keda
                self.models[key] = (keda.ScaledObject, "KEDA " + importlib.metadata.version("cloudcoil.models.keda").rsplit(".", 1)[0])
            elif key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
                from cloudcoil.models.prometheus_operator import v1 as prom
                self.models[key] = (prom.ServiceMonitor, "prometheus-operator "
                                    + importlib.metadata.version("cloudcoil.models.prometheus_operator").rsplit(".", 1)[0])
            else:
                self.models[key] = (None, "")
        return self.models[key]

    def validate(self, doc: dict, where: str, report: Report) -> None:
        kind, api = doc.get("kind"), doc.get("apiVersion", "")
        name = f"{where}: {kind}/{doc.get('metadata', {}).get('name')}"
        if api.startswith("kafka.strimzi.io/"):
            self.skipped[kind] += 1
            return
        model, source = self.crd_model(api, kind)
        if model is not None:
            errors = strict_model_errors(model, doc)
            report.check(not errors, f"{name} does not match the {source} CRD schema: " + "; ".join(errors[:5]))
            self.counts[kind] += 1
            self.sources[kind] = f"CRD model ({source}, cloudcoil)"
            return
        try:
            self.kv.validate(doc, self.k8s_version, strict=True)
            report.check(True, "")
        except self.kv.SchemaNotFoundError:
            report.check(False, f"{name}: no schema for {api} {kind} (neither Kubernetes {self.k8s_version} nor a known CRD)")
        except self.kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            report.check(False, f"{name} does not validate against Kubernetes {self.k8s_version}: {path}: {e.message}")
        self.counts[kind] += 1
        self.sources[kind] = f"Kubernetes {self.k8s_version} JSON schema (kubernetes-validate, strict)"


def strict_model_errors(model: type, doc: dict) -> list[str]:
    """pydantic validation in strict mode, plus unknown fields (which the
    generated models would ignore) reported like a strict schema would."""
    import pydantic

    errors: list[str] = []
    try:
        model.model_validate(doc, strict=True)
    except pydantic.ValidationError as e:
        errors += [".".join(str(p) for p in err["loc"]) + ": " + err["msg"] for err in e.errors()]

    def shape_fits(value, ann) -> bool:
        origin = typing.get_origin(ann)
        if isinstance(value, dict):
            return origin in (dict, typing.Dict) or (isinstance(ann, type) and issubclass(ann, pydantic.BaseModel))
        if isinstance(value, list):
            return origin in (list, typing.List)
        return True

    def walk(value, ann, path: str) -> None:
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if origin is typing.Annotated:
            return walk(value, args[0], path)
        if origin in (typing.Union, types.UnionType):
            for candidate in (a for a in args if a is not type(None)):
                if shape_fits(value, candidate):
                    return walk(value, candidate, path)
            return None
        if origin in (list, typing.List) and isinstance(value, list) and args:
            for i, item in enumerate(value):
                walk(item, args[0], f"{path}[{i}]")
        elif origin in (dict, typing.Dict) and isinstance(value, dict) and len(args) == 2:
            for key, item in value.items():
                walk(item, args[1], f"{path}.{key}")
        elif isinstance(ann, type) and issubclass(ann, pydantic.RootModel):
            walk(value, ann.model_fields["root"].annotation, path)
        elif isinstance(ann, type) and issubclass(ann, pydantic.BaseModel) and isinstance(value, dict):
            fields = {(f.alias or n): f.annotation for n, f in ann.model_fields.items()}
            for key, item in value.items():
                if key not in fields:
                    errors.append(f"{path}.{key}: unknown field")
                else:
                    walk(item, fields[key], f"{path}.{key}")
        return None

    walk(doc, model, "")
    return [e.lstrip(".") for e in errors]


# --- the sluice checks ----------------------------------------------------------

def stage_config(docs: list[dict], workload: dict, stage: str, where: str, report: Report) -> dict | None:
    """The TOML the stage's container is given with --config, parsed."""
    spec = workload["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = container.get("args", [])
    if not report.check(container.get("command") == [BINARY[stage]] and "--config" in args,
                        f"{where}: {stage}: runs {container.get('command')} {args}, not {BINARY[stage]} --config FILE"):
        return None
    path = Path(args[args.index("--config") + 1])
    mount = next((m for m in container.get("volumeMounts", []) if Path(m["mountPath"]) == path.parent), None)
    volume = mount and next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), None)
    cm = volume and volume.get("configMap") and find(docs, "ConfigMap", volume["configMap"]["name"])
    if not report.check(bool(cm) and path.name in cm.get("data", {}),
                        f"{where}: {stage}: --config {path} is not a key of a ConfigMap mounted there"):
        return None
    try:
        return tomllib.loads(cm["data"][path.name])
    except tomllib.TOMLDecodeError as e:
        report.check(False, f"{where}: {stage}: {path.name} is not valid TOML: {e}")
        return None


def check_stage(docs, stage: str, facts: dict, where: str, report: Report) -> tuple[dict | None, dict | None]:
    kind = WORKLOAD_KIND[stage]
    workload = find(docs, kind, f"sluice-{stage}")
    if not report.check(workload is not None, f"{where}: no {kind} sluice-{stage}"):
        return None, None
    config = stage_config(docs, workload, stage, where, report)
    if config is None:
        return workload, None
    name = f"{where}: {stage}"
    allowed = facts["sections"][BINARY[stage]]
    for section, keys in config.items():
        if not report.check(section in allowed, f"{name}: section [{section}] is refused by {BINARY[stage]} (it reads {sorted(allowed)})"):
            continue
        for key in keys:
            report.check(key in facts["keys"].get(section, set()), f"{name}: unknown key {section}.{key} (docs/configuration.md)")
    service = config.get("service", {})
    report.check("instance" not in service and "instances" not in service,
                 f"{name}: service.instance/instances set in the TOML: key groups are leased, not assigned per pod")
    # Ownership: the sink is one static instance (the binary refuses leases);
    # more than one instance of another stage needs leases, since no pod is
    # given an instance index (each would take every key group or partition).
    ownership = service.get("ownership", "static")
    replicas = workload["spec"].get("replicas", 1)
    if stage == "sink":
        report.check(ownership == "static" and replicas == 1,
                     f"{name}: the sink runs as one static instance (ownership {ownership!r}, {replicas} replicas)")
    else:
        report.check(ownership == "leases" or replicas <= 1,
                     f"{name}: {replicas} replicas with service.ownership {ownership!r}: more than one needs leases")
    if ownership == "leases":
        beat, ttl = seconds(service.get("heartbeat_interval", "1s")), seconds(service.get("lease_ttl", "6s"))
        report.check(beat > 0 and ttl >= 3 * beat,
                     f"{name}: service.lease_ttl must be at least three service.heartbeat_interval")
    spec = workload["spec"]["template"]["spec"]
    container = spec["containers"][0]
    # Memory: the container's limit is service.memory_limit_bytes.
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    want = service.get("memory_limit_bytes", 536870912)
    report.check(limit is not None and quantity_bytes(limit) == want,
                 f"{name}: memory limit {limit} != service.memory_limit_bytes {want}")
    # Drain: the grace period covers drain_timeout + 2 s (+ 2 s of mirror for the sink).
    drain = seconds(service.get("drain_timeout", "8s")) + GRACE_MARGIN_S + (SINK_MIRROR_S if stage == "sink" else 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    report.check(grace > drain, f"{name}: terminationGracePeriodSeconds {grace} is not above drain_timeout + margins ({drain} s)")
    # Probes on service.listen's port.
    port = int(service.get("listen", "0.0.0.0:9090").rsplit(":", 1)[1])
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        report.check(get.get("path") == path and named.get(get.get("port"), get.get("port")) == port,
                     f"{name}: {probe} is not GET {path} on port {port}")
    # Settings from the environment: only the binary's sections and known keys.
    env = {e["name"]: e for e in container.get("env", [])}
    for var in env:
        if not var.startswith("SLUICE_") or var in facts["not_settings"] or var == "SLUICE_INSTANCE_NAME":
            continue
        section, _, key = var[len("SLUICE_"):].lower().partition("__")
        report.check(section in allowed and key in facts["keys"].get(section, set()),
                     f"{name}: {var} names no setting {BINARY[stage]} reads")
    report.check("SLUICE_SERVICE__INSTANCE" not in env and "SLUICE_SERVICE__INSTANCES" not in env,
                 f"{name}: instance indexes set per pod: key groups are leased")
    instance = env.get("SLUICE_INSTANCE_NAME", {})
    report.check(instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
                 f"{name}: SLUICE_INSTANCE_NAME is not the pod name (downward API)")
    if instance and "SLUICE_INSTANCE_NAME" not in facts["not_settings"]:
        report.warn("SLUICE_INSTANCE_NAME is not in NOT_SETTINGS of services/runtime/src/settings.rs: the "
                    "binaries of this tree refuse to start with it (unknown field `instance_name`) until "
                    "the lease work reads it")
    # State: service.state_dir is on a volume (a claim template for StatefulSets).
    state_dir = Path(service.get("state_dir", "state"))
    mounts = {Path(m["mountPath"]): m["name"] for m in container.get("volumeMounts", [])}
    volume = mounts.get(state_dir)
    if kind == "StatefulSet":
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        report.check(state_dir.is_absolute() and volume in claims,
                     f"{name}: service.state_dir {state_dir} is not a volumeClaimTemplate mount")
    else:
        report.check(state_dir.is_absolute() and volume is not None, f"{name}: service.state_dir {state_dir} is not a mounted volume")
    # Non-root, read-only root file system.
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
    report.check(pod_sc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True
                 and sc.get("allowPrivilegeEscalation") is False,
                 f"{name}: not non-root with a read-only root file system")
    # One PDB, maxUnavailable 1.
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget") if matches(p["spec"]["selector"].get("matchLabels", {}), pod_labels(workload))]
    report.check(len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1,
                 f"{name}: wants one PodDisruptionBudget with maxUnavailable 1, has {len(pdbs)}")
    if kind == "StatefulSet":
        governing = find(docs, "Service", workload["spec"].get("serviceName", ""))
        report.check(bool(governing) and governing["spec"].get("clusterIP") == "None"
                     and matches(governing["spec"].get("selector", {}), pod_labels(workload)),
                     f"{name}: serviceName is not a headless Service of its pods")
    return workload, config


def check_build(docs: list[dict], facts: dict, where: str, report: Report, base_keys: dict | None) -> dict:
    namespace = docs[0]["metadata"].get("namespace")
    configs: dict[str, dict] = {}
    workloads: dict[str, dict] = {}
    for stage in STAGES:
        workload, config = check_stage(docs, stage, facts, where, report)
        if workload:
            workloads[stage] = workload
        if config is not None:
            configs[stage] = config
    # One pipeline: the same key groups and stream prefix everywhere.
    for setting in (("pipeline", "key_groups", 64), ("nats", "prefix", "sluice")):
        values = {s: c.get(setting[0], {}).get(setting[1], setting[2]) for s, c in configs.items()}
        report.check(len(set(values.values())) <= 1, f"{where}: {setting[0]}.{setting[1]} differs between stages: {values}")
    key_groups = configs.get("source", {}).get("pipeline", {}).get("key_groups", 64)
    prefix = configs.get("source", {}).get("nats", {}).get("prefix", "sluice")
    # A TOML an overlay replaces keeps the base's keys (the values differ).
    if base_keys is not None:
        for stage, config in configs.items():
            keys = {(s, k) for s, v in config.items() for k in v}
            report.check(keys == base_keys.get(stage, keys),
                         f"{where}: {stage}'s TOML has other keys than the base's: {sorted(keys ^ base_keys[stage])}")
    # Services select pods, and their named target ports exist.
    pods = [pod_labels(w) for w in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")]
    for svc in by_kind(docs, "Service"):
        chosen = [p for p in pods if matches(svc["spec"].get("selector", {}), p)]
        report.check(len(chosen) == 1, f"{where}: Service {svc['metadata']['name']} selects {len(chosen)} workloads")
    # Addresses in the TOMLs name Services of the build (when it has servers).
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in by_kind(docs, "Service")}
    kafkas = {k["metadata"]["name"] for k in by_kind(docs, "Kafka")}
    for k in kafkas:
        services[f"{k}-kafka-bootstrap"] = {9092}
    if "nats" in services:
        for stage, config in configs.items():
            host, _, port = config.get("nats", {}).get("url", "nats://127.0.0.1:4222").split("//")[1].partition(":")
            report.check(int(port or 4222) in services.get(host, set()), f"{where}: {stage}: nats.url names no Service of the build")
    kafka = configs.get("source", {}).get("kafka", {})
    if "kafka" in services or kafkas:
        for broker in kafka.get("brokers", "").split(","):
            host, _, port = broker.partition(":")
            report.check(int(port) in services.get(host, set()), f"{where}: kafka.brokers {broker} names no Service of the build")
    # Strimzi objects refer to a Kafka of the build; the topic is the source's.
    for doc in docs:
        if doc.get("apiVersion", "").startswith("kafka.strimzi.io/") and doc["kind"] != "Kafka":
            cluster = doc["metadata"].get("labels", {}).get("strimzi.io/cluster")
            report.check(cluster in kafkas, f"{where}: {doc['kind']}/{doc['metadata']['name']}: strimzi.io/cluster {cluster} is no Kafka here")
    topics = {t["metadata"]["name"]: t for t in by_kind(docs, "KafkaTopic")}
    if topics:
        report.check(kafka.get("topic", "sdk-events") in topics, f"{where}: no KafkaTopic {kafka.get('topic', 'sdk-events')} (kafka.topic)")
    # The ServiceMonitor scrapes each stage exactly once.
    for sm in by_kind(docs, "ServiceMonitor"):
        selected = [s for s in by_kind(docs, "Service") if matches(sm["spec"]["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))]
        scraped = collections.Counter()
        ports = {e.get("port") for e in sm["spec"]["endpoints"]}
        for svc in selected:
            report.check(ports <= {p.get("name") for p in svc["spec"]["ports"]}, f"{where}: Service {svc['metadata']['name']} lacks the port the ServiceMonitor scrapes")
            for stage, w in workloads.items():
                if matches(svc["spec"].get("selector", {}), pod_labels(w)):
                    scraped[stage] += 1
        report.check(all(scraped[s] == 1 for s in STAGES) and sum(scraped.values()) == len(selected),
                     f"{where}: ServiceMonitor {sm['metadata']['name']} scrapes {dict(scraped)}, not each of the four stages once")
    # KEDA: targets, floors, and the names the triggers share with the code.
    for so in by_kind(docs, "ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        stage = next((s for s, w in workloads.items() if w["kind"] == ref.get("kind", "Deployment") and w["metadata"]["name"] == ref["name"]), None)
        n = f"{where}: ScaledObject {so['metadata']['name']}"
        if not report.check(stage is not None, f"{n}: scaleTargetRef {ref} is no stage workload"):
            continue
        leased = configs.get(stage, {}).get("service", {}).get("ownership", "static") == "leases"
        report.check(so["spec"].get("minReplicaCount") == MIN_REPLICAS[stage],
                     f"{n}: minReplicaCount {so['spec'].get('minReplicaCount')}, want {MIN_REPLICAS[stage]}")
        top = so["spec"].get("maxReplicaCount", 100)
        if not isinstance(top, int):
            pass  # the schema check reports it
        elif stage == "sink":
            report.check(top == 1, f"{n}: the sink serves every key group from one instance (maxReplicaCount 1)")
        elif stage == "source" and topics:
            report.check(top <= topics[kafka.get("topic", "sdk-events")]["spec"]["partitions"], f"{n}: more replicas than partitions")
        else:
            report.check(top <= key_groups, f"{n}: more replicas than key groups")
        if stage != "sink" and isinstance(top, int):
            report.check(leased or top <= 1, f"{n}: maxReplicaCount {top} without service.ownership = \"leases\"")
        for trigger in so["spec"]["triggers"]:
            meta = trigger.get("metadata", {})
            if trigger["type"] == "kafka":
                report.check(stage == "source" and meta.get("topic") == kafka.get("topic", "sdk-events")
                             and meta.get("consumerGroup") == kafka.get("group_id", "sluice-source"),
                             f"{n}: kafka trigger's topic/consumerGroup are not kafka.topic/kafka.group_id")
                for broker in meta.get("bootstrapServers", "").split(","):
                    check_remote(broker, services, namespace, f"{n}: bootstrapServers", report)
            elif trigger["type"] == "nats-jetstream":
                hop = INPUT_HOP.get(stage)
                # With leases the consumers are named by fence
                # ("<hop>-kg<NNNNN>-f<fence>"), a new name at every move: a
                # fixed name in the trigger finds no consumer.
                report.check(not leased, f"{n}: a nats-jetstream trigger on a leased stage: its consumers are named by "
                             "fence, so no fixed consumer name matches (use the prometheus trigger)")
                report.check(hop is not None and meta.get("stream") == f"{prefix.upper()}_{hop.upper()}",
                             f"{n}: stream {meta.get('stream')} is not the input of {stage}")
                m = re.fullmatch(r"(\w+)-kg(\d{5})", meta.get("consumer", ""))
                report.check(facts["consumer_naming"] and bool(m) and m.group(1) == hop and int(m.group(2)) < key_groups,
                             f"{n}: consumer {meta.get('consumer')} is not a key group's consumer of {hop} (Hop::consumer)")
                check_remote(meta.get("natsServerMonitoringEndpoint", ""), services, namespace, f"{n}: natsServerMonitoringEndpoint", report)
            elif trigger["type"] == "prometheus":
                query = meta.get("query", "")
                about = {s for s in (stage, UPSTREAM.get(stage)) if s and f'stage="{s}"' in query}
                report.check(bool(about) and f'namespace="{namespace}"' in query,
                             f"{n}: prometheus query is not about {stage} (or its sender {UPSTREAM.get(stage)}) in {namespace}")
                names = set(re.findall(r"\bsluice_\w+", meta.get("query", "")))
                report.check(names <= facts["metrics"], f"{n}: unknown metrics {sorted(names - facts['metrics'])}")
            else:
                report.check(False, f"{n}: unexpected trigger type {trigger['type']}")
    # The Grafana dashboard: shipped for the sidecar, about metrics that exist.
    dashboards = [c for c in by_kind(docs, "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if report.check(len(dashboards) == 1, f"{where}: wants one ConfigMap labelled grafana_dashboard: \"1\""):
        for key, text in dashboards[0]["data"].items():
            dash = json.loads(text)
            exprs = [t.get("expr", "") for p in dash.get("panels", []) for t in p.get("targets", [])]
            used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"\bsluice_\w+", e)}
            unknown = {n for n in used if n not in facts["metrics"]}
            report.check(not unknown, f"{where}: {key}: metrics not in services/runtime/src/observe/metrics.rs: {sorted(unknown)}")
            wanted = {"sluice_records_received_total", "sluice_records_sent_total", "sluice_consumer_lag", "sluice_time_share",
                      "sluice_credit_available_bytes", "sluice_credit_backlog_bytes", "sluice_credit_granted_bytes",
                      "sluice_resident_memory_bytes", "sluice_memory_limit_bytes", "sluice_records_rejected_total"}
            report.check(wanted <= used, f"{where}: {key}: no panel for {sorted(wanted - used)}")
    return {s: {(sec, k) for sec, v in c.items() for k in v} for s, c in configs.items()}


def check_remote(address: str, services: dict, namespace: str | None, what: str, report: Report) -> None:
    """An address KEDA's operator dials from its own namespace: <svc>.<ns>.svc[...]:port of this build."""
    host, _, port = address.partition(":")
    parts = host.split(".")
    report.check(len(parts) >= 3 and parts[2] == "svc" and parts[1] == namespace and port.isdigit()
                 and int(port) in services.get(parts[0], set()),
                 f"{what} {address} is not <Service of this build>.{namespace}.svc:<its port>")


# --- main ---------------------------------------------------------------------------

def compare_with_kubectl(outputs: dict[str, str]) -> int:
    import shutil
    import subprocess
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("compare: no kubectl on PATH")
        return 1
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout.strip().replace("\n", ", ")
    differ = 0
    for build, text in outputs.items():
        theirs = subprocess.run([kubectl, "kustomize", str(ROOT / build)], capture_output=True, text=True, check=True).stdout
        same_text = theirs.strip() == text.strip()
        same_docs = list(yaml.safe_load_all(theirs)) == list(yaml.safe_load_all(text))
        print(f"compare {build} with kubectl kustomize ({version}): "
              + ("byte-identical" if same_text else "same resources, formatting differs" if same_docs else "DIFFERENT"))
        differ += not same_docs
    return differ


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kustomize-lib", required=True, help="libpykustomize.so")
    ap.add_argument("--kubernetes-version", default="1.30.0", help="schemas to validate built-in kinds against")
    ap.add_argument("--out", help="write each build's YAML here")
    ap.add_argument("--compare-kubectl", action="store_true", help="also compare each build with `kubectl kustomize`")
    args = ap.parse_args()

    report = Report()
    facts = code_facts()
    kustomize = Kustomize(args.kustomize_lib)
    schemas = Schemas(args.kubernetes_version)
    outputs: dict[str, str] = {}
    built: list[str] = []
    base_keys = None
    for build in BUILDS:
        try:
            text = kustomize.build(ROOT / build)
        except RuntimeError as e:
            report.check(False, f"{build}: kustomize build failed: {e}")
            continue
        outputs[build] = text
        if args.out:
            out = Path(args.out) / (build.replace("/", "_") + ".yaml")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        docs = [d for d in yaml.safe_load_all(text) if d]
        built.append(f"{build} ({len(docs)} resources)")
        namespaces = {d["metadata"].get("namespace") for d in docs}
        report.check(len(namespaces) == 1, f"{build}: resources in several namespaces: {namespaces}")
        for doc in docs:
            schemas.validate(doc, build, report)
        try:
            keys = check_build(docs, facts, build, report, base_keys)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # A resource too malformed for the checks (the schema errors say why).
            report.check(False, f"{build}: the sluice checks stopped at {type(e).__name__}: {e}")
            continue
        if build == "k8s/base":
            base_keys = keys

    compare_failed = compare_with_kubectl(outputs) if args.compare_kubectl else 0

    print(f"kustomize: {kustomize.version} (sigs.k8s.io/kustomize/api, via ctypes)")
    print("built: " + ", ".join(built))
    print("validated, by kind:")
    for kind, n in sorted(schemas.counts.items()):
        print(f"  {kind:<22} {n:>3}  {schemas.sources[kind]}")
    for kind, n in sorted(schemas.skipped.items()):
        print(f"  {kind:<22} {n:>3}  SKIPPED: {STRIMZI_SKIP}")
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    for error in report.errors:
        print(f"ERROR: {error}")
    failed = len(report.errors) + compare_failed
    print(f"k8s: {report.checks - len(report.errors)} passed, {failed} failed, {sum(schemas.skipped.values())} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
