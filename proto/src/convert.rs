//! Validated domain types built from wire messages (`TryFrom<pb::X>`), so the controller and
//! agent logic never has to re-check what arrived.

use crate::v1 as pb;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("Hello.node_name: expected a Kubernetes node name (lowercase RFC 1123 subdomain, at most 253 characters), got {0:?}")]
    NodeName(String),
    #[error("Hello.boot_id: expected a non-empty boot id of at most 64 characters, got {0:?}")]
    BootId(String),
    #[error("Hello.api_version: this controller speaks API version {supported}, the agent speaks {got}")]
    ApiVersion { supported: u32, got: u32 },
    #[error("Hello.agent_version: expected at most 64 characters")]
    AgentVersion,
    #[error("Hello.capabilities: expected at most 64 entries of at most 64 characters each")]
    Capabilities,
}

/// Checks a Kubernetes node name: a DNS subdomain (RFC 1123), which is also what the
/// agent's certificate carries as its DNS SAN.
pub fn validate_node_name(name: &str) -> Result<(), ConvertError> {
    let bad = || ConvertError::NodeName(name.chars().take(300).collect());
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-';
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// A Hello that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHello {
    pub node_name: String,
    pub boot_id: String,
    pub agent_version: String,
    pub api_version: u32,
    pub capabilities: Vec<String>,
    /// Zero when the agent did not say; the controller then uses its own default.
    pub heartbeat_interval_ms: u32,
}

impl TryFrom<pb::Hello> for AgentHello {
    type Error = ConvertError;

    fn try_from(h: pb::Hello) -> Result<Self, Self::Error> {
        validate_node_name(&h.node_name)?;
        if h.boot_id.is_empty() || h.boot_id.len() > 64 {
            return Err(ConvertError::BootId(h.boot_id.chars().take(80).collect()));
        }
        if h.api_version != crate::API_VERSION {
            return Err(ConvertError::ApiVersion { supported: crate::API_VERSION, got: h.api_version });
        }
        if h.agent_version.len() > 64 {
            return Err(ConvertError::AgentVersion);
        }
        if h.capabilities.len() > 64 || h.capabilities.iter().any(|c| c.len() > 64) {
            return Err(ConvertError::Capabilities);
        }
        Ok(Self {
            node_name: h.node_name,
            boot_id: h.boot_id,
            agent_version: h.agent_version,
            api_version: h.api_version,
            capabilities: h.capabilities,
            heartbeat_interval_ms: h.heartbeat_interval_ms,
        })
    }
}

impl From<&AgentHello> for pb::Hello {
    fn from(h: &AgentHello) -> Self {
        pb::Hello {
            node_name: h.node_name.clone(),
            boot_id: h.boot_id.clone(),
            agent_version: h.agent_version.clone(),
            api_version: h.api_version,
            capabilities: h.capabilities.clone(),
            heartbeat_interval_ms: h.heartbeat_interval_ms,
        }
    }
}

/// Applies a Delta to a stored state. The caller has checked epoch and sequence.
pub fn apply_delta(state: &mut pb::NodeState, d: pb::Delta) {
    if let Some(info) = d.info {
        state.info = Some(info);
    }
    if let Some(r) = d.resources {
        state.resources = Some(r);
    }
    if let Some(a) = d.accelerators {
        state.accelerators = a.items;
    }
    if let Some(s) = d.source_bandwidth {
        state.source_bandwidth = s.items;
    }
    if let Some(p) = d.partition {
        state.partition = Some(p);
    }
    if let Some(s) = d.subsystems {
        state.subsystems = s.items;
    }
    upsert(&mut state.models, d.model_upserts, &d.model_removals, |m| &m.id);
    upsert(&mut state.images, d.image_upserts, &d.image_removals, |i| &i.reference);
    upsert(&mut state.runtimes, d.runtime_upserts, &d.runtime_removals, |r| &r.name);
}

fn upsert<T>(items: &mut Vec<T>, upserts: Vec<T>, removals: &[String], key: impl Fn(&T) -> &String) {
    items.retain(|i| !removals.iter().any(|r| r == key(i)));
    for u in upserts {
        match items.iter_mut().find(|i| key(i) == key(&u)) {
            Some(slot) => *slot = u,
            None => items.push(u),
        }
    }
}

/// The Delta that turns `old` into `new`, or `None` when nothing changed. `apply_delta(old,
/// diff(old, new))` equals `new` up to list order of keyed items, provided `new` has info,
/// resources and partition wherever `old` has them: a Delta cannot clear those.
pub fn diff(old: &pb::NodeState, new: &pb::NodeState, epoch: u64, seq: u64) -> Option<pb::Delta> {
    let mut d = pb::Delta { epoch, seq, ..Default::default() };
    let mut changed = false;
    if old.info != new.info {
        d.info = new.info.clone();
        changed = true;
    }
    if old.resources != new.resources {
        d.resources = new.resources.clone();
        changed = true;
    }
    if old.accelerators != new.accelerators {
        d.accelerators = Some(pb::AcceleratorList { items: new.accelerators.clone() });
        changed = true;
    }
    if old.source_bandwidth != new.source_bandwidth {
        d.source_bandwidth = Some(pb::SourceBandwidthList { items: new.source_bandwidth.clone() });
        changed = true;
    }
    if old.partition != new.partition {
        d.partition = new.partition.clone();
        changed = true;
    }
    if old.subsystems != new.subsystems {
        d.subsystems = Some(pb::SubsystemList { items: new.subsystems.clone() });
        changed = true;
    }
    changed |= diff_keyed(&old.models, &new.models, |m| &m.id, &mut d.model_upserts, &mut d.model_removals);
    changed |= diff_keyed(&old.images, &new.images, |i| &i.reference, &mut d.image_upserts, &mut d.image_removals);
    changed |= diff_keyed(&old.runtimes, &new.runtimes, |r| &r.name, &mut d.runtime_upserts, &mut d.runtime_removals);
    changed.then_some(d)
}

fn diff_keyed<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> &String,
    upserts: &mut Vec<T>,
    removals: &mut Vec<String>,
) -> bool {
    for n in new {
        if !old.iter().any(|o| o == n) {
            upserts.push(n.clone());
        }
    }
    for o in old {
        if !new.iter().any(|n| key(n) == key(o)) {
            removals.push(key(o).clone());
        }
    }
    !upserts.is_empty() || !removals.is_empty()
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: &str) -> pb::Hello {
        pb::Hello {
            node_name: name.into(),
            boot_id: "b1".into(),
            agent_version: "0.1.0".into(),
            api_version: crate::API_VERSION,
            capabilities: vec![],
            heartbeat_interval_ms: 5000,
        }
    }

    #[test]
    fn node_names_follow_rfc1123() {
        for ok in ["a", "gpu-node-1", "ip-10-0-0-1.ec2.internal", "x1"] {
            assert_eq!(validate_node_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Upper", "-lead", "trail-", "a..b", "under_score", &"a".repeat(64), "sp ace"] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hello_rejects_wrong_api_version_with_both_numbers() {
        let mut h = hello("n1");
        h.api_version = 99;
        let err = AgentHello::try_from(h).unwrap_err();
        assert_eq!(err.to_string(), "Hello.api_version: this controller speaks API version 1, the agent speaks 99");
    }

    #[test]
    fn hello_rejects_bad_name_and_empty_boot_id() {
        assert!(matches!(AgentHello::try_from(hello("Bad_Name")), Err(ConvertError::NodeName(_))));
        let mut h = hello("ok");
        h.boot_id.clear();
        assert!(matches!(AgentHello::try_from(h), Err(ConvertError::BootId(_))));
    }

    fn model(id: &str, present: u64) -> pb::CachedModel {
        pb::CachedModel { id: id.into(), bytes_present: present, bytes_total: 100, ..Default::default() }
    }

    #[test]
    fn diff_then_apply_reproduces_new_state() {
        let old = pb::NodeState {
            models: vec![model("a", 10), model("b", 100)],
            resources: Some(pb::NodeResources { load1: 1.0, ..Default::default() }),
            ..Default::default()
        };
        let new = pb::NodeState {
            models: vec![model("a", 50), model("c", 0)],
            resources: Some(pb::NodeResources { load1: 2.0, ..Default::default() }),
            accelerators: vec![pb::Accelerator::h100(0)],
            ..Default::default()
        };
        let d = diff(&old, &new, 7, 2).expect("states differ");
        assert_eq!((d.epoch, d.seq), (7, 2));
        assert_eq!(d.model_removals, vec!["b".to_string()]);
        let mut applied = old.clone();
        apply_delta(&mut applied, d);
        applied.models.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(applied, new);
    }

    #[test]
    fn diff_of_equal_states_is_none() {
        let s = pb::NodeState { models: vec![model("a", 1)], ..Default::default() };
        assert_eq!(diff(&s, &s.clone(), 1, 1), None);
    }
}
