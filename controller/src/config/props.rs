//! Property tests of the controller config: any text is a config or an error naming the
//! file; any values in the known fields validate or fail with an error that starts with a
//! field the file set (or `tls`, which an absent section still requires); generated
//! durations and sizes come out as the values they spell.

use proptest::prelude::*;
use serde_yaml_ng::Value;

use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::try_from(RawConfig::from_yaml(Path::new("c.yaml"), yaml)?)
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

/// A scalar of the wrong kind, or a list or map where a scalar belongs.
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

fn duration() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (0u64..100_000, prop::sample::select(vec!["s", "ms", "m", "h", "min", "sec", "us", "d"])).prop_map(|(n, u)| s(&format!("{n}{u}"))),
        1 => prop::sample::select(vec!["soon", "", "-1s", "5", "1e3s", "1.5s", "99999999999999999999s", "18446744073709551615s", "1s 1s"]).prop_map(s),
        1 => junk(),
    ]
}

fn size() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (0u64..100_000, prop::sample::select(vec!["", "Ki", "Mi", "Gi", "Ti", "K", "k", "M", "G", "T"])).prop_map(|(n, u)| s(&format!("{n}{u}"))),
        1 => prop::sample::select(vec!["lots", "", "1Pi", "-1", " 4Mi ", "4 Mi", "99999999999999999999Ti", "18446744073709551615"]).prop_map(s),
        1 => junk(),
    ]
}

fn addr() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop::sample::select(vec!["0.0.0.0:7443", "127.0.0.1:0", "[::1]:80"]).prop_map(s),
        1 => prop::sample::select(vec!["nowhere", "1.2.3.4:99999", "", "localhost:80"]).prop_map(s),
        1 => junk(),
    ]
}

fn float() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (-0.5..4.0f64).prop_map(Value::from),
        1 => prop::sample::select(vec![".nan", ".inf", "-.inf", "0"]).prop_map(|t| serde_yaml_ng::from_str(t).unwrap_or(Value::Null)),
        1 => junk(),
    ]
}

fn count() -> impl Strategy<Value = Value> {
    prop_oneof![8 => (0u64..300).prop_map(Value::from), 1 => Just(Value::from(u64::MAX)), 1 => Just(Value::from(-1)), 1 => junk()]
}

/// A mapping of some of `fields`, each with a value from its strategy; a field whose name
/// ends in `!` is required by the parser and nearly always there.
fn section(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let entries: Vec<_> = fields
        .into_iter()
        .map(|(k, v)| {
            let (k, p) = match k.strip_suffix('!') {
                Some(k) => (k, 0.95),
                None => (k, 0.4),
            };
            prop::option::weighted(p, v).prop_map(move |v| v.map(|v| (s(k), v)))
        })
        .collect();
    entries.prop_map(|e| Value::Mapping(e.into_iter().flatten().collect())).boxed()
}

fn model() -> BoxedStrategy<Value> {
    let resources = section(vec![
        ("gpus", prop_oneof![8 => (1u64..4).prop_map(Value::from), 1 => count()].boxed()),
        ("mig", prop_oneof![prop::sample::select(vec!["3g.40gb", "1g.10gb+me", "8g.1gb", "3g.gb", "x"]).prop_map(s), junk()].boxed()),
        ("neuron_cores", count().boxed()),
        ("memory", size().boxed()),
    ]);
    let scaling = section(vec![
        ("min_replicas", count().boxed()),
        ("max_replicas", count().boxed()),
        ("target_concurrency", float().boxed()),
        ("target_kv_cache", float().boxed()),
        ("target_ttft", duration().boxed()),
        ("stable_window", duration().boxed()),
        ("panic_window", duration().boxed()),
        ("panic_threshold", float().boxed()),
        ("tolerance", float().boxed()),
        ("scale_down_delay", duration().boxed()),
        ("scale_to_zero_after", duration().boxed()),
    ]);
    section(vec![
        ("name!", prop_oneof![8 => prop::sample::select(vec!["llama", "a.b-1"]).prop_map(s), 1 => prop::sample::select(vec!["Bad_Name", ""]).prop_map(s), 1 => junk()].boxed()),
        ("source!", prop_oneof![8 => prop::sample::select(vec!["s3://b/m", "file:///fsx/m"]).prop_map(s), 1 => prop::sample::select(vec!["s3://", "http://x"]).prop_map(s), 1 => junk()].boxed()),
        ("revision", prop_oneof![Just(s("main")), junk()].boxed()),
        ("size!", size().boxed()),
        ("image!", prop_oneof![8 => Just(s("vllm:1")), 1 => Just(s(" ")), 1 => junk()].boxed()),
        ("image_size", size().boxed()),
        ("runtime", prop_oneof![8 => prop::sample::select(vec!["vllm", "tgi"]).prop_map(s), 1 => Just(s("other")), 1 => junk()].boxed()),
        ("resources!", resources),
        ("scaling", scaling),
    ])
}

/// Every section of the controller config, each field present or not, with values that are
/// valid, invalid in form, or of the wrong kind. File-reading fields name files that do not
/// exist, so no test reads the machine's files.
fn config() -> BoxedStrategy<Value> {
    let tls_file = || prop_oneof![Just(s("/nonexistent/a.pem")), junk()].boxed();
    let placement = section(vec![
        ("default_source_bandwidth", size().boxed()),
        ("local_read_bandwidth", size().boxed()),
        ("image_pull_bandwidth", size().boxed()),
        ("runtime_start", duration().boxed()),
        ("load_penalty", duration().boxed()),
        ("load_saturation", float().boxed()),
        ("fragmentation_penalty", duration().boxed()),
        ("eviction_weight", float().boxed()),
        ("lease_ttl", duration().boxed()),
        ("max_lease_ttl", duration().boxed()),
    ]);
    let scaling = section(vec![
        ("interval", duration().boxed()),
        ("prewarm_horizon", duration().boxed()),
        ("max_prewarm_per_model", count().boxed()),
        ("fallback_lead_time", duration().boxed()),
        ("pending_ttl", duration().boxed()),
    ]);
    let names = || {
        prop::collection::vec(prop_oneof![Just(s("hearth-scheduler")), Just(s("not a name!")), junk()], 0..3)
            .prop_map(Value::Sequence)
            .boxed()
    };
    let token = section(vec![
        ("role!", prop_oneof![prop::sample::select(vec!["scheduler", "root"]).prop_map(s), junk()].boxed()),
        ("file!", tls_file()),
    ]);
    let auth = section(vec![
        ("schedulers", names()),
        ("autoscalers", names()),
        ("operators", names()),
        ("tokens", prop::collection::vec(token, 0..2).prop_map(Value::Sequence).boxed()),
    ]);
    let extender = section(vec![
        ("listen", addr().boxed()),
        ("prefix", prop_oneof![prop::sample::select(vec!["/extender", "/", "x", ""]).prop_map(s), junk()].boxed()),
    ]);
    section(vec![
        ("listen", addr().boxed()),
        ("http_listen", addr().boxed()),
        ("tls", section(vec![("ca", tls_file()), ("cert", tls_file()), ("key", tls_file())])),
        ("insecure!", prop_oneof![8 => Just(Value::Bool(true)), 1 => Just(Value::Bool(false)), 1 => junk()].boxed()),
        ("stale_after", duration().boxed()),
        ("forget_after", duration().boxed()),
        ("max_message_size", size().boxed()),
        ("hello_timeout", duration().boxed()),
        ("shutdown_grace", duration().boxed()),
        ("models", prop::collection::vec(model(), 0..3).prop_map(Value::Sequence).boxed()),
        ("placement", placement),
        ("scaling", scaling),
        ("auth", auth),
        ("extender", extender),
    ])
}

fn yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

/// The field an error message starts with, up to its first `.`, `[`, `:` or space.
fn leading_field(msg: &str) -> &str {
    msg.split(['.', '[', ':', ' ']).next().unwrap_or("")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn any_text_is_a_config_or_an_error_naming_the_file(text in prop_oneof!["\\PC{0,60}", "[a-z_:{}\\[\\], \n\"'-]{0,60}"]) {
        match RawConfig::from_yaml(Path::new("c.yaml"), &text) {
            Ok(raw) => {
                if let Err(e) = Config::try_from(raw) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Err(e) => prop_assert!(e.to_string().starts_with("config file c.yaml: "), "{}", e),
        }
    }

    #[test]
    fn any_values_in_known_fields_validate_or_name_the_field(v in config()) {
        let text = yaml(&v);
        match parse(&text) {
            Ok(_) => {}
            Err(e @ ConfigError::Parse { .. }) => prop_assert!(e.to_string().starts_with("config file c.yaml: "), "{}", e),
            Err(e) => {
                let msg = e.to_string();
                let field = leading_field(&msg);
                let set = v.as_mapping().is_some_and(|m| m.contains_key(field));
                prop_assert!(set || field == "tls", "error {:?} names no field the file set:\n{}", msg, text);
            }
        }
    }

    #[test]
    fn spelled_durations_and_sizes_come_out_as_their_values(
        stale_s in 1u64..100_000,
        forget in (0u64..48, 0u64..60),
        max_ki in 1u64..=65_536,
        interval_ms in 100u64..100_000,
        bandwidth_m in 1u64..100_000,
        gib in 1u64..4096,
        window_s in 1u64..3600,
    ) {
        let text = format!(
            "insecure: true\nstale_after: {stale_s}s\nforget_after: {}h {}m\nmax_message_size: {max_ki}Ki\n\
             scaling: {{interval: {interval_ms}ms}}\nplacement: {{default_source_bandwidth: {bandwidth_m}M}}\n\
             models: [{{name: m, source: 's3://b/m', size: {gib}Gi, image: i, resources: {{gpus: 1}}, scaling: {{stable_window: {window_s}s, panic_window: {window_s}s}}}}]",
            forget.0, forget.1,
        );
        let c = parse(&text);
        prop_assert!(c.is_ok(), "{:?}\n{}", c.as_ref().err().map(ToString::to_string), text);
        let c = c.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(c.stale_after, Duration::from_secs(stale_s));
        prop_assert_eq!(c.forget_after, Duration::from_secs(forget.0 * 3600 + forget.1 * 60));
        prop_assert_eq!(c.max_message_bytes as u64, max_ki << 10);
        prop_assert_eq!(c.scaling.interval, Duration::from_millis(interval_ms));
        prop_assert_eq!(c.placement.default_source_bandwidth, (bandwidth_m * 1_000_000) as f64);
        let m = c.catalog.get("m").expect("model m");
        prop_assert_eq!(m.bytes, gib << 30);
        prop_assert_eq!((m.scaling.stable_window, m.scaling.panic_window), (Duration::from_secs(window_s), Duration::from_secs(window_s)));
    }
}
