//! Property tests of the agent config: any text is a config or an error naming the file;
//! any values in the known fields (including what the simulated-device, peer-CIDR and model
//! URI parsers read) validate or fail with an error that starts with a field the file set;
//! spelled durations and sizes come out as the values they spell.

use proptest::prelude::*;
use serde_yaml_ng::Value;

use super::*;

fn parse(yaml: &str) -> Result<Config, AgentConfigError> {
    Config::try_from(RawConfig::from_yaml(Path::new("agent.yaml"), yaml)?)
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn junk() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e3..1e3f64).prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::String),
        Just(Value::Sequence(vec![s("a")])),
    ]
}

/// Valid forms mostly, then invalid forms (huge values included), then the wrong kind.
fn one_of(valid: Vec<&'static str>, invalid: Vec<&'static str>) -> BoxedStrategy<Value> {
    prop_oneof![8 => prop::sample::select(valid).prop_map(s), 1 => prop::sample::select(invalid).prop_map(s), 1 => junk()].boxed()
}

fn duration() -> BoxedStrategy<Value> {
    prop_oneof![
        8 => (0u64..100_000, prop::sample::select(vec!["s", "ms", "m", "h", "us", "d"])).prop_map(|(n, u)| s(&format!("{n}{u}"))),
        // Valid, and as long as a Duration gets.
        1 => prop::sample::select(vec!["18446744073709551615s", "10000000000000000000s", "500000000000years"]).prop_map(s),
        1 => prop::sample::select(vec!["often", "", "-1s", "5", "1.5s", "99999999999999999999s"]).prop_map(s),
        1 => junk(),
    ]
    .boxed()
}

fn size() -> BoxedStrategy<Value> {
    prop_oneof![
        8 => (0u64..100_000, prop::sample::select(vec!["", "Ki", "Mi", "Gi", "Ti", "K", "M", "G"])).prop_map(|(n, u)| s(&format!("{n}{u}"))),
        1 => prop::sample::select(vec!["lots", "", "1Pi", "-1", "99999999999999999999Ti", "18446744073709551615"]).prop_map(s),
        1 => junk(),
    ]
    .boxed()
}

fn float() -> BoxedStrategy<Value> {
    prop_oneof![
        8 => (-0.2..1.2f64).prop_map(Value::from),
        1 => prop::sample::select(vec![".nan", ".inf", "0"]).prop_map(|t| serde_yaml_ng::from_str(t).unwrap_or(Value::Null)),
        1 => junk(),
    ]
    .boxed()
}

fn list(item: BoxedStrategy<Value>, max: usize) -> BoxedStrategy<Value> {
    prop::collection::vec(item, 0..max).prop_map(Value::Sequence).boxed()
}

fn boolean() -> BoxedStrategy<Value> {
    prop_oneof![8 => any::<bool>().prop_map(Value::Bool), 1 => junk()].boxed()
}

/// A mapping of some of `fields`; a name ending in `!` is required and nearly always there.
fn section(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let entries: Vec<_> = fields
        .into_iter()
        .map(|(k, v)| {
            let (k, p) = match k.strip_suffix('!') {
                Some(k) => (k, 0.95),
                None => (k, 0.35),
            };
            prop::option::weighted(p, v).prop_map(move |v| v.map(|v| (s(k), v)))
        })
        .collect();
    entries.prop_map(|e| Value::Mapping(e.into_iter().flatten().collect())).boxed()
}

/// Every section of the agent config. Paths that would be read at validation name files
/// that do not exist, so no test reads the machine's files.
fn config() -> BoxedStrategy<Value> {
    let nowhere = || prop_oneof![Just(s("/nonexistent/file")), junk()].boxed();
    let controller = section(vec![
        (
            "url",
            one_of(
                vec!["https://ctl:7443", "http://ctl:7443", "https://[::1]:7443"],
                vec!["ctl:7443", "ftp://x", "https://", "https://:1"],
            ),
        ),
        ("server_name", one_of(vec!["ctl"], vec![""])),
        ("tls", section(vec![("ca", nowhere()), ("cert", nowhere()), ("key", nowhere())])),
        ("insecure", boolean()),
        ("heartbeat_interval", duration()),
        ("backoff_initial", duration()),
        ("backoff_max", duration()),
    ]);
    let devices = section(vec![
        ("backend", one_of(vec!["none", "simulated", "nvml"], vec!["gpu", ""])),
        (
            "simulated",
            list(
                prop_oneof![
                    one_of(
                        vec!["2xH100-80GB", "1xinf2", "trn2", "8 x A100-40GB"],
                        vec!["0xH100-80GB", "65xinf2", "2xB300", "x", "99999999999xinf2"]
                    ),
                    "\\PC{0,12}".prop_map(Value::String).boxed()
                ]
                .boxed(),
                3,
            ),
        ),
        ("collect_interval", duration()),
        ("hostname_label", one_of(vec!["n1"], vec![""])),
        ("hostname_label_name", one_of(vec!["Hostname", "hostname", ""], vec!["host name", "1x", "a-b"])),
        ("pod_resources_dir", nowhere()),
        ("pod_resources_interval", duration()),
    ]);
    let node = section(vec![
        ("collect_interval", duration()),
        ("exclude_interfaces", list(one_of(vec!["lo", "veth*"], vec![""]), 3)),
        (
            "labels",
            prop::collection::btree_map("[a-z]{1,4}", "[a-z]{0,4}", 0..3)
                .prop_map(|m| Value::Mapping(m.into_iter().map(|(k, v)| (s(&k), s(&v))).collect()))
                .boxed(),
        ),
    ]);
    let model = section(vec![
        (
            "uri!",
            prop_oneof![
                one_of(vec!["s3://bkt/a/", "s3://bkt", "file:///fsx/m"], vec!["http://x/y", "s3://", "file://rel", ""]),
                "\\PC{0,12}".prop_map(Value::String).boxed()
            ]
            .boxed(),
        ),
        (
            "include",
            list(
                prop_oneof![
                    one_of(vec!["*.safetensors", "config.json"], vec!["[", "**/../x"]),
                    "\\PC{0,6}".prop_map(Value::String).boxed()
                ]
                .boxed(),
                3,
            ),
        ),
        ("exclude", list(one_of(vec!["*.bin"], vec!["["]), 2)),
        ("revision", one_of(vec!["main", ""], vec!["../x"])),
        ("pin", boolean()),
    ]);
    let cache = section(vec![
        ("root", nowhere()),
        ("capacity", size()),
        ("high_watermark", float()),
        ("low_watermark", float()),
        ("part_size", size()),
        ("concurrency", prop_oneof![8 => (0u64..2000).prop_map(Value::from), 1 => junk()].boxed()),
        ("limit_rate", size()),
        ("write_mode", one_of(vec!["auto", "direct", "buffered"], vec!["fast"])),
        (
            "s3",
            section(vec![
                ("endpoint", one_of(vec!["http://127.0.0.1:9000"], vec![""])),
                ("region", one_of(vec!["us-east-1"], vec![""])),
                ("force_path_style", boolean()),
            ]),
        ),
        ("models", list(model, 3)),
    ]);
    let peer = section(vec![
        ("name!", one_of(vec!["pods", "s3"], vec!["internet", ""])),
        (
            "cidrs",
            list(
                prop_oneof![
                    one_of(vec!["10.244.0.0/16", "fd00::/8", "52.216.0.0/15"], vec!["10.0.0.0/40", "10.0.0.0", "::/129", "x/8"]),
                    "\\PC{0,12}".prop_map(Value::String).boxed()
                ]
                .boxed(),
                3,
            ),
        ),
    ]);
    let network = section(vec![
        ("enabled", boolean()),
        ("cgroup_root", nowhere()),
        ("collect_interval", duration()),
        ("forget_after", duration()),
        ("ports", list(prop_oneof![8 => (0u64..70_000).prop_map(Value::from), 1 => junk()].boxed(), 4)),
        ("peers", list(peer, 3)),
        ("bpf_stats", boolean()),
    ]);
    let kubernetes = section(vec![
        ("enabled", boolean()),
        ("label_node", boolean()),
        ("pod_names", boolean()),
        ("events", boolean()),
        ("health", section(vec![("condition", boolean()), ("taint", boolean())])),
        ("kubeconfig", nowhere()),
        ("api_server", one_of(vec!["https://10.0.0.1:6443"], vec!["http://10.0.0.1"])),
        ("token_file", nowhere()),
        ("ca_file", nowhere()),
    ]);
    let partition = section(vec![("spec", nowhere()), ("config", one_of(vec!["balanced"], vec![""]))]);
    section(vec![
        ("node_name!", one_of(vec!["n1", "ip-10-0-0-1.ec2.internal"], vec!["Bad_Name", "", "-x"])),
        ("controller", controller),
        ("http_listen", one_of(vec!["0.0.0.0:9400", "[::]:0"], vec!["nowhere", "1.2.3.4:99999"])),
        ("devices", devices),
        ("node", node),
        ("cache", cache),
        ("shutdown_grace", duration()),
        ("max_message_size", size()),
        ("partition", partition),
        ("kubernetes", kubernetes),
        ("state_dir", nowhere()),
        ("network", network),
        (
            "runtimes",
            section(vec![
                ("discovery_label", one_of(vec!["hearth.dev/model", ""], vec!["bad label!", "/x"])),
                ("interval", duration()),
                ("timeout", duration()),
                (
                    "spot",
                    section(vec![
                        ("enabled", boolean()),
                        ("imds_endpoint", one_of(vec!["http://169.254.169.254"], vec!["https://x", "ftp://y"])),
                        ("interval", duration()),
                    ]),
                ),
            ]),
        ),
    ])
}

fn yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

/// The field an error message starts with, up to its first `.`, `/`, `:` or space.
fn leading_field(msg: &str) -> &str {
    msg.split(['.', '/', ':', ' ']).next().unwrap_or("")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn any_text_is_a_config_or_an_error_naming_the_file(text in prop_oneof!["\\PC{0,60}", "[a-z_:{}\\[\\], \n\"'-]{0,60}"]) {
        match RawConfig::from_yaml(Path::new("agent.yaml"), &text) {
            Ok(raw) => {
                if let Err(e) = Config::try_from(raw) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Err(e) => prop_assert!(e.to_string().starts_with("config file agent.yaml: "), "{}", e),
        }
    }

    #[test]
    fn any_values_in_known_fields_validate_or_name_the_field(v in config()) {
        let text = yaml(&v);
        match parse(&text) {
            Ok(_) => {}
            Err(e @ AgentConfigError::Config(ConfigError::Parse { .. })) => {
                prop_assert!(e.to_string().starts_with("config file agent.yaml: "), "{}", e);
            }
            Err(e) => {
                let msg = e.to_string();
                let field = leading_field(&msg);
                let set = |k: &str| v.as_mapping().is_some_and(|m| m.contains_key(k));
                // Missing TLS files are the controller section's; everything else names itself.
                let named = set(field) || (field == "tls" && set("controller"));
                prop_assert!(named, "error {:?} names no field the file set:\n{}", msg, text);
            }
        }
    }

    #[test]
    fn spelled_durations_and_sizes_come_out_as_their_values(
        collect_ms in 100u64..1_000_000,
        heartbeat_s in 1u64..3600,
        capacity_gi in 0u64..100_000,
        part_ki in 64u64..=(1 << 20),
        limit_m in 1u64..100_000,
        forget in (0u64..48, 0u64..60),
        grace_s in 0u64..600,
    ) {
        let text = format!(
            "node_name: n1\nnode: {{collect_interval: {collect_ms}ms}}\n\
             controller: {{url: 'http://c:1', insecure: true, heartbeat_interval: {heartbeat_s}s}}\n\
             cache: {{capacity: {capacity_gi}Gi, part_size: {part_ki}Ki, limit_rate: {limit_m}M}}\n\
             network: {{forget_after: {}h {}m}}\nshutdown_grace: {grace_s}s",
            forget.0, forget.1,
        );
        let c = parse(&text);
        prop_assert!(c.is_ok(), "{:?}\n{}", c.as_ref().err().map(ToString::to_string), text);
        let c = c.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(c.collect_interval, Duration::from_millis(collect_ms));
        prop_assert_eq!(c.controller.map(|c| c.heartbeat_interval), Some(Duration::from_secs(heartbeat_s)));
        prop_assert_eq!(c.cache.config.capacity, Some(capacity_gi << 30));
        prop_assert_eq!(c.cache.config.fetch.part_size as u64, part_ki << 10);
        prop_assert!(c.cache.config.fetch.limit.is_some());
        prop_assert_eq!(c.network.forget_after, Duration::from_secs(forget.0 * 3600 + forget.1 * 60));
        prop_assert_eq!(c.shutdown_grace, Duration::from_secs(grace_s));
    }
}

/// Regression: a PodResources interval past `Duration::MAX / 3` overflowed when tripled
/// into the staleness limit, a panic while validating the config.
#[test]
fn the_longest_pod_resources_interval_is_valid() {
    let c = parse("node_name: n1\ndevices: {pod_resources_interval: 18446744073709551615s}").expect("valid");
    assert_eq!(c.gpu.pod_resources.every, Duration::from_secs(u64::MAX));
    assert_eq!(c.gpu.pod_resources.stale_after, Duration::MAX);
}
