#!/usr/bin/env python3
"""Helm for the chart tests, without a helm binary: PyPI helm-python-sdk (Helm's own Go code
as a library) renders and lints, PyPI kubernetes-validate checks the rendered objects against
the Kubernetes API schemas.

    helm.py lint CHART [-f VALUES]... [--set K=V]...
    helm.py render CHART [-f VALUES]... [--set K=V]... [--namespace NS] [--name RELEASE]
                   [--cluster OBJECTS.yaml] [--output yaml|json]
    helm.py validate FILE [--k8s 1.33.0]...

`render --cluster` renders as an upgrade against a stand-in API server that holds the
objects in OBJECTS.yaml, so the chart's `lookup` calls find them (how the chart keeps its
generated certificates). Errors go to stderr with exit status 1; a usage error is 2.
"""

from __future__ import annotations

import argparse
import http.server
import json
import sys
import tempfile
import threading
from typing import Any

try:
    import helm_python as helm
    import kubernetes_validate.utils as kv
    import yaml
except ImportError as e:
    sys.exit(f"{e}: install PyPI helm-python-sdk and kubernetes-validate (scripts/test.sh does)")

# Custom resources: the Kubernetes schemas do not describe them, so they are skipped by
# name, and only these. Any other kind without a schema fails validation.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
}

DEFAULT_VERSIONS = ["1.33.0", "1.34.0", "1.35.0", "1.36.0"]


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_values(files: list[str], sets: list[str]) -> dict:
    values: dict = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            values = deep_merge(values, helm.values_from_yaml(fh.read()) or {})
    for s in sets:
        values = deep_merge(values, helm.parse_set_string(s))
    return values


def template_order(path: str) -> tuple:
    # Helpers and NOTES are not objects; order the rest by file name for stable output.
    return (path.endswith("NOTES.txt"), path)


def split_docs(rendered: dict[str, str]) -> list[dict]:
    objs = []
    for path in sorted(rendered, key=template_order):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                objs.append(doc)
    return objs


class FakeApi(http.server.BaseHTTPRequestHandler):
    """Just enough of an API server for Helm's lookup: core/v1 discovery and GET of the
    objects it was given; everything else is 404 with a Status, as the real one answers."""

    objects: dict[tuple[str, str, str], dict] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0].rstrip("/")
        if path == "/api/v1":
            kinds = sorted({(o["kind"], plural(o["kind"])) for o in self.objects.values()} | {("Secret", "secrets")})
            return self.reply(200, {
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
                "resources": [{"name": p, "singularName": k.lower(), "namespaced": True, "kind": k, "verbs": ["get", "list"]}
                              for k, p in kinds],
            })
        parts = path.split("/")
        # /api/v1/namespaces/NS/PLURAL/NAME
        if len(parts) == 7 and parts[:4] == ["", "api", "v1", "namespaces"]:
            obj = self.objects.get((parts[4], parts[5], parts[6]))
            if obj is not None:
                return self.reply(200, obj)
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                         "message": f"{path} not found"})


def plural(kind: str) -> str:
    return kind.lower() + "s"


def render(args: argparse.Namespace) -> list[dict]:
    values = load_values(args.values, args.set)
    with helm.Chart.load(args.chart) as chart:
        if not args.cluster:
            rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
            return split_docs(rendered)
        with open(args.cluster, encoding="utf-8") as fh:
            existing = [o for o in yaml.safe_load_all(fh) if o]
        if any(o.get("apiVersion") != "v1" for o in existing):
            raise SystemExit("--cluster holds only core/v1 objects (what the chart looks up)")
        FakeApi.objects = {(o["metadata"]["namespace"], plural(o["kind"]), o["metadata"]["name"]): o for o in existing}
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            kubeconfig = yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{srv.server_address[1]}"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": args.namespace}}],
            })
            with helm.Config(kubeconfig_content=kubeconfig, namespace=args.namespace) as cfg:
                rendered = cfg.render(chart, values, name=args.name, namespace=args.namespace, revision=2, is_upgrade=True)
        finally:
            srv.shutdown()
        return split_docs(rendered)


def cmd_render(args: argparse.Namespace) -> int:
    objs = render(args)
    if args.output == "json":
        json.dump(objs, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        yaml.safe_dump_all(objs, sys.stdout, sort_keys=False, explicit_start=True)
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    values = load_values(args.values, args.set)
    report = helm.lint(args.chart, values, strict=True, namespace=args.namespace, kube_version=args.kube_version)
    failed = bool(report.get("errors"))
    for m in report.get("messages", []):
        severity = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m.get("severity"), "?")
        print(f"[{severity}] {m.get('path')}: {m.get('error')}", file=sys.stderr if m.get("severity", 0) >= 2 else sys.stdout)
        # strict: warnings fail too, as `helm lint --strict` does.
        failed |= m.get("severity", 0) >= 2
    for e in report.get("errors", []):
        print(f"[ERROR] {e}", file=sys.stderr)
    print(f"{report.get('total_charts_linted', 0)} chart(s) linted, {'failed' if failed else 'no failures'}")
    return 1 if failed else 0


def cmd_validate(args: argparse.Namespace) -> int:
    with open(args.file, encoding="utf-8") as fh:
        text = fh.read()
    objs = json.loads(text) if text.lstrip().startswith("[") else [o for o in yaml.safe_load_all(text) if o]
    if not objs:
        print(f"{args.file}: no objects", file=sys.stderr)
        return 1
    versions = args.k8s or DEFAULT_VERSIONS
    failures = 0
    checked = skipped = 0
    for obj in objs:
        kind = (obj.get("apiVersion"), obj.get("kind"))
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if kind in CRD_KINDS:
            skipped += 1
            continue
        for v in versions:
            try:
                kv.validate(obj, v, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                print(f"{name} against Kubernetes {v}: {path}: {e.message}", file=sys.stderr)
                failures += 1
            except kv.SchemaNotFoundError:
                print(f"{name} against Kubernetes {v}: no schema for {kind[0]} {kind[1]} (not a Kubernetes kind; "
                      "a custom resource must be listed in CRD_KINDS)", file=sys.stderr)
                failures += 1
            except kv.VersionNotSupportedError:
                print(f"kubernetes-validate {kv.__dict__.get('__version__', '')} has no schemas for Kubernetes {v}", file=sys.stderr)
                return 1
        checked += 1
    print(f"{checked} objects valid against Kubernetes {', '.join(versions)}; {skipped} custom resources skipped"
          if not failures else f"{failures} failures")
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def chart_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("chart")
        sp.add_argument("-f", "--values", action="append", default=[])
        sp.add_argument("--set", action="append", default=[])
        sp.add_argument("--namespace", default="hearth-system")

    lint = sub.add_parser("lint", help="helm lint --strict, with values.schema.json")
    chart_args(lint)
    lint.add_argument("--kube-version", default=None)
    lint.set_defaults(func=cmd_lint)

    r = sub.add_parser("render", help="helm template: the rendered objects")
    chart_args(r)
    r.add_argument("--name", default="hearth")
    r.add_argument("--cluster", help="YAML of objects that exist (for lookup); renders as an upgrade")
    r.add_argument("--output", choices=["yaml", "json"], default="yaml")
    r.set_defaults(func=cmd_render)

    v = sub.add_parser("validate", help="kubernetes-validate --strict, per version")
    v.add_argument("file")
    v.add_argument("--k8s", action="append", help=f"Kubernetes version (repeatable; default {' '.join(DEFAULT_VERSIONS)})")
    v.set_defaults(func=cmd_validate)

    args = p.parse_args()
    try:
        return args.func(args)
    except helm.HelmError as e:
        print(f"helm: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
