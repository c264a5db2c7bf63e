#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The Helm chart (`manifests/charts/hearth`), rendered by Helm's own code (PyPI
//! helm-python-sdk through `tests/chart/helm.py`) and checked against what the code does:
//! lint and values.schema.json, Kubernetes 1.33-1.36 schemas, golden objects, RBAC equal to
//! the API calls the agent and controller declare, security defaults, TLS kept across
//! upgrades, the dashboards' PromQL and metric names, and the rendered agent and controller
//! config files started with the real binaries and the chart's own certificates.
//!
//! Golden files live in `tests/chart/golden/`; after an intended change to the chart,
//! regenerate them with `HEARTH_UPDATE_GOLDEN=1 cargo nextest run -p hearth-tests --test chart`
//! and review the diff.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use hearth_tests::*;
use serde_json::{Value, json};

const NS: &str = "hearth-system";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn chart() -> PathBuf {
    root().join("manifests/charts/hearth")
}

fn ci_values() -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

/// `tests/chart/helm.py ARGS`: Ok(stdout) on success, Err(stderr + stdout) otherwise.
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new("python3")
        .arg(root().join("tests/chart/helm.py"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running python3 tests/chart/helm.py: {e} (python3 is installed by scripts/test.sh)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // A missing module is the environment, not the chart: say so instead of blaming the chart.
    assert!(!stderr.contains("install PyPI helm-python-sdk"), "{stderr}");
    if out.status.success() { Ok(stdout) } else { Err(format!("{stderr}{stdout}")) }
}

/// Renders the chart with `values` files and `--set` expressions; `cluster` holds objects a
/// `lookup` finds (then it renders as an upgrade).
fn render_with(values: &[&Path], sets: &[&str], cluster: Option<&Path>) -> Result<Vec<Value>, String> {
    let chart = chart();
    let mut args: Vec<String> =
        vec!["render".into(), chart.display().to_string(), "--namespace".into(), NS.into(), "--output".into(), "json".into()];
    for v in values {
        args.extend(["-f".into(), v.display().to_string()]);
    }
    for s in sets {
        args.extend(["--set".into(), (*s).to_owned()]);
    }
    if let Some(c) = cluster {
        args.extend(["--cluster".into(), c.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = helm(&args)?;
    Ok(serde_json::from_str(&out).unwrap_or_else(|e| panic!("helm.py render printed no JSON list: {e}\n{out}")))
}

fn render(values: &[&Path], sets: &[&str]) -> Vec<Value> {
    render_with(values, sets, None).unwrap_or_else(|e| panic!("rendering with {values:?} {sets:?} failed:\n{e}"))
}

fn minimal() -> Vec<Value> {
    render(&[&chart().join("ci/minimal-values.yaml")], &[])
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered; got {:?}", names(objs)))
}

fn all<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn names(objs: &[Value]) -> Vec<String> {
    objs.iter().map(|o| format!("{}/{}", o["kind"].as_str().unwrap_or("?"), o["metadata"]["name"].as_str().unwrap_or("?"))).collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

fn config_map_file(objs: &[Value], name: &str, key: &str) -> serde_yaml_ng::Value {
    let text = find(objs, "ConfigMap", name)["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap {name} has no {key}"));
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("ConfigMap {name} {key} is not YAML: {e}\n{text}"))
}

#[test]
fn chart_lints_and_every_ci_values_file_renders_objects_valid_for_kubernetes_1_33_to_1_36() {
    let dir = tempfile::tempdir().unwrap();
    let values = ci_values();
    for required in
        ["minimal-values.yaml", "gpu-values.yaml", "inferentia-values.yaml", "certmanager-values.yaml", "privileged-values.yaml"]
    {
        assert!(values.iter().any(|p| p.ends_with(required)), "ci/{required} missing");
    }
    let chart = chart().display().to_string();
    for v in &values {
        let f = v.display().to_string();
        helm(&["lint", &chart, "-f", &f, "--namespace", NS]).unwrap_or_else(|e| panic!("helm lint --strict -f {f}:\n{e}"));
        let objs = render(&[v], &[]);
        for (kind, name) in [("DaemonSet", "hearth-agent"), ("Deployment", "hearth-controller"), ("ClusterRole", "hearth-agent")] {
            find(&objs, kind, name);
        }
        let file = dir.path().join(format!("{}.json", v.file_stem().unwrap().to_string_lossy()));
        std::fs::write(&file, serde_json::to_string(&objs).unwrap()).unwrap();
        let out =
            helm(&["validate", &file.display().to_string(), "--k8s", "1.33.0", "--k8s", "1.34.0", "--k8s", "1.35.0", "--k8s", "1.36.0"])
                .unwrap_or_else(|e| panic!("objects from {f} are not valid Kubernetes objects:\n{e}"));
        assert!(out.contains("valid against Kubernetes 1.33.0, 1.34.0, 1.35.0, 1.36.0"), "{out}");
    }
}

#[test]
fn validation_catches_a_bad_object() {
    // The validator itself: a DaemonSet with a field Kubernetes does not have must fail.
    let dir = tempfile::tempdir().unwrap();
    let mut objs = minimal();
    let ds = objs.iter_mut().find(|o| o["kind"] == "DaemonSet").unwrap();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = json!(true);
    let file = dir.path().join("bad.json");
    std::fs::write(&file, serde_json::to_string(&objs).unwrap()).unwrap();
    let err = helm(&["validate", &file.display().to_string()]).expect_err("a misspelt field must fail strict validation");
    assert!(err.contains("DaemonSet/hearth-agent") && err.contains("privilegd"), "{err}");
}

#[test]
fn values_schema_and_chart_checks_reject_bad_values_naming_the_field() {
    let chart = chart().display().to_string();
    let cases: &[(&str, &[&str])] = &[
        ("agent.privileged=yes", &["/agent/privileged", "want boolean"]),
        ("controller.replicas=-1", &["/controller/replicas", "minimum"]),
        ("image.pullPolicy=Sometimes", &["/image/pullPolicy", "'Always', 'IfNotPresent', 'Never'"]),
        ("bogus=1", &["additional properties 'bogus' not allowed"]),
        ("nvml.mode=cuda", &["/nvml/mode", "'runtimeClass', 'hostPath', 'none'"]),
        ("agent.config.cache.capacity=lots", &["/agent/config/cache/capacity", "'lots' does not match pattern"]),
        ("agent.config.typo=1", &["/agent/config", "'typo' not allowed"]),
        ("controller.config.leader_election.lease_duration=soon", &["/controller/config/leader_election/lease_duration"]),
        ("agent.updateStrategy.maxUnavailable=ten", &["/agent/updateStrategy/maxUnavailable"]),
        ("tls.agent.dnsNames={Node_1}", &["/tls/agent/dnsNames/0"]),
        ("agent.images.connections=-1", &["/agent/images/connections", "minimum"]),
        ("agent.images.keep[0]=", &["/agent/images/keep/0", "minLength"]),
        ("agent.images.chunkSize=big", &["/agent/images/chunkSize", "'big' does not match pattern"]),
        ("agent.images.releaseAfter=later", &["/agent/images/releaseAfter", "'later' does not match pattern"]),
        ("agent.images.pullSecret=Registry_Creds", &["/agent/images/pullSecret", "'Registry_Creds' does not match pattern"]),
        ("agent.images.insecureRegistries={http://registry:5000}", &["/agent/images/insecureRegistries/0"]),
        ("agent.images.keepWarm=1", &["/agent/images", "'keepWarm' not allowed"]),
        ("agent.images.mirror=maybe", &["/agent/images/mirror"]),
        ("containerd.hostsDir=certs.d", &["/containerd/hostsDir", "does not match pattern"]),
        ("agent.config.images.connections=300", &["/agent/config/images/connections", "maximum"]),
        // Checks the schema cannot express, made by the templates.
        ("nvml.mode=hostPath", &["nvml.mode hostPath needs agent.privileged: true"]),
        (
            "controller.config.leader_election.enabled=false",
            &["controller.replicas is 2 but controller.config.leader_election.enabled is false"],
        ),
        ("controller.config.leader_election.namespace=other", &["leader_election.namespace \"other\"", "only the release namespace"]),
        (
            "containerd.enabled=false,agent.images.keep[0]=nginx:1.27",
            &["agent.images.keep and agent.images.pullSecret need containerd.enabled: true"],
        ),
    ];
    for (set, wanted) in cases {
        let err = render_with(&[], &[set], None).expect_err(&format!("--set {set} rendered"));
        for w in *wanted {
            assert!(err.contains(w), "--set {set}: expected {w:?} in the error:\n{err}");
        }
        // lint checks the schema too (Helm's lint passes over the templates' `fail`).
        if !wanted[0].contains(' ') || wanted[0].starts_with("additional") {
            let lint = helm(&["lint", &chart, "--set", set]).expect_err(&format!("lint --set {set} passed"));
            assert!(lint.contains(wanted[0]), "lint --set {set}: expected {:?}:\n{lint}", wanted[0]);
        }
    }
    // The same keys with good values pass: the errors above are about the values.
    render(
        &[],
        &[
            "agent.privileged=true",
            "controller.replicas=1",
            "image.pullPolicy=Always",
            "agent.config.cache.capacity=500Gi",
            "agent.images.connections=0",
            "agent.images.keep[0]=nginx:1.27",
            "agent.images.chunkSize=16Mi",
            "agent.images.pullSecret=registry-creds",
            "agent.images.insecureRegistries={registry.local:5000,[fd00::1]:5000}",
        ],
    );
}

fn mount<'a>(workload: &'a Value, container_name: &str, volume: &str) -> Option<&'a Value> {
    container(workload, container_name)["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == volume)
}

fn volume<'a>(workload: &'a Value, name: &str) -> Option<&'a Value> {
    workload["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name)
}

#[test]
fn agent_images_config_points_into_the_agent_mounts() {
    let y = |v: Value| serde_yaml_ng::to_value(v).unwrap();
    // Defaults: the socket inside the mounted socket directory, `enabled` left to the agent
    // (on when the socket is there), no credentials, the documented defaults.
    let objs = minimal();
    let ds = find(&objs, "DaemonSet", "hearth-agent");
    let images = config_map_file(&objs, "hearth-agent", "agent.yaml")["images"].clone();
    let dir = mount(ds, "agent", "containerd").expect("containerd socket dir mounted")["mountPath"].as_str().unwrap().to_owned();
    assert_eq!(volume(ds, "containerd").unwrap()["hostPath"]["path"], "/run/containerd");
    assert_eq!(images["containerd_socket"].as_str(), Some(format!("{dir}/containerd.sock").as_str()));
    assert_eq!(images.get("enabled"), None, "the chart must not force images on: {images:?}");
    assert_eq!(images.get("auth_file"), None);
    assert_eq!(images["keep"], y(json!([])));
    assert_eq!(images["connections"].as_u64(), Some(16));
    assert_eq!(images["chunk_size"].as_str(), Some("8Mi"));
    assert_eq!(images["check_interval"].as_str(), Some("1m"));
    assert_eq!(images["release_after"].as_str(), Some("1h"));
    assert!(volume(ds, "pull-secret").is_none() && mount(ds, "agent", "pull-secret").is_none());
    // The image mirror: containerd's host directory mounted read-write at its host path (so
    // it matches containerd's config_path), the agent listening on the pod's addresses and
    // told its pod IP, which is what containerd dials.
    assert_eq!(images["mirror"].as_bool(), Some(true));
    assert_eq!(images["hosts_dir"].as_str(), Some("/etc/containerd/certs.d"));
    assert_eq!(images["mirror_listen"].as_str(), Some("0.0.0.0:0"));
    assert_eq!(volume(ds, "containerd-hosts").unwrap()["hostPath"]["path"], "/etc/containerd/certs.d");
    let hm = mount(ds, "agent", "containerd-hosts").expect("host dir mounted");
    assert_eq!(hm["mountPath"], "/etc/containerd/certs.d");
    assert_ne!(hm["readOnly"], true, "the agent writes hosts.toml files there");
    let env = container(ds, "agent")["env"].as_array().unwrap();
    let pod_ip = env.iter().find(|e| e["name"] == "POD_IP").expect("POD_IP in the agent's env");
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");

    // Mirror off: no host directory, no listener settings; k3s's directory moves both paths.
    let objs = render(&[], &["agent.images.mirror=false"]);
    let ds = find(&objs, "DaemonSet", "hearth-agent");
    let images = config_map_file(&objs, "hearth-agent", "agent.yaml")["images"].clone();
    assert_eq!(images["mirror"].as_bool(), Some(false));
    assert!(images.get("hosts_dir").is_none() && volume(ds, "containerd-hosts").is_none());
    let k3s = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d";
    let objs = render(&[], &[&format!("containerd.hostsDir={k3s}")]);
    let ds = find(&objs, "DaemonSet", "hearth-agent");
    assert_eq!(volume(ds, "containerd-hosts").unwrap()["hostPath"]["path"], k3s);
    assert_eq!(mount(ds, "agent", "containerd-hosts").unwrap()["mountPath"], k3s);
    assert_eq!(config_map_file(&objs, "hearth-agent", "agent.yaml")["images"]["hosts_dir"].as_str(), Some(k3s));

    // A keep list and a pull secret: the auth file is the Secret's .dockerconfigjson where
    // the DaemonSet mounts it, read-only; another socket directory moves only the hostPath.
    let objs = render(&[&chart().join("ci/gpu-values.yaml")], &["containerd.socketDir=/run/k3s/containerd"]);
    let ds = find(&objs, "DaemonSet", "hearth-agent");
    let images = config_map_file(&objs, "hearth-agent", "agent.yaml")["images"].clone();
    assert_eq!(images["keep"], y(json!(["vllm/vllm-openai:v0.11.0"])));
    assert_eq!(volume(ds, "containerd").unwrap()["hostPath"]["path"], "/run/k3s/containerd");
    assert_eq!(images["containerd_socket"].as_str(), Some(format!("{dir}/containerd.sock").as_str()));
    let secret = volume(ds, "pull-secret").expect("pull secret volume");
    assert_eq!(secret["secret"]["secretName"], "registry-credentials");
    let items = secret["secret"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["key"], ".dockerconfigjson", "the key of a kubernetes.io/dockerconfigjson Secret");
    let m = mount(ds, "agent", "pull-secret").expect("pull secret mounted");
    assert_eq!(m["readOnly"], true);
    let auth = format!("{}/{}", m["mountPath"].as_str().unwrap(), items[0]["path"].as_str().unwrap());
    assert_eq!(images["auth_file"].as_str(), Some(auth.as_str()));

    // agent.config.images wins key by key over agent.images.
    let objs = render(&[], &["agent.images.connections=4", "agent.config.images.connections=0", "agent.config.images.namespace=k8s.io"]);
    let images = config_map_file(&objs, "hearth-agent", "agent.yaml")["images"].clone();
    assert_eq!(images["connections"].as_u64(), Some(0));
    assert_eq!(images["namespace"].as_str(), Some("k8s.io"));
    assert_eq!(images["chunk_size"].as_str(), Some("8Mi"));

    // Without the socket mount the agent is told images are off, rather than finding no socket.
    let objs = render(&[], &["containerd.enabled=false"]);
    let ds = find(&objs, "DaemonSet", "hearth-agent");
    assert!(volume(ds, "containerd").is_none() && mount(ds, "agent", "containerd").is_none());
    let images = config_map_file(&objs, "hearth-agent", "agent.yaml")["images"].clone();
    assert_eq!(images["enabled"].as_bool(), Some(false));
}

/// Volatile fields out: generated material and checksums of it.
fn scrub(mut o: Value) -> Value {
    if let Some(a) = o["spec"]["template"]["metadata"]["annotations"].as_object_mut()
        && a.contains_key("checksum/config")
    {
        a.insert("checksum/config".into(), json!("<sha256 of the config>"));
    }
    o
}

#[test]
fn key_objects_match_their_golden_files() {
    let objs = minimal();
    let golden = root().join("tests/chart/golden");
    let update = std::env::var_os("HEARTH_UPDATE_GOLDEN").is_some();
    let picks = [
        ("DaemonSet", "hearth-agent"),
        ("Deployment", "hearth-controller"),
        ("ClusterRole", "hearth-agent"),
        ("Role", "hearth-controller"),
        ("Service", "hearth-controller"),
        ("Service", "hearth-controller-headless"),
        ("Service", "hearth-agent"),
        ("ConfigMap", "hearth-agent"),
        ("ConfigMap", "hearth-controller"),
        ("PodDisruptionBudget", "hearth-controller"),
    ];
    let mut stale = Vec::new();
    for (kind, name) in picks {
        let got = serde_yaml_ng::to_string(&scrub(find(&objs, kind, name).clone())).unwrap();
        let file = golden.join(format!("{}-{name}.yaml", kind.to_lowercase()));
        if update {
            std::fs::create_dir_all(&golden).unwrap();
            std::fs::write(&file, &got).unwrap();
            continue;
        }
        let want =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}; create it with HEARTH_UPDATE_GOLDEN=1", file.display()));
        if want != got {
            let first = want.lines().zip(got.lines()).position(|(a, b)| a != b).unwrap_or(want.lines().count().min(got.lines().count()));
            stale.push(format!(
                "{kind}/{name} differs from {} at line {}:\n  golden:   {:?}\n  rendered: {:?}",
                file.display(),
                first + 1,
                want.lines().nth(first).unwrap_or("<end>"),
                got.lines().nth(first).unwrap_or("<end>")
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "{}\n(if the change is intended: HEARTH_UPDATE_GOLDEN=1 cargo nextest run -p hearth-tests --test chart)",
        stale.join("\n")
    );
}

type Rule = (String, String, String);

fn code_rules(rules: &[(&str, &str, &[&str])]) -> BTreeSet<Rule> {
    rules.iter().flat_map(|(g, r, verbs)| verbs.iter().map(move |v| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))).collect()
}

fn chart_rules(role: &Value) -> BTreeSet<Rule> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule.get("nonResourceURLs").is_none(), "non-resource rule in {}: {rule}", role["metadata"]["name"]);
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    assert!(g != "*" && r != "*" && v != "*", "wildcard in {}: {rule}", role["metadata"]["name"]);
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_the_api_calls_the_code_makes() {
    for v in ci_values() {
        let objs = render(&[&v], &[]);
        let agent = chart_rules(find(&objs, "ClusterRole", "hearth-agent"));
        assert_eq!(
            agent,
            code_rules(hearth_agent::kube::API_RULES),
            "agent ClusterRole vs hearth_agent::kube::API_RULES ({})",
            v.display()
        );
        let pods = find(&objs, "Role", "hearth-agent-runtimes");
        assert_eq!(pods["metadata"]["namespace"], NS);
        assert_eq!(
            chart_rules(pods),
            code_rules(hearth_agent::kube::POD_DRIVER_RULES),
            "agent runtimes Role vs hearth_agent::kube::POD_DRIVER_RULES ({})",
            v.display()
        );
        let rb = find(&objs, "RoleBinding", "hearth-agent-runtimes");
        assert_eq!(rb["subjects"], json!([{"kind": "ServiceAccount", "name": "hearth-agent", "namespace": NS}]));
        let cfg = config_map_file(&objs, "hearth-agent", "agent.yaml");
        assert_eq!(cfg["runtimes"]["pod"]["namespace"].as_str(), Some(NS), "the pods go where the Role allows");
        let ctl = find(&objs, "Role", "hearth-controller");
        assert_eq!(ctl["metadata"]["namespace"], NS);
        assert_eq!(
            chart_rules(ctl),
            code_rules(hearth_controller::leader::API_RULES),
            "controller Role vs hearth_controller::leader::API_RULES ({})",
            v.display()
        );
        // The controller gets no cluster-wide role, and each binding names its own account.
        assert_eq!(all(&objs, "ClusterRole").len(), 1, "{:?}", names(&objs));
        let crb = find(&objs, "ClusterRoleBinding", "hearth-agent");
        assert_eq!(crb["subjects"], json!([{"kind": "ServiceAccount", "name": "hearth-agent", "namespace": NS}]));
        let rb = find(&objs, "RoleBinding", "hearth-controller");
        assert_eq!(rb["subjects"], json!([{"kind": "ServiceAccount", "name": "hearth-controller", "namespace": NS}]));
        assert_eq!(find(&objs, "DaemonSet", "hearth-agent")["spec"]["template"]["spec"]["serviceAccountName"], "hearth-agent");
        assert_eq!(find(&objs, "Deployment", "hearth-controller")["spec"]["template"]["spec"]["serviceAccountName"], "hearth-controller");
    }
    // Get and update of the Lease are limited to this release's Lease, which the controller is told to use.
    let objs = minimal();
    let role = find(&objs, "Role", "hearth-controller");
    let lease_rule = role["rules"].as_array().unwrap().iter().find(|r| strs(&r["verbs"]).contains(&"update".to_owned())).unwrap();
    assert_eq!(strs(&lease_rule["resourceNames"]), vec!["hearth-controller"]);
    let cfg = config_map_file(&objs, "hearth-controller", "controller.yaml");
    assert_eq!(cfg["leader_election"]["lease_name"].as_str(), Some("hearth-controller"));
}

#[test]
fn agent_runs_with_listed_capabilities_unless_privileged() {
    let objs = minimal();
    let ds = find(&objs, "DaemonSet", "hearth-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let sc = &container(ds, "agent")["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"]);
    let caps: BTreeSet<_> = strs(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(caps, ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"].map(String::from).into(), "no SYS_ADMIN by default");
    assert_eq!(pod["securityContext"]["runAsUser"], 0);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["hostNetwork"], false);
    assert!(pod.get("hostPID").is_none() && pod.get("hostIPC").is_none());
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(ds["spec"]["updateStrategy"], json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}));

    // Host paths: exactly these, the cgroup tree read-only, no /sys/fs/bpf (nothing is pinned).
    let vols: BTreeMap<String, String> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v["hostPath"]["path"].as_str()?.to_owned())))
        .collect();
    let want: BTreeMap<String, String> = [
        ("cache", "/var/lib/hearth"),
        ("pod-resources", "/var/lib/kubelet/pod-resources"),
        ("cgroup", "/sys/fs/cgroup"),
        ("containerd", "/run/containerd"),
        ("containerd-hosts", "/etc/containerd/certs.d"),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .into();
    assert_eq!(vols, want);
    let mounts = container(ds, "agent")["volumeMounts"].as_array().unwrap();
    for ro in ["cgroup", "containerd", "config", "tls"] {
        assert!(mounts.iter().any(|m| m["name"] == ro && m["readOnly"] == true), "{ro} not mounted read-only: {mounts:?}");
    }
    // runtimeClass NVML by default.
    assert_eq!(pod["runtimeClassName"], "nvidia");
    let env = &container(ds, "agent")["env"];
    assert!(env.as_array().unwrap().contains(&json!({"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"})));
    assert!(env.as_array().unwrap().contains(&json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})));
    let c = container(ds, "agent");
    assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "metrics"}));
    assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "metrics"}));
    assert_eq!(c["ports"], json!([{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]));
    assert_eq!(strs(&c["args"])[..3], ["agent", "--config", "/etc/hearth/agent.yaml"]);

    // The switch: privileged, no capability list, and NVML from the host's driver directory.
    let objs = render(&[&chart().join("ci/privileged-values.yaml")], &[]);
    let ds = find(&objs, "DaemonSet", "hearth-agent");
    let sc = &container(ds, "agent")["securityContext"];
    assert_eq!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], true);
    assert!(sc.get("capabilities").is_none(), "{sc}");
    assert!(ds["spec"]["template"]["spec"].get("runtimeClassName").is_none());
    let lib = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "nvidia-lib").unwrap();
    assert_eq!(lib["hostPath"]["path"], "/run/nvidia/driver/usr/lib64");
    let cfg = config_map_file(&objs, "hearth-agent", "agent.yaml");
    assert_eq!(cfg["devices"]["nvml_library"].as_str(), Some("/host/nvidia/lib/libnvidia-ml.so.1"));
    assert_eq!(cfg["devices"]["backend"].as_str(), Some("nvml"));
}

#[test]
fn agent_lands_on_gpu_and_neuron_nodes_by_default() {
    let objs = minimal();
    let pod = &find(&objs, "DaemonSet", "hearth-agent")["spec"]["template"]["spec"];
    let tolerated: BTreeSet<(String, String)> = pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert!(t.get("effect").is_none(), "a toleration limited to one effect: {t}");
            (t["key"].as_str().unwrap().to_owned(), t["operator"].as_str().unwrap().to_owned())
        })
        .collect();
    for key in ["nvidia.com/gpu", "aws.amazon.com/neuron", "hearth.dev/accelerators-unhealthy"] {
        assert!(tolerated.contains(&(key.to_owned(), "Exists".to_owned())), "{key} not tolerated: {tolerated:?}");
    }
    let terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"].as_array().unwrap();
    // A node matches if any term matches: each well-known label is its own term.
    let matches = |labels: &[(&str, &str)]| {
        terms.iter().any(|t| {
            t["matchExpressions"].as_array().unwrap().iter().all(|e| {
                let v = labels.iter().find(|(k, _)| e["key"] == *k).map(|(_, v)| *v);
                e["operator"] == "In" && v.is_some_and(|v| strs(&e["values"]).iter().any(|x| x == v))
            })
        })
    };
    assert!(matches(&[("nvidia.com/gpu.present", "true")]));
    assert!(matches(&[("feature.node.kubernetes.io/pci-10de.present", "true")]));
    assert!(matches(&[("node.kubernetes.io/instance-type", "inf2.xlarge")]));
    assert!(matches(&[("node.kubernetes.io/instance-type", "trn1.32xlarge")]));
    assert!(!matches(&[("node.kubernetes.io/instance-type", "m5.large")]), "a CPU node matched");
    assert!(!matches(&[]), "a node without labels matched");
}

#[test]
fn controller_is_two_replicas_behind_services_that_select_the_leader() {
    let objs = minimal();
    let d = find(&objs, "Deployment", "hearth-controller");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    let sc = &container(d, "controller")["securityContext"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"]);
    assert!(sc["capabilities"].get("add").is_none());
    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    let env = container(d, "controller")["env"].as_array().unwrap().clone();
    for (name, path) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
        assert!(env.contains(&json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})), "{name} missing: {env:?}");
    }
    let c = container(d, "controller");
    assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "metrics"}));
    assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "metrics"}));
    assert_eq!(strs(&c["args"])[..3], ["run", "--config", "/etc/hearth/controller.yaml"]);

    let pdb = find(&objs, "PodDisruptionBudget", "hearth-controller");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let selector = &d["spec"]["selector"]["matchLabels"];
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    // The leader label changes at run time: never part of the Deployment's own selector.
    assert!(selector.get("hearth.dev/leader").is_none());
    assert_eq!(d["spec"]["template"]["metadata"]["labels"]["hearth.dev/leader"], "false");

    let leader = find(&objs, "Service", "hearth-controller");
    assert_eq!(leader["spec"]["selector"]["hearth.dev/leader"], "true");
    let ports: BTreeMap<String, u64> = leader["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports, [("grpc".to_owned(), 7443), ("extender".to_owned(), 7444)].into());
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&leader["spec"]["selector"][k], v, "leader Service selector misses {k}");
    }
    let headless = find(&objs, "Service", "hearth-controller-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(&headless["spec"]["selector"], selector, "the metrics Service selects every replica");
    assert_eq!(headless["spec"]["ports"][0]["port"], 9401);
    let cfg = config_map_file(&objs, "hearth-controller", "controller.yaml");
    assert_eq!(cfg["leader_election"]["enabled"].as_bool(), Some(true));
    assert_eq!(cfg["leader_election"]["label_pod"].as_bool(), Some(true));

    // One replica: no PodDisruptionBudget (minAvailable 1 would block every drain).
    let one = render(&[&chart().join("ci/privileged-values.yaml")], &[]);
    assert!(all(&one, "PodDisruptionBudget").is_empty(), "{:?}", names(&one));
    // Without the leader label nothing would carry it: the Services must not select on it.
    let unlabelled = render(&[], &["controller.config.leader_election.label_pod=false"]);
    assert!(find(&unlabelled, "Service", "hearth-controller")["spec"]["selector"].get("hearth.dev/leader").is_none());
}

fn secrets(objs: &[Value]) -> BTreeMap<String, Value> {
    all(objs, "Secret").into_iter().map(|s| (s["metadata"]["name"].as_str().unwrap().to_owned(), s["data"].clone())).collect()
}

fn pem_cert(secret: &Value) -> rustls::pki_types::CertificateDer<'static> {
    let pem = base64::engine::general_purpose::STANDARD.decode(secret["tls.crt"].as_str().unwrap()).unwrap();
    rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap()
}

#[test]
fn generated_tls_is_kept_across_upgrades_and_reissued_only_when_names_change() {
    let dir = tempfile::tempdir().unwrap();
    let first = minimal();
    let s1 = secrets(&first);
    assert_eq!(s1.keys().cloned().collect::<Vec<_>>(), ["hearth-agent-tls", "hearth-ca", "hearth-controller-tls"]);
    for (name, data) in &s1 {
        assert_eq!(data["ca.crt"], s1["hearth-ca"]["tls.crt"], "{name} carries another CA");
    }
    // Control: without the cluster's Secrets every render makes a new CA.
    assert_ne!(secrets(&minimal())["hearth-ca"], s1["hearth-ca"]);

    let cluster = dir.path().join("cluster.yaml");
    let docs: Vec<String> = all(&first, "Secret").into_iter().map(|s| serde_json::to_string(s).unwrap()).collect();
    std::fs::write(&cluster, docs.join("\n---\n")).unwrap();
    let upgraded = render_with(&[], &[], Some(&cluster)).unwrap();
    assert_eq!(secrets(&upgraded), s1, "an upgrade changed the certificates");

    // A new controller name: only the controller certificate is issued again, by the same CA.
    let renamed = render_with(&[], &["tls.controller.extraDNSNames={hearth.example.com}"], Some(&cluster)).unwrap();
    let s3 = secrets(&renamed);
    assert_eq!(s3["hearth-ca"], s1["hearth-ca"]);
    assert_eq!(s3["hearth-agent-tls"], s1["hearth-agent-tls"]);
    assert_ne!(s3["hearth-controller-tls"]["tls.crt"], s1["hearth-controller-tls"]["tls.crt"]);
    assert_eq!(s3["hearth-controller-tls"]["ca.crt"], s1["hearth-ca"]["tls.crt"]);

    // The names: the Service's four forms (and the extra one), the agents' shared identity.
    use hearth_proto::transport::check_node_identity;
    let ctl = pem_cert(&s3["hearth-controller-tls"]);
    for n in [
        "hearth-controller",
        "hearth-controller.hearth-system",
        "hearth-controller.hearth-system.svc",
        "hearth-controller.hearth-system.svc.cluster.local",
        "hearth.example.com",
    ] {
        check_node_identity(&ctl, n).unwrap_or_else(|e| panic!("controller certificate not valid for {n}: {e}"));
    }
    assert!(check_node_identity(&ctl, "evil.example.com").is_err());
    let agent = pem_cert(&s1["hearth-agent-tls"]);
    check_node_identity(&agent, "hearth-agent").unwrap();
    assert!(check_node_identity(&agent, "operator").is_err(), "the agent certificate must not carry a role identity");
}

#[test]
fn cert_manager_mode_issues_the_same_secrets_and_existing_secrets_are_used_as_given() {
    let objs = render(&[&chart().join("ci/certmanager-values.yaml")], &[]);
    assert!(all(&objs, "Secret").is_empty(), "cert-manager mode rendered Secrets: {:?}", names(&objs));
    let certs: BTreeMap<String, &Value> =
        all(&objs, "Certificate").into_iter().map(|c| (c["spec"]["secretName"].as_str().unwrap().to_owned(), c)).collect();
    assert_eq!(
        certs.keys().cloned().collect::<Vec<_>>(),
        ["hearth-agent-tls", "hearth-ca", "hearth-controller-tls", "hearth-operator-tls"]
    );
    assert_eq!(certs["hearth-ca"]["spec"]["isCA"], true);
    assert!(strs(&certs["hearth-controller-tls"]["spec"]["dnsNames"]).contains(&"hearth-controller.hearth-system.svc".to_owned()));
    assert!(strs(&certs["hearth-controller-tls"]["spec"]["usages"]).contains(&"server auth".to_owned()));
    assert!(strs(&certs["hearth-agent-tls"]["spec"]["usages"]).contains(&"client auth".to_owned()));
    assert_eq!(strs(&certs["hearth-operator-tls"]["spec"]["dnsNames"]), vec!["operator"]);
    let pm: Vec<_> = all(&objs, "PodMonitor").into_iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(pm, ["hearth-agent", "hearth-controller"]);
    let cfg = config_map_file(&objs, "hearth-controller", "controller.yaml");
    assert_eq!(cfg["auth"]["operators"], serde_yaml_ng::to_value(["operator"]).unwrap());

    let objs = render(&[], &["tls.existingSecret.controller=ctl-certs", "tls.existingSecret.agent=agent-certs"]);
    assert!(all(&objs, "Secret").is_empty() && all(&objs, "Certificate").is_empty(), "{:?}", names(&objs));
    let secret_of = |kind: &str, name: &str| {
        find(&objs, kind, name)["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap()["secret"]["secretName"].clone()
    };
    assert_eq!(secret_of("DaemonSet", "hearth-agent"), "agent-certs");
    assert_eq!(secret_of("Deployment", "hearth-controller"), "ctl-certs");
}

/// Every metric a dashboard queries, with the file it is in.
fn dashboard_metrics() -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(chart().join("dashboards")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let vars = strs(&json!(d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].clone()).collect::<Vec<_>>()));
        assert!(vars.contains(&"datasource".to_owned()), "{}: no datasource variable", f.display());
        assert!(d["uid"].as_str().is_some_and(|u| u.starts_with("hearth-")), "{}: uid", f.display());
        for p in d["panels"].as_array().unwrap() {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}: panel {} ignores the datasource variable", f.display(), p["title"]);
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap().to_owned();
                let metrics: Vec<String> = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("hearth_") || w.starts_with("DCGM_FI_"))
                    .map(str::to_owned)
                    .collect();
                assert!(!metrics.is_empty(), "{}: {expr:?} queries no Hearth metric", f.display());
                out.push((f.file_name().unwrap().to_string_lossy().into_owned(), expr, metrics));
            }
        }
    }
    out
}

#[test]
fn dashboards_are_valid_promql_and_render_into_labelled_config_maps() {
    let dir = tempfile::tempdir().unwrap();
    let exprs = dashboard_metrics();
    let files: BTreeSet<_> = exprs.iter().map(|(f, _, _)| f.clone()).collect();
    assert_eq!(files, ["cache.json", "controller.json", "gpu.json", "network.json", "runtimes.json"].map(String::from).into());
    // promtool parses each expression as a recording rule, with Grafana's variables filled in.
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e, _))| {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$node", ".*")
                .replace("$instance", ".*")
                .replace("$namespace", ".*")
                .replace("$model", ".*");
            assert!(!e.contains('$'), "an unknown Grafana variable in {e:?}");
            json!({"record": format!("hearth:dashboard:{i}"), "expr": e})
        })
        .collect();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_json::to_string(&json!({"groups": [{"name": "dashboards", "rules": rules}]})).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (apt prometheus; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let objs = render(&[], &["dashboards.enabled=true", "dashboards.annotations.grafana_folder=Hearth"]);
    let cms: Vec<_> =
        all(&objs, "ConfigMap").into_iter().filter(|c| c["metadata"]["name"].as_str().unwrap().starts_with("hearth-dashboard-")).collect();
    assert_eq!(cms.len(), 5, "{:?}", names(&objs));
    for cm in cms {
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Hearth");
        let (_, json_text) = cm["data"].as_object().unwrap().iter().next().unwrap();
        serde_json::from_str::<Value>(json_text.as_str().unwrap()).expect("dashboard JSON survives the ConfigMap");
    }
    assert!(all(&minimal(), "ConfigMap").len() == 2, "dashboards rendered while disabled");
}

// ---- The rendered configs, run by the real binaries ----

/// Writes `secret`'s ca.crt, tls.crt and tls.key into `dir`; returns their paths.
fn write_secret(dir: &Path, secret: &Value) -> Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        let b64 = secret["data"][key].as_str().with_context(|| format!("Secret {} has no {key}", secret["metadata"]["name"]))?;
        let p = dir.join(key);
        std::fs::write(&p, base64::engine::general_purpose::STANDARD.decode(b64)?)?;
        paths.push(p);
    }
    Ok((paths[0].clone(), paths[1].clone(), paths[2].clone()))
}

/// The certificates the chart deploys: its own Secrets, or (cert-manager mode) ones issued
/// by a test CA for exactly the names in its Certificate objects.
fn tls_material(objs: &[Value], dir: &Path) -> Result<[(PathBuf, PathBuf, PathBuf); 2]> {
    if !all(objs, "Secret").is_empty() {
        return Ok([
            write_secret(&dir.join("controller"), find(objs, "Secret", "hearth-controller-tls"))?,
            write_secret(&dir.join("agent"), find(objs, "Secret", "hearth-agent-tls"))?,
        ]);
    }
    use hearth_service::pki::{CertAuthority, LeafSpec, Usage};
    let ca = CertAuthority::new("chart test CA")?;
    let mut out = Vec::new();
    for (name, usage) in [("controller", Usage::Server), ("agent", Usage::Client)] {
        let cert = find(objs, "Certificate", &format!("hearth-{name}"));
        let dns = strs(&cert["spec"]["dnsNames"]);
        let refs: Vec<&str> = dns.iter().map(String::as_str).collect();
        let issued = ca.issue(&LeafSpec::new(&dns[0], &refs, usage, Duration::from_secs(3600)))?;
        let d = dir.join(name);
        let files = hearth_service::pki::write_bundle(&d, name, ca.cert_pem(), &issued)?;
        out.push((files.ca, files.cert, files.key));
    }
    Ok([out[0].clone(), out[1].clone()])
}

fn set(doc: &mut serde_yaml_ng::Value, path: &[&str], v: serde_yaml_ng::Value) {
    let mut cur = doc;
    for k in &path[..path.len() - 1] {
        let m = cur.as_mapping_mut().unwrap();
        cur = m.entry((*k).into()).or_insert_with(|| serde_yaml_ng::Value::Mapping(Default::default()));
    }
    cur.as_mapping_mut().unwrap().insert(path[path.len() - 1].into(), v);
}

fn s(v: impl AsRef<Path>) -> serde_yaml_ng::Value {
    v.as_ref().display().to_string().into()
}

/// The node the agent runs as: an EKS-style name its shared certificate does not carry, so
/// the controller's `auth.fleet_agents` (rendered by the chart) must let it in.
const NODE: &str = "ip-10-0-3-7.ec2.internal";
/// The controller's pod, which leader election labels.
const CONTROLLER_POD: &str = "hearth-controller-5d9c7b6f4-x2x7q";

/// What `chart_configs_run` started.
struct Running {
    controller: Proc,
    agent: Proc,
    ctl_http: std::net::SocketAddr,
    agent_http: std::net::SocketAddr,
    /// Kept alive for the processes; tests look at what they wrote.
    _api: hearth_tests::apiserver::ApiServer,
}

/// Starts the controller and an agent from the config files `values` renders, with only
/// what cannot exist in a test rewritten: paths into a temp dir, listeners on 127.0.0.1:0,
/// the controller's address, simulated devices for NVML, and a kubeconfig for the API test
/// server in place of the in-cluster service account (the pods' downward-API variables are
/// set as the chart sets them). The agent keeps the chart's server name and certificates.
/// Both must do their Kubernetes work with exactly the chart's RBAC: the controller leads
/// and labels its pod, the agent writes the health condition on its Node.
async fn chart_configs_run(dir: &Path, values: &str) -> Result<Running> {
    let objs = render(&[&chart().join("ci").join(values)], &[]);
    let [ctl_tls, agent_tls] = tls_material(&objs, &dir.join("tls"))?;
    let api = hearth_tests::apiserver::ApiServer::start(&[
        hearth_agent::kube::API_RULES,
        hearth_agent::kube::POD_DRIVER_RULES,
        hearth_controller::leader::API_RULES,
    ])
    .await?;
    api.add_node(NODE);
    let ns = find(&objs, "Deployment", "hearth-controller")["metadata"]["namespace"].as_str().unwrap_or("hearth-system").to_owned();
    api.add_namespaced_pod(&ns, CONTROLLER_POD);
    let kubeconfig = api.kubeconfig(dir)?;

    let mut ctl = config_map_file(&objs, "hearth-controller", "controller.yaml");
    for key in ["listen", "http_listen"] {
        ensure!(ctl[key].as_str().is_some_and(|a| a.starts_with("0.0.0.0:")), "controller {key}: {:?}", ctl[key]);
        set(&mut ctl, &[key], "127.0.0.1:0".into());
    }
    if ctl["extender"]["listen"].as_str().is_some_and(|l| !l.is_empty()) {
        set(&mut ctl, &["extender", "listen"], "127.0.0.1:0".into());
    }
    ensure!(ctl["tls"]["cert"].as_str() == Some("/etc/hearth/tls/tls.crt"), "controller tls: {:?}", ctl["tls"]);
    set(
        &mut ctl,
        &["tls"],
        serde_yaml_ng::to_value(BTreeMap::from([("ca", s(&ctl_tls.0)), ("cert", s(&ctl_tls.1)), ("key", s(&ctl_tls.2))]))?,
    );
    ensure!(ctl["leader_election"]["enabled"].as_bool() == Some(true), "leader election: {:?}", ctl["leader_election"]);
    set(&mut ctl, &["kubernetes", "kubeconfig"], s(&kubeconfig));
    let ctl_file = dir.join("controller.yaml");
    std::fs::write(&ctl_file, serde_yaml_ng::to_string(&ctl)?)?;
    let mut controller = Proc::spawn(
        "controller",
        Command::new(bin("hearth-controller"))
            .args(["run", "--config"])
            .arg(&ctl_file)
            .env("RUST_LOG", "info")
            .env("POD_NAME", CONTROLLER_POD)
            .env("POD_NAMESPACE", &ns),
        dir,
    )?;
    let line = controller.wait_for_log_line("controller listening", Duration::from_secs(20)).await?;
    let grpc = logged_addr(&line, "grpc_addr")?;
    let ctl_http = logged_addr(&line, "http_addr")?;

    let mut agent = config_map_file(&objs, "hearth-agent", "agent.yaml");
    let url = agent["controller"]["url"].as_str().context("agent controller.url")?.to_owned();
    ensure!(url == "https://hearth-controller.hearth-system.svc:7443", "agent controller.url {url}");
    set(&mut agent, &["controller", "url"], format!("https://{grpc}").into());
    set(
        &mut agent,
        &["controller", "tls"],
        serde_yaml_ng::to_value(BTreeMap::from([("ca", s(&agent_tls.0)), ("cert", s(&agent_tls.1)), ("key", s(&agent_tls.2))]))?,
    );
    set(&mut agent, &["http_listen"], "127.0.0.1:0".into());
    set(&mut agent, &["state_dir"], s(dir.join("state")));
    set(&mut agent, &["cache", "root"], s(dir.join("cache")));
    std::fs::create_dir_all(dir.join("pod-resources"))?;
    set(&mut agent, &["devices", "pod_resources_dir"], s(dir.join("pod-resources")));
    if agent["devices"]["backend"].as_str() == Some("nvml") {
        set(&mut agent, &["devices", "backend"], "simulated".into());
        set(&mut agent, &["devices", "simulated"], serde_yaml_ng::to_value(["2xH100-80GB"])?);
        if let Some(m) = agent["devices"].as_mapping_mut() {
            m.remove("nvml_library");
        }
    }
    set(&mut agent, &["kubernetes", "kubeconfig"], s(&kubeconfig));
    // Model sources of the example values are not reachable here: refuse fast.
    set(&mut agent, &["cache", "s3", "endpoint"], "http://127.0.0.1:9".into());
    // No containerd here: the socket in a temp dir, absent, and `enabled` as rendered (not
    // forced on), so images must come up off, saying why, with the keep list still parsed.
    let socket = agent["images"]["containerd_socket"].as_str().context("agent images.containerd_socket")?.to_owned();
    ensure!(socket == "/run/containerd/containerd.sock", "agent images.containerd_socket {socket}");
    ensure!(agent["images"].get("enabled").is_none(), "the chart forces images.enabled: {:?}", agent["images"]);
    let socket = dir.join("containerd/containerd.sock");
    set(&mut agent, &["images", "containerd_socket"], s(&socket));
    if agent["images"]["hosts_dir"].as_str().is_some() {
        set(&mut agent, &["images", "hosts_dir"], s(dir.join("certs.d")));
    }
    // The pull secret as the kubelet mounts it: the Secret's .dockerconfigjson.
    if let Some(auth) = agent["images"]["auth_file"].as_str() {
        ensure!(auth == "/etc/hearth/pull-secret/.dockerconfigjson", "agent images.auth_file {auth}");
        let file = dir.join("pull-secret/.dockerconfigjson");
        std::fs::create_dir_all(file.parent().unwrap())?;
        let token = base64::engine::general_purpose::STANDARD.encode("puller:s3cret");
        std::fs::write(&file, json!({"auths": {"https://index.docker.io/v1/": {"auth": token}}}).to_string())?;
        set(&mut agent, &["images", "auth_file"], s(&file));
    }
    let agent_file = dir.join("agent.yaml");
    std::fs::write(&agent_file, serde_yaml_ng::to_string(&agent)?)?;
    agent_identity(&objs);
    let node_name = NODE;
    let mut agent_proc = Proc::spawn(
        "agent",
        Command::new(bin("hearth"))
            .args(["agent", "--config"])
            .arg(&agent_file)
            .env("RUST_LOG", "info")
            .env("NODE_NAME", node_name)
            // As the DaemonSet sets it (status.podIP): the image mirror's address.
            .env("POD_IP", "127.0.0.1")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        dir,
    )?;
    let line = agent_proc.wait_for_log_line("agent serving /metrics", Duration::from_secs(30)).await?;
    let agent_http = logged_addr(&line, "http_addr")?;
    wait_for("agent /healthz", Duration::from_secs(15), || async {
        Ok(http_get(agent_http, "/healthz").await.ok().filter(|(st, _)| *st == 200).map(|_| ()))
    })
    .await
    .with_context(|| agent_proc.log_text())?;
    // The agent reached the controller with the chart's certificates and server name.
    wait_for("the agent connected to the controller", Duration::from_secs(20), || async {
        let (_, body) = http_get(ctl_http, "/metrics").await?;
        Ok(metric_value(&body, "hearth_controller_connected_agents").filter(|v| *v == 1.0))
    })
    .await
    .with_context(|| format!("controller log:\n{}\nagent log:\n{}", controller.log_text(), agent_proc.log_text()))?;
    // The Kubernetes side, with the chart's RBAC and nothing more.
    wait_for("the controller leads and labels its pod", Duration::from_secs(20), || async {
        Ok(api.object("/pods", &ns, CONTROLLER_POD).filter(|p| p["metadata"]["labels"]["hearth.dev/leader"] == "true").map(|_| ()))
    })
    .await
    .with_context(|| controller.log_text())?;
    wait_for("the agent's health condition on its Node", Duration::from_secs(20), || async {
        let n = api.node(NODE).context("node")?;
        Ok(n["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "HearthAcceleratorsHealthy")).map(|_| ()))
    })
    .await
    .with_context(|| agent_proc.log_text())?;
    ensure!(api.forbidden().is_empty(), "calls the chart's RBAC does not allow: {:?}", api.forbidden());
    let (_, metrics) = http_get(agent_http, "/metrics").await?;
    let off = format!(
        "hearth_subsystem_info{{subsystem=\"images\",detail=\"no containerd socket at {} (images.containerd_socket)\"}}",
        socket.display()
    );
    ensure!(
        metric_value(&metrics, "hearth_subsystem_status{subsystem=\"images\",state=\"off\"}") == Some(1.0)
            && metric_value(&metrics, &off) == Some(1.0),
        "images not off for want of the socket:\n{}",
        metrics.lines().filter(|l| l.contains("subsystem=\"images\"")).collect::<Vec<_>>().join("\n")
    );
    Ok(Running { controller, agent: agent_proc, ctl_http, agent_http, _api: api })
}

/// Checks the shared identity every ci values file keeps in the agent certificate (the one
/// the chart lists in `auth.fleet_agents`).
fn agent_identity(objs: &[Value]) -> String {
    const NAME: &str = "hearth-agent";
    match all(objs, "Certificate").into_iter().find(|c| c["metadata"]["name"] == "hearth-agent") {
        Some(c) => assert!(strs(&c["spec"]["dnsNames"]).iter().any(|n| n == NAME), "agent Certificate without {NAME}: {c}"),
        None => {
            let cert = pem_cert(&find(objs, "Secret", "hearth-agent-tls")["data"]);
            hearth_proto::transport::check_node_identity(&cert, NAME)
                .unwrap_or_else(|e| panic!("agent certificate not valid for {NAME}: {e}"));
        }
    }
    NAME.to_owned()
}

async fn scrape_names(addr: std::net::SocketAddr) -> Result<BTreeSet<String>> {
    let (st, body) = http_get(addr, "/metrics").await?;
    ensure!(st == 200, "/metrics answered {st}");
    Ok(body.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect())
}

/// A metric is real if a running binary exposes it, or (for families that are empty until
/// something happens, like per-pod network series without pods) its name is a string literal
/// in the agent or controller source.
fn metric_known(name: &str, scraped: &BTreeSet<String>, sources: &str) -> bool {
    let mut candidates = vec![name.to_owned()];
    for suffix in ["_bucket", "_sum", "_count", "_total"] {
        if let Some(base) = name.strip_suffix(suffix) {
            candidates.push(base.to_owned());
            for unit in ["_seconds", "_bytes"] {
                if let Some(b) = base.strip_suffix(unit) {
                    candidates.push(b.to_owned());
                }
            }
        }
    }
    candidates.iter().any(|c| scraped.contains(c) || sources.contains(&format!("\"{c}\"")))
}

fn rust_sources(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

/// SIGTERM, as the kubelet sends it: the process must be gone before the pod's grace period
/// ends and the kubelet kills it.
async fn stop(mut p: Proc, grace: Duration) -> Result<()> {
    p.signal("TERM")?;
    match p.wait_exit(grace).await? {
        Some(_) => Ok(()),
        None => bail!("{} still running {grace:?} after SIGTERM (terminationGracePeriodSeconds):\n{}", p.name, p.log_text()),
    }
}

fn grace(objs: &[Value], kind: &str, name: &str) -> Duration {
    Duration::from_secs(find(objs, kind, name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap())
}

async fn run_ci_values(values: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Running { controller, agent, .. } = chart_configs_run(dir.path(), values).await?;
    let objs = render(&[&chart().join("ci").join(values)], &[]);
    stop(agent, grace(&objs, "DaemonSet", "hearth-agent")).await?;
    stop(controller, grace(&objs, "Deployment", "hearth-controller")).await
}

#[tokio::test]
async fn chart_config_minimal_values_runs_controller_and_agent() -> Result<()> {
    run_ci_values("minimal-values.yaml").await
}

#[tokio::test]
async fn chart_config_inferentia_values_runs_controller_and_agent() -> Result<()> {
    run_ci_values("inferentia-values.yaml").await
}

#[tokio::test]
async fn chart_config_certmanager_values_runs_controller_and_agent() -> Result<()> {
    run_ci_values("certmanager-values.yaml").await
}

#[tokio::test]
async fn chart_config_privileged_values_runs_controller_and_agent() -> Result<()> {
    run_ci_values("privileged-values.yaml").await
}

/// The GPU example, and the dashboards' metric names against what these binaries expose.
#[tokio::test]
async fn chart_config_gpu_values_runs_controller_and_agent_and_dashboards_query_real_metrics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Running { controller, agent, ctl_http, agent_http, _api } = chart_configs_run(dir.path(), "gpu-values.yaml").await?;
    // The simulated GPUs' first sweep, so the DCGM families are there.
    wait_for("GPU metrics", Duration::from_secs(20), || async {
        Ok(scrape_names(agent_http).await?.contains("DCGM_FI_DEV_GPU_UTIL").then_some(()))
    })
    .await?;
    // The leader's first scaling round, so its decision families are there.
    wait_for("the controller's first decisions", Duration::from_secs(20), || async {
        let names = scrape_names(ctl_http).await?;
        Ok(["hearth_controller_scaling_decisions_total", "hearth_controller_desired_replicas"]
            .iter()
            .all(|n| names.contains(*n))
            .then_some(()))
    })
    .await
    .with_context(|| controller.log_text())?;
    let mut scraped = scrape_names(agent_http).await?;
    scraped.extend(scrape_names(ctl_http).await?);
    let mut sources = String::new();
    rust_sources(&root().join("agent/src"), &mut sources);
    rust_sources(&root().join("controller/src"), &mut sources);
    let mut unknown = Vec::new();
    for (file, expr, metrics) in dashboard_metrics() {
        for m in metrics {
            if !metric_known(&m, &scraped, &sources) {
                unknown.push(format!("{file}: {m} in {expr:?}"));
            }
        }
    }
    ensure!(unknown.is_empty(), "dashboards query metrics the code does not have:\n{}", unknown.join("\n"));
    // The check can fail: a misspelt name is unknown.
    ensure!(!metric_known("DCGM_FI_DEV_GPU_UTILISATION", &scraped, &sources));
    let objs = render(&[&chart().join("ci/gpu-values.yaml")], &[]);
    stop(agent, grace(&objs, "DaemonSet", "hearth-agent")).await?;
    stop(controller, grace(&objs, "Deployment", "hearth-controller")).await
}
