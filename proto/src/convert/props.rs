//! Property tests of what an agent can send: any bytes decode as an `AgentMessage` or fail
//! without a panic, what decodes re-encodes to something that decodes, and any Hello either
//! validates into an [`AgentHello`] that converts back unchanged or fails with an error that
//! names the Hello field and stays short however long the input was.

use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;

use super::*;

/// Decoding must not panic; what decodes must re-encode to exactly `encoded_len` bytes
/// that decode again (the controller sizes stored states with `encoded_len`).
fn decodes_consistently(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = pb::AgentMessage::decode(bytes) {
        let again = m.encode_to_vec();
        prop_assert_eq!(again.len(), m.encoded_len());
        let m2 = pb::AgentMessage::decode(again.as_slice());
        prop_assert!(m2.is_ok(), "re-encoded message does not decode: {:?}", m2);
        if let Some(pb::agent_message::Kind::Hello(h)) = m.kind {
            // Whatever arrives as Hello is validated or refused, never a panic.
            let _ = AgentHello::try_from(h);
        }
    }
    Ok(())
}

/// One encoded message of each kind with every field set, so mutations reach nested
/// messages, maps, packed and repeated fields.
fn seeds() -> Vec<Vec<u8>> {
    use pb::agent_message::Kind;
    let ts = Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 });
    let state = pb::NodeState {
        info: Some(pb::NodeInfo {
            hostname: "gpu-1".into(),
            kernel_version: "6.8".into(),
            cpu_count: 96,
            memory_total_bytes: 1 << 40,
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        }),
        resources: Some(pb::NodeResources {
            cpu_usage_ratio: 0.5,
            load1: 3.0,
            memory_available_bytes: 1 << 38,
            cache_capacity_bytes: 1 << 42,
            cache_free_bytes: 1 << 41,
            interfaces: vec![pb::NetworkInterface { name: "eth0".into(), receive_bytes: 7, transmit_bytes: 9 }],
        }),
        accelerators: vec![pb::Accelerator {
            index: 0,
            uuid: "GPU-0".into(),
            vendor: pb::AcceleratorVendor::Nvidia as i32,
            pci_device_id: 0x2330_10de,
            mig_enabled: true,
            partitions: vec![pb::Partition {
                uuid: "MIG-0".into(),
                profile: "3g.40gb".into(),
                gpu_instance_id: 1,
                placement_start: 4,
                placement_size: 4,
                ..Default::default()
            }],
            processes: vec![pb::GpuProcess { pid: 42, used_memory_bytes: 1 << 30, gpu_instance_id: 1 }],
            ..Default::default()
        }],
        models: vec![pb::CachedModel {
            id: "m1".into(),
            source_uri: "s3://b/m".into(),
            state: pb::CacheEntryState::Ready as i32,
            bytes_present: 10,
            bytes_total: 10,
            last_used: ts,
            ..Default::default()
        }],
        images: vec![pb::CachedImage { reference: "img:1".into(), digest: "sha256:00".into(), size_bytes: 5 }],
        runtimes: vec![pb::ServingRuntime {
            name: "r1".into(),
            model_id: "m1".into(),
            partition_uuid: "MIG-0".into(),
            load: Some(pb::RuntimeLoad {
                requests_waiting: 1.0,
                requests_running: 2.0,
                kv_cache_usage_ratio: 0.3,
                ttft_p50_seconds: 0.1,
                ..Default::default()
            }),
            ..Default::default()
        }],
        source_bandwidth: vec![pb::SourceBandwidth { source: "s3://b".into(), bytes_per_second: 1e9, samples: 3 }],
        partition: Some(pb::PartitionStatus { phase: 2, spec_name: "s".into(), reason: String::new() }),
        subsystems: vec![pb::SubsystemStatus {
            name: "devices".into(),
            enabled: false,
            reason: "no NVML".into(),
            state: pb::SubsystemState::Off as i32,
        }],
    };
    let delta = pb::Delta {
        epoch: 1,
        seq: 2,
        resources: state.resources.clone(),
        accelerators: Some(pb::AcceleratorList { items: state.accelerators.clone() }),
        model_upserts: state.models.clone(),
        model_removals: vec!["m0".into()],
        image_upserts: state.images.clone(),
        image_removals: vec!["img:0".into()],
        runtime_upserts: state.runtimes.clone(),
        runtime_removals: vec!["r0".into()],
        source_bandwidth: Some(pb::SourceBandwidthList { items: state.source_bandwidth.clone() }),
        partition: state.partition.clone(),
        subsystems: Some(pb::SubsystemList { items: state.subsystems.clone() }),
        info: state.info.clone(),
    };
    let hello = pb::Hello {
        node_name: "gpu-1".into(),
        boot_id: "b".into(),
        agent_version: "0.1.0".into(),
        api_version: crate::API_VERSION,
        capabilities: vec!["mig".into()],
        heartbeat_interval_ms: 5000,
    };
    let status = pb::CommandStatus { command_id: "c".into(), idempotency_key: "k".into(), phase: 2, message: "m".into(), progress: 0.5 };
    [
        Kind::Hello(hello),
        Kind::Snapshot(pb::Snapshot { epoch: 1, seq: 1, state: Some(state) }),
        Kind::Delta(delta),
        Kind::Heartbeat(pb::Heartbeat { epoch: 1, seq: 2, sent_at: ts }),
        Kind::CommandStatus(status),
    ]
    .into_iter()
    .map(|k| pb::AgentMessage { kind: Some(k) }.encode_to_vec())
    .collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<Index>().prop_map(Mutation::Remove),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Set(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Mutation::Remove(i) => {
            bytes.remove(i.index(bytes.len()));
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
    }
}

/// Strings that are near every Hello rule's edge: valid-looking names, upper case and
/// underscores, separators in odd places, and lengths either side of each limit.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.-]{0,12}",
        "[a-zA-Z0-9._ -]{0,12}",
        "\\PC{0,8}",
        (prop::sample::select(vec![62usize, 63, 64, 65, 252, 253, 254, 300, 2000]), "[a-z0-9-]").prop_map(|(n, c)| c.repeat(n)),
    ]
}

fn hello() -> impl Strategy<Value = pb::Hello> {
    let caps = prop_oneof![prop::collection::vec(text(), 0..3), (60usize..70).prop_map(|n| vec!["c".to_owned(); n])];
    let api = prop_oneof![Just(crate::API_VERSION), any::<u32>()];
    (text(), text(), text(), api, caps, any::<u32>()).prop_map(
        |(node_name, boot_id, agent_version, api_version, capabilities, heartbeat_interval_ms)| pb::Hello {
            node_name,
            boot_id,
            agent_version,
            api_version,
            capabilities,
            heartbeat_interval_ms,
        },
    )
}

/// A name `validate_node_name` must accept: RFC 1123 labels joined by dots.
fn node_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", 1..5)
        .prop_map(|labels| labels.join("."))
        .prop_filter("at most 253 characters", |n| n.len() <= 253)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_decode_or_fail_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decodes_consistently(&bytes)?;
    }

    #[test]
    fn mutated_messages_decode_or_fail_without_panic(seed in 0usize..5, mutations in prop::collection::vec(mutation(), 1..6)) {
        let mut bytes = seeds().swap_remove(seed);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decodes_consistently(&bytes)?;
    }

    #[test]
    fn any_hello_validates_or_names_the_field(h in hello()) {
        match AgentHello::try_from(h.clone()) {
            Ok(a) => {
                prop_assert_eq!(pb::Hello::from(&a), h);
                prop_assert_eq!(validate_node_name(&a.node_name), Ok(()));
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("Hello."), "{}", msg);
                // The offending value is quoted but cut short: a 2000-character name must
                // not become a 2000-character log line.
                prop_assert!(msg.chars().count() < 500, "{} characters", msg.chars().count());
            }
        }
    }

    #[test]
    fn valid_hellos_are_accepted_and_round_trip(
        name in node_name(),
        boot_id in "[a-f0-9-]{1,64}",
        agent_version in "[0-9a-z.+-]{0,64}",
        capabilities in prop::collection::vec("[a-z-]{0,64}", 0..64),
        heartbeat_interval_ms in any::<u32>(),
    ) {
        let h = pb::Hello { node_name: name, boot_id, agent_version, api_version: crate::API_VERSION, capabilities, heartbeat_interval_ms };
        let a = AgentHello::try_from(h.clone());
        prop_assert!(a.is_ok(), "{:?} refused: {:?}", h, a);
        prop_assert_eq!(a.map(|a| pb::Hello::from(&a)), Ok(h));
    }

    #[test]
    fn one_bad_character_makes_a_node_name_invalid(name in node_name(), at in any::<Index>(), bad in "[A-Z_ /:@]") {
        let mut chars: Vec<char> = name.chars().collect();
        let i = at.index(chars.len());
        chars[i] = bad.chars().next().unwrap_or('_');
        let bad_name: String = chars.into_iter().collect();
        prop_assert_eq!(validate_node_name(&bad_name), Err(ConvertError::NodeName(bad_name.clone())));
    }
}
