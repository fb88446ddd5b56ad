#!/usr/bin/env python3
"""Checks of the Helm chart `helm/agent-sessions`, run by CI through
`scripts/helm-check.sh` (which sets up the pinned virtualenv this needs).

No cluster and no `helm` binary: Helm v4's own Go SDK (PyPI `helm-python-sdk`)
lints and renders the chart, and `kubernetes-validate` checks every rendered
object against the Kubernetes OpenAPI schemas in strict mode (unknown fields
are errors).

Two kinds of checks on top of that:

- Policies, asserted on every rendering: secrets only by reference; the
  runner's RBAC least privilege (its Role equal to
  `ci/expected-runner-rbac.json`, nothing cluster-wide); hardened pods;
  NetworkPolicies that open only the ports the values name; the objects
  agree with one another (one image, selectors, the runner's API URL); the
  values schema describes and closes every section; `ci/all-on-values.yaml`
  turns every option on.
- What the templates produce, compared with a committed golden render:
  `golden/defaults.yaml` (default values) and `golden/all-on.yaml`
  (`ci/all-on-values.yaml`). A change to a template shows up as a diff here;
  when the change is meant, regenerate them and commit the result:

      bash scripts/helm-check.sh --update-golden

Exit status 0 when every check passes, 1 otherwise. The rendered manifests
are written to a temporary directory (or `--out`) for debugging.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import helm_python as helm
import kubernetes_validate as kv
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "agent-sessions"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
EXPECTED_RBAC = CHART / "ci" / "expected-runner-rbac.json"
GOLDEN = CHART / "golden"
NAMESPACE = "agents"

# Environment variables that carry secrets: they must come from a Secret.
SECRET_ENV = {"DATABASE_URL", "REDIS_URL", "API_TOKEN", "ANTHROPIC_API_KEY"}
# Names that look secret but hold only a Secret's name/key or a plain URL.
NOT_SECRET_ENV = {"API_URL", "APP__RUNNER__API_KEY_SECRET", "APP__RUNNER__API_KEY_SECRET_KEY"}
SECRET_LOOKING_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_KEY|CREDENTIAL|_URL$")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\"']*:[^/\s@\"']+@", re.I)

POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}
HOOK_DELETE_POLICY = {"before-hook-creation", "hook-succeeded"}


@dataclass
class Scenario:
    """One way of installing the chart: a release name and values."""

    name: str
    release: str
    values: dict[str, Any] | None
    expect_kinds: set[str] = field(default_factory=set)
    # Compared with golden/<name>.yaml when true.
    golden: bool = False


@dataclass
class Report:
    passed: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, scope: str, what: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"[{scope}] {what}" + (f": {detail}" if detail else ""))
            print(f"  FAIL {what}" + (f": {detail}" if detail else ""))
        return ok


# --------------------------------------------------------------------------
# Rendering


def load_values_file(path: Path) -> dict[str, Any]:
    # Helm's own YAML reading, so the values are exactly what `-f` would give.
    return helm.values_from_yaml(path.read_text())


def kube_versions() -> list[str]:
    """The chart's floor (Chart.yaml kubeVersion) and the newest schemas shipped."""
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    m = re.search(r">=\s*v?(\d+\.\d+)", chart_yaml.get("kubeVersion", ""))
    newest = kv.latest_version()
    newest_mm = ".".join(newest.split(".")[:2])
    versions = [m.group(1)] if m else []
    if newest_mm not in versions:
        versions.append(newest_mm)
    return versions


def split_docs(rendered: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield template, doc


def combined(rendered: dict[str, str]) -> str:
    """Every manifest in one YAML stream, in template order (NOTES.txt left out)."""
    return "".join(
        f"---\n# Source: {template}\n{text.strip()}\n"
        for template, text in sorted(rendered.items())
        if text.strip() and not template.endswith("NOTES.txt")
    )


def write_out(out_dir: Path, scenario: Scenario, rendered: dict[str, str]) -> None:
    target = out_dir / scenario.name
    target.mkdir(parents=True, exist_ok=True)
    for template, text in sorted(rendered.items()):
        if not text.strip():
            continue
        name = template.split("/templates/", 1)[-1].replace("/", "_")
        (target / name).write_text(text)
    (target / "all.yaml").write_text(combined(rendered))


# --------------------------------------------------------------------------
# Helpers over rendered objects


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def component(doc: dict) -> str | None:
    return doc.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec")
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in POD_OWNERS:
        return doc["spec"]["template"]["spec"]
    return None


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def rule_triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    """Flatten RBAC rules to (apiGroup, resource, verb) so order and grouping don't matter."""
    out = set()
    for rule in rules:
        for group in rule.get("apiGroups") or [""]:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    out.add((group, resource, verb))
    return out


def image_ref(section: dict[str, Any], app_version: str) -> str:
    if section.get("digest"):
        return f"{section['repository']}@{section['digest']}"
    return f"{section['repository']}:{section.get('tag') or app_version}"


def walk(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, path + (k,))


def get_path(node: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


# --------------------------------------------------------------------------
# The checks


def check_lint(r: Report, scope: str, values: dict | None, versions: list[str]) -> None:
    for version in versions:
        report = helm.lint(
            CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{version}.0"
        )
        problems = [
            f"{m['path']}: {m['error'].strip()}"
            for m in report.get("messages", [])
            if m.get("severity", 0) >= 2
        ] + [e.strip() for e in report.get("errors", [])]
        r.check(scope, f"helm lint --strict (kube {version})", not problems, "; ".join(problems))


def check_schemas(r: Report, scope: str, docs: list[tuple[str, dict]], versions: list[str]) -> None:
    for template, doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
                ok, detail = True, ""
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                ok, detail = False, f"{path}: {e.message}"
            except kv.SchemaNotFoundError as e:
                ok, detail = False, e.message
            except Exception as e:  # noqa: BLE001 - any other failure is a failed check
                ok, detail = False, f"{type(e).__name__}: {e}"
            r.check(scope, f"kubernetes-validate --strict {version}: {what} ({template})", ok, detail)


def check_names(r: Report, scope: str, docs: list[dict]) -> None:
    for doc in docs:
        name = doc.get("metadata", {}).get("name", "")
        r.check(scope, f"name {name!r} is a DNS label (<= 63)",
                bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name)))
        labels = doc.get("metadata", {}).get("labels", {})
        missing = [k for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                               "app.kubernetes.io/managed-by", "app.kubernetes.io/component",
                               "helm.sh/chart") if k not in labels]
        r.check(scope, f"{doc['kind']}/{name} has the standard labels", not missing, f"missing {missing}")


def check_workloads(r: Report, scope: str, docs: list[dict], values: dict, app_version: str,
                    runner_on: bool, migration_on: bool) -> dict[str, dict]:
    """The API, runner and migration workloads, by role: each rendered exactly
    when its values ask for it, and every pod of the chart on the one image."""
    expected_image = image_ref(values["image"], app_version)
    roles = {
        "api": [d for d in of_kind(docs, "Deployment") if component(d) == "api"],
        "runner": [d for d in of_kind(docs, "Deployment") if component(d) == "runner"],
        "migrate": [d for d in of_kind(docs, "Job") if component(d) == "migrate"],
    }
    wanted = {"api": True, "runner": runner_on, "migrate": migration_on}
    found: dict[str, dict] = {}
    for role, objs in roles.items():
        if not r.check(scope, f"{role}: {'one' if wanted[role] else 'no'} workload rendered",
                       len(objs) == (1 if wanted[role] else 0), f"found {len(objs)}"):
            continue
        if objs:
            found[role] = objs[0]
    images = {c.get("image") for d in docs if pod_spec(d) for c in containers(pod_spec(d))}
    r.check(scope, f"every pod of the chart uses the one image {expected_image}",
            images == {expected_image}, f"{images}")
    return found

def check_api(r: Report, scope: str, docs: list[dict], api: dict) -> None:
    """The API's Service reaches the API's pods on a port they open."""
    services = [s for s in of_kind(docs, "Service") if component(s) == "api"]
    if not r.check(scope, "api: one Service", len(services) == 1, f"found {len(services)}"):
        return
    svc = services[0]
    sel = svc["spec"].get("selector", {})
    tmpl_labels = api["spec"]["template"]["metadata"]["labels"]
    r.check(scope, "api: Service selects the API pods",
            bool(sel) and all(tmpl_labels.get(k) == v for k, v in sel.items()), f"{sel}")
    named = {p.get("name") for p in pod_spec(api)["containers"][0].get("ports") or []}
    targets = {p.get("targetPort") for p in svc["spec"]["ports"]}
    r.check(scope, "api: Service targets a port the container opens", targets <= named,
            f"{targets} vs {named}")

def check_config(r: Report, scope: str, docs: list[dict], found: dict[str, dict]) -> None:
    """One settings ConfigMap that every workload sees (the migration hook
    inline, since hooks run before the ConfigMap exists)."""
    cms = [d for d in of_kind(docs, "ConfigMap") if component(d) == "config"]
    if not r.check(scope, "one settings ConfigMap", len(cms) == 1, f"found {len(cms)}"):
        return
    cm = cms[0]
    data = cm.get("data", {})
    for role in ("api", "runner"):
        if role in found:
            refs = [e.get("configMapRef", {}).get("name") for c in containers(pod_spec(found[role]))
                    for e in c.get("envFrom") or []]
            r.check(scope, f"{role}: envFrom the ConfigMap", cm["metadata"]["name"] in refs, f"{refs}")
    if "migrate" in found:
        env = env_of(pod_spec(found["migrate"])["containers"][0])
        inline = {k: env[k].get("value") for k in data if k in env}
        r.check(scope, "migrate: gets every ConfigMap setting inline",
                inline == data, f"differs in {sorted(set(data) ^ set(inline))}")

def check_secrets(r: Report, scope: str, docs: list[dict], found: dict[str, dict], values: dict,
                  rendered_text: str) -> None:
    r.check(scope, "no Secret object rendered (secrets are references only)",
            not of_kind(docs, "Secret"), f"{[d['metadata']['name'] for d in of_kind(docs, 'Secret')]}")
    leaked = URL_WITH_PASSWORD.findall(rendered_text)
    r.check(scope, "no URL with a password anywhere in the manifests", not leaked, f"{leaked}")
    refs = {
        "DATABASE_URL": (values["database"]["existingSecret"], values["database"]["existingSecretKey"]),
        "REDIS_URL": (values["redis"]["existingSecret"], values["redis"]["existingSecretKey"]),
        "API_TOKEN": (values["runner"]["apiTokenSecret"], values["runner"]["apiTokenSecretKey"]),
        "ANTHROPIC_API_KEY": (values["anthropic"]["existingSecret"], values["anthropic"]["existingSecretKey"]),
    }
    needs = {"api": {"DATABASE_URL", "REDIS_URL"}, "runner": {"REDIS_URL", "API_TOKEN"},
             "migrate": {"DATABASE_URL"}}
    for doc in docs:
        spec = pod_spec(doc)
        if not spec:
            continue
        for c in containers(spec):
            where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
            for name, e in env_of(c).items():
                if name in SECRET_ENV:
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                    r.check(scope, f"{where}: {name} from secretKeyRef {refs[name]}",
                            "value" not in e and (ref.get("name"), ref.get("key")) == refs[name], f"{e}")
                elif SECRET_LOOKING_NAME.search(name) and name not in NOT_SECRET_ENV:
                    r.check(scope, f"{where}: secret-looking {name} not given as a plain value",
                            "value" not in e, f"{e}")
    for role, names in needs.items():
        if role in found:
            env = env_of(pod_spec(found[role])["containers"][0])
            r.check(scope, f"{role}: has {sorted(names)} from Secrets", names <= set(env), f"{sorted(env)}")
    if "runner" in found:
        env = env_of(pod_spec(found["runner"])["containers"][0])
        r.check(scope, "runner: never gets ANTHROPIC_API_KEY itself (only the Secret's name and key)",
                "ANTHROPIC_API_KEY" not in env)
    for cm in of_kind(docs, "ConfigMap"):
        bad = sorted(set(cm.get("data", {})) & SECRET_ENV)
        r.check(scope, f"ConfigMap/{cm['metadata']['name']} holds no secret settings", not bad, f"{bad}")


def check_runner(r: Report, scope: str, docs: list[dict], runner: dict | None, values: dict,
                 expected_rules: list[dict]) -> None:
    """RBAC least privilege: the runner's Role is exactly the calls its code
    makes, namespaced, bound to its own ServiceAccount only."""
    roles = of_kind(docs, "Role")
    cluster = of_kind(docs, "ClusterRole") + of_kind(docs, "ClusterRoleBinding")
    r.check(scope, "no cluster-wide RBAC", not cluster, f"{[d['metadata']['name'] for d in cluster]}")
    if runner is None:
        r.check(scope, "runner off: no Role, RoleBinding or runner ServiceAccount",
                not roles and not of_kind(docs, "RoleBinding") and
                not [s for s in of_kind(docs, "ServiceAccount") if component(s) == "runner"])
        return
    if not r.check(scope, "runner: exactly one Role", len(roles) == 1, f"found {len(roles)}"):
        return
    role = roles[0]
    got, want = rule_triples(role.get("rules") or []), rule_triples(expected_rules)
    r.check(scope, f"runner Role rules equal {EXPECTED_RBAC.relative_to(ROOT)}", got == want,
            f"extra {sorted(got - want)}, missing {sorted(want - got)}")
    r.check(scope, "runner Role rules name no resourceNames or nonResourceURLs",
            all(not rule.get("resourceNames") and not rule.get("nonResourceURLs") for rule in role.get("rules") or []))
    spec = pod_spec(runner)
    env = {k: e.get("value") for k, e in env_of(spec["containers"][0]).items()}
    worker_ns = env.get("APP__RUNNER__NAMESPACE")
    r.check(scope, "runner Role lives in the workers' namespace (APP__RUNNER__NAMESPACE)",
            role["metadata"].get("namespace") == worker_ns, f"{role['metadata'].get('namespace')} vs {worker_ns}")
    bindings = of_kind(docs, "RoleBinding")
    sa = spec.get("serviceAccountName")
    if r.check(scope, "runner: exactly one RoleBinding", len(bindings) == 1, f"found {len(bindings)}"):
        rb = bindings[0]
        r.check(scope, "RoleBinding refers to the runner Role",
                rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]} and
                rb["metadata"].get("namespace") == role["metadata"].get("namespace"), f"{rb['roleRef']}")
        r.check(scope, "RoleBinding binds only the runner's ServiceAccount",
                rb.get("subjects") == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
                f"{rb.get('subjects')} vs {sa}")
    sas = [s["metadata"]["name"] for s in of_kind(docs, "ServiceAccount")]
    r.check(scope, "runner: its own ServiceAccount is rendered", sa in sas, f"{sa} not in {sas}")
    r.check(scope, "runner: the Anthropic Secret it names for worker pods is the values' one",
            (env.get("APP__RUNNER__API_KEY_SECRET"), env.get("APP__RUNNER__API_KEY_SECRET_KEY")) ==
            (values["anthropic"]["existingSecret"], values["anthropic"]["existingSecretKey"]))
    api_svcs = [s for s in of_kind(docs, "Service") if component(s) == "api"]
    url = urlparse(env.get("API_URL") or "")
    if api_svcs:
        svc = api_svcs[0]
        r.check(scope, "runner: API_URL is the API Service",
                url.scheme == "http" and (url.hostname or "").split(".")[0] == svc["metadata"]["name"]
                and url.port == svc["spec"]["ports"][0]["port"], f"{env.get('API_URL')}")


def check_security(r: Report, scope: str, docs: list[dict]) -> None:
    for doc in docs:
        spec = pod_spec(doc)
        if not spec:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        psc = spec.get("securityContext") or {}
        r.check(scope, f"{where}: pod runAsNonRoot, runAsUser 10001, seccomp RuntimeDefault",
                psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001 and
                (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{psc}")
        if component(doc) != "runner":
            r.check(scope, f"{where}: no service account token mounted",
                    spec.get("automountServiceAccountToken") is False)
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            r.check(scope, f"{where}/{c['name']}: hardened securityContext",
                    sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
                    and (sc.get("capabilities") or {}).get("drop") == ["ALL"] and sc.get("runAsNonRoot") is True
                    and sc.get("runAsUser") == 10001
                    and (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{sc}")


def check_network_policies(r: Report, scope: str, docs: list[dict], values: dict, found: dict) -> None:
    policies = {component(p): p for p in of_kind(docs, "NetworkPolicy")}
    if not values["networkPolicy"]["enabled"]:
        r.check(scope, "networkPolicy off: none rendered", not policies)
        return
    for role in found:
        r.check(scope, f"{role}: has a NetworkPolicy for Ingress and Egress",
                role in policies and set(policies[role]["spec"]["policyTypes"]) == {"Ingress", "Egress"})
    port = values["api"]["port"]
    if "api" in policies:
        ingress = policies["api"]["spec"].get("ingress") or []
        r.check(scope, f"api NetworkPolicy: ingress only on port {port}, never from everywhere",
                all(rule.get("from") and [p.get("port") for p in rule.get("ports") or []] == [port]
                    for rule in ingress), f"{ingress}")
        egress_ports = {p.get("port") for rule in policies["api"]["spec"]["egress"] for p in rule.get("ports") or []}
        want = set(values["networkPolicy"]["dns"]["ports"]) | set(values["networkPolicy"]["database"]["ports"]) \
            | set(values["networkPolicy"]["redis"]["ports"])
        r.check(scope, "api NetworkPolicy: egress to DNS, PostgreSQL and Redis ports only", egress_ports == want,
                f"{egress_ports} vs {want}")
    if "runner" in policies:
        spec = policies["runner"]["spec"]
        r.check(scope, "runner NetworkPolicy: no ingress", not spec.get("ingress"))
        egress_ports = {p.get("port") for rule in spec["egress"] for p in rule.get("ports") or []}
        np = values["networkPolicy"]
        want = {port} | set(np["dns"]["ports"]) | set(np["redis"]["ports"]) | set(np["kubeApi"]["ports"]) \
            | set(np["anthropic"]["ports"])
        r.check(scope, "runner NetworkPolicy: egress to DNS, API, Redis, kube API and HTTPS ports only",
                egress_ports == want, f"{egress_ports} vs {want}")


def check_all_on(r: Report, scope: str, defaults: dict, all_on: dict, docs: list[dict],
                 rendered: dict[str, str], expect_kinds: set[str]) -> None:
    """`ci/all-on-values.yaml` must switch on every option the defaults leave off."""
    for path, node in walk(defaults):
        dotted = ".".join(path)
        if path and path[-1] == "enabled":
            r.check(scope, f"all-on sets {dotted}=true", get_path(all_on, path) is True)
        elif path and node in ({}, []) and path[-1] not in ("global",):
            r.check(scope, f"all-on fills {dotted}", bool(get_path(all_on, path)))
    kinds = {d["kind"] for d in docs}
    r.check(scope, f"renders {sorted(expect_kinds)}", expect_kinds <= kinds, f"missing {sorted(expect_kinds - kinds)}")
    empty = [t for t, text in rendered.items() if not text.strip()]
    r.check(scope, "every template renders something", not empty, f"empty: {empty}")


def check_schema_describes_values(r: Report, defaults: dict, schema: dict | None) -> None:
    """Every key of values.yaml has a described node in values.schema.json."""
    scope = "schema"
    if not r.check(scope, "the chart ships values.schema.json (draft-07)",
                   bool(schema) and "draft-07" in schema.get("$schema", "")):
        return
    undescribed = []

    def visit(value: Any, node: dict, path: str) -> None:
        if path and not node.get("description"):
            undescribed.append(path)
        props = node.get("properties")
        if isinstance(value, dict) and props is not None:
            for key, child in value.items():
                if key not in props:
                    undescribed.append(f"{path}.{key}".lstrip("."))
                else:
                    visit(child, props[key], f"{path}.{key}".lstrip("."))

    visit(defaults, schema, "")
    r.check(scope, "values.schema.json describes every value of values.yaml", not undescribed,
            f"undescribed: {undescribed}")
    closed = [path for path, node in walk(schema)
              if isinstance(node, dict) and node.get("properties") is not None
              and node.get("additionalProperties") is not False]
    r.check(scope, "values.schema.json refuses unknown keys in every section it lists", not closed,
            f"open: {closed}")


def check_schema_refuses(r: Report, chart: helm.Chart) -> None:
    scope = "schema"
    for what, bad in [
        ("an unknown top-level key", {"replicas": 3}),
        ("a plain database password", {"database": {"password": "hunter2"}}),
        ("a plain Anthropic key", {"anthropic": {"apiKey": "sk-ant-xxx"}}),
        ("an empty Secret name", {"redis": {"existingSecret": ""}}),
        ("a port of the wrong type", {"api": {"port": "8011"}}),
    ]:
        try:
            chart.render(values=bad, name="schema-check", namespace=NAMESPACE)
            r.check(scope, f"values.schema.json refuses {what}", False, "rendered without error")
        except helm.HelmValuesError:
            r.check(scope, f"values.schema.json refuses {what}", True)


def check_golden(r: Report, scope: str, rendered: dict[str, str], update: bool) -> None:
    """The render equals golden/<scope>.yaml (or, with --update-golden, becomes it)."""
    path = GOLDEN / f"{scope}.yaml"
    got = combined(rendered)
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
        print(f"  wrote {path.relative_to(ROOT)}")
    want = path.read_text() if path.exists() else ""
    diff = list(difflib.unified_diff(want.splitlines(), got.splitlines(),
                                     f"{path.relative_to(ROOT)}", f"rendered ({scope})", lineterm=""))
    if diff:
        print("\n".join(f"    {line}" for line in diff[:80]))
        if len(diff) > 80:
            print(f"    … {len(diff) - 80} more diff lines")
    r.check(scope, f"render equals {path.relative_to(ROOT)}", not diff,
            "the templates changed; if that is meant: bash scripts/helm-check.sh --update-golden"
            if path.exists() else "missing; make it with: bash scripts/helm-check.sh --update-golden")


# --------------------------------------------------------------------------


def run(out_dir: Path, update_golden: bool = False) -> Report:
    r = Report()
    versions = kube_versions()
    expected_rules = json.loads(EXPECTED_RBAC.read_text())["rules"]
    all_on_values = load_values_file(ALL_ON_VALUES)
    scenarios = [
        Scenario("defaults", "agent-sessions", None, golden=True),
        Scenario("all-on", "prod", all_on_values,
                 {"Deployment", "Service", "ServiceAccount", "ConfigMap", "Job", "Role", "RoleBinding",
                  "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Ingress"},
                 golden=True),
        # The API alone behind NetworkPolicy, with a release name at Helm's
        # 53-character limit and the PDB's minAvailable branch.
        Scenario("api-only", "a-release-name-that-is-exactly-fifty-three-chars-long",
                 {"runner": {"enabled": False}, "migration": {"enabled": False},
                  "networkPolicy": {"enabled": True}, "api": {"podDisruptionBudget": {"enabled": True}}}),
    ]
    print(f"chart {CHART.relative_to(ROOT)}; helm SDK {helm.helm_sdk_version()}; "
          f"kubernetes-validate {kv.__version__}, schemas for Kubernetes {', '.join(versions)}")
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
        defaults = chart.values
        for sc in scenarios:
            print(f"\n== {sc.name} (release {sc.release}, namespace {NAMESPACE})")
            before = (r.passed, len(r.failures))
            check_lint(r, sc.name, sc.values, versions)
            try:
                rendered = chart.render(values=sc.values, name=sc.release, namespace=NAMESPACE,
                                        is_install=True)
            except helm.HelmError as e:
                r.check(sc.name, "renders", False, str(e))
                continue
            write_out(out_dir, sc, rendered)
            if sc.golden:
                check_golden(r, sc.name, rendered, update_golden)
            values = chart.merge_values(sc.values)
            pairs = list(split_docs(rendered))
            docs = [d for _, d in pairs]
            notes = next((t for k, t in rendered.items() if k.endswith("NOTES.txt")), "")
            r.check(sc.name, "NOTES.txt renders", bool(notes.strip()))
            check_schemas(r, sc.name, pairs, versions)
            check_names(r, sc.name, docs)
            found = check_workloads(r, sc.name, docs, values, app_version,
                                    values["runner"]["enabled"], values["migration"]["enabled"])
            if "api" in found:
                check_api(r, sc.name, docs, found["api"])
            check_config(r, sc.name, docs, found)
            check_secrets(r, sc.name, docs, found, values,
                          "\n".join(t for k, t in rendered.items() if not k.endswith("NOTES.txt")))
            check_runner(r, sc.name, docs, found.get("runner"), values, expected_rules)
            check_security(r, sc.name, docs)
            check_network_policies(r, sc.name, docs, values, found)
            if sc.name == "all-on":
                check_all_on(r, sc.name, defaults, all_on_values, docs, rendered, sc.expect_kinds)
            passed, failed = r.passed - before[0], len(r.failures) - before[1]
            print(f"  {len(docs)} objects; {passed} checks passed, {failed} failed")
        print("\n== values.schema.json")
        before = (r.passed, len(r.failures))
        check_schema_describes_values(r, defaults, chart.schema)
        check_schema_refuses(r, chart)
        print(f"  {r.passed - before[0]} checks passed, {len(r.failures) - before[1]} failed")
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the rendered manifests (default: a new temp dir)")
    parser.add_argument("--update-golden", action="store_true",
                        help="rewrite golden/*.yaml from the current templates (then review and commit the diff)")
    args = parser.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="helm-check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run(out_dir, args.update_golden)
    print(f"\nrendered manifests: {out_dir}")
    if report.failures:
        print(f"\nhelm-check FAILED: {len(report.failures)} of {report.passed + len(report.failures)} checks")
        for failure in report.failures:
            print(f"  - {failure}")
        return 1
    print(f"helm-check OK: all {report.passed} checks hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
