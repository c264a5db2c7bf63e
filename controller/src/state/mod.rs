//! The cluster view: what every agent last reported, built only from agent streams. It is
//! soft state: a restarted controller starts empty and is whole again once agents reconnect
//! and send their snapshots. This module owns the view and the rules for changing it
//! (sessions, epochs, sequence numbers); it does no I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use hearth_proto::convert::AgentHello;
use hearth_proto::prost::Message as _;
use hearth_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::placement::facts::NodeFacts;

pub mod index;
pub use index::{Hot, ModelColumns, RowId};
use index::{Index, Row};

/// Identifies one stream; a newer stream for the same node supersedes an older one.
pub type SessionId = u64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "node {node:?} already has a live session from {peer} (last message {age_ms} ms ago); a second agent claiming the same node is refused"
    )]
    DuplicateNode { node: String, peer: String, age_ms: u128 },
    #[error("session for node {node:?} was superseded by a newer one")]
    Superseded { node: String },
    #[error("out of order: {0}")]
    NeedResync(String),
    #[error("{0} before a snapshot")]
    NoSnapshot(&'static str),
}

/// How a node's stream looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Connection {
    Connected,
    Stale,
    Disconnected,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Connected => "connected",
            Connection::Stale => "stale",
            Connection::Disconnected => "disconnected",
        }
    }
}

#[derive(Debug)]
struct Session {
    id: SessionId,
    peer: String,
    commands: mpsc::Sender<pb::Command>,
}

#[derive(Debug)]
struct NodeEntry {
    hello: AgentHello,
    session: Option<Session>,
    /// None until the first snapshot of this session's epoch arrives.
    epoch: Option<u64>,
    seq: u64,
    state: pb::NodeState,
    /// This node's row in the placement index, which holds what placement reads (the
    /// node's facts, rebuilt on every snapshot and delta).
    row: RowId,
    state_bytes: u64,
    last_seen: Instant,
    last_report: SystemTime,
}

static EMPTY: std::sync::LazyLock<Arc<NodeFacts>> = std::sync::LazyLock::new(Arc::default);

/// One node as placement sees it.
#[derive(Debug, Clone, Copy)]
pub struct PlacementNode<'a> {
    /// Some agent reports (or reported) this node.
    pub known: bool,
    pub connection: Connection,
    /// False for a name no agent reports, and for a node before its first snapshot.
    pub has_report: bool,
    pub facts: &'a Arc<NodeFacts>,
}

/// One node as a placement scan sees it: its row's copied facts and the full facts.
#[derive(Debug, Clone, Copy)]
pub struct ScanNode<'a> {
    pub name: &'a str,
    pub row: RowId,
    pub known: bool,
    pub connection: Connection,
    pub has_report: bool,
    pub hot: &'a Hot,
    pub facts: &'a Arc<NodeFacts>,
}

static COLD: Hot =
    Hot { memory_available: 0, whole_free: 0, gpu_count: 0, dense_gpu_indices: true, requests: 0.0, kv_cache: 0.0, cache_free: u64::MAX };

/// What the read API and metrics see of one node.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub connection: Connection,
    pub hello: AgentHello,
    pub epoch: u64,
    pub seq: u64,
    pub last_report: SystemTime,
    pub last_report_age: Duration,
    pub peer: String,
}

#[derive(Debug, Default)]
struct Nodes {
    /// Ordered by name, so whole-cluster views need no sort.
    by_name: BTreeMap<String, NodeEntry>,
    index: Index,
}

impl Nodes {
    /// Copies what placement reads of an entry into its row.
    fn sync_row(&mut self, name: &str) {
        if let Some(e) = self.by_name.get(name) {
            let r = self.index.row_mut(e.row);
            r.session = e.session.is_some();
            r.has_report = e.epoch.is_some();
            r.last_seen = e.last_seen;
        }
    }
}

#[derive(Debug)]
pub struct ClusterState {
    nodes: RwLock<Nodes>,
    stale_after: Duration,
    forget_after: Duration,
    next_session: AtomicU64,
    state_bytes: AtomicU64,
    /// The last outcomes agents reported for commands, by command id (bounded).
    outcomes: std::sync::Mutex<Outcomes>,
}

/// Terminal command outcomes, oldest dropped first past `MAX_OUTCOMES`.
#[derive(Debug, Default)]
struct Outcomes {
    by_id: HashMap<String, CommandOutcome>,
    order: std::collections::VecDeque<String>,
}

const MAX_OUTCOMES: usize = 4096;

/// How a command ended on its node.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome {
    pub node: String,
    pub phase: pb::command_status::Phase,
    pub message: String,
}

impl ClusterState {
    pub fn new(stale_after: Duration, forget_after: Duration) -> Self {
        Self {
            nodes: RwLock::default(),
            stale_after,
            forget_after,
            next_session: AtomicU64::new(1),
            state_bytes: AtomicU64::new(0),
            outcomes: Default::default(),
        }
    }

    /// Keeps a command's final status (succeeded, failed, rejected) for whoever issued it.
    pub fn record_outcome(&self, node: &str, c: &pb::CommandStatus) {
        use pb::command_status::Phase;
        let phase = Phase::try_from(c.phase).unwrap_or(Phase::Unspecified);
        if !matches!(phase, Phase::Succeeded | Phase::Failed | Phase::Rejected) || c.command_id.is_empty() {
            return;
        }
        let mut o = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        let out = CommandOutcome { node: node.to_owned(), phase, message: c.message.clone() };
        if o.by_id.insert(c.command_id.clone(), out).is_none() {
            o.order.push_back(c.command_id.clone());
        }
        while o.order.len() > MAX_OUTCOMES {
            if let Some(old) = o.order.pop_front() {
                o.by_id.remove(&old);
            }
        }
    }

    pub fn outcome(&self, command_id: &str) -> Option<CommandOutcome> {
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner()).by_id.get(command_id).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Nodes> {
        // A panic while holding the lock cannot leave an entry half-updated in a way later
        // readers could trip on (each update is a few assignments), so poisoning is ignored.
        self.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Nodes> {
        self.nodes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for the node in `hello`. A node whose current session is still live
    /// (a message within `stale_after`) refuses a second one: two agents must never take
    /// turns overwriting one node's state. A stale or closed session is taken over, which is
    /// how an agent restarted after a crash (or a rebooted node) gets back in.
    pub fn open_session(
        &self,
        hello: AgentHello,
        peer: String,
        commands: mpsc::Sender<pb::Command>,
        now: Instant,
    ) -> Result<SessionId, StateError> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.write();
        let nodes = &mut *guard;
        let session = Some(Session { id, peer, commands });
        let name = hello.node_name.clone();
        match nodes.by_name.get_mut(&hello.node_name) {
            Some(e) => {
                if let Some(s) = &e.session {
                    let age = now.saturating_duration_since(e.last_seen);
                    if age < self.stale_after {
                        return Err(StateError::DuplicateNode { node: hello.node_name, peer: s.peer.clone(), age_ms: age.as_millis() });
                    }
                }
                e.session = session;
                e.hello = hello;
                e.epoch = None;
                e.last_seen = now;
            }
            None => {
                let row = nodes.index.insert(&hello.node_name, now);
                nodes.by_name.insert(
                    hello.node_name.clone(),
                    NodeEntry {
                        hello,
                        session,
                        epoch: None,
                        seq: 0,
                        state: pb::NodeState::default(),
                        row,
                        state_bytes: 0,
                        last_seen: now,
                        last_report: SystemTime::now(),
                    },
                );
            }
        }
        nodes.sync_row(&name);
        Ok(id)
    }

    fn with_session(
        &self,
        node: &str,
        session: SessionId,
        now: Instant,
        f: impl FnOnce(&mut NodeEntry, &AtomicU64) -> Result<Option<Arc<NodeFacts>>, StateError>,
    ) -> Result<(), StateError> {
        let mut guard = self.write();
        let nodes = &mut *guard;
        let e = nodes
            .by_name
            .get_mut(node)
            .filter(|e| e.session.as_ref().is_some_and(|s| s.id == session))
            .ok_or_else(|| StateError::Superseded { node: node.to_owned() })?;
        e.last_seen = now;
        let row = e.row;
        let out = f(e, &self.state_bytes);
        if let Ok(Some(facts)) = &out {
            nodes.index.set_facts(row, facts.clone());
        }
        nodes.sync_row(node);
        out.map(|_| ())
    }

    pub fn apply_snapshot(&self, node: &str, session: SessionId, s: pb::Snapshot, now: Instant) -> Result<(), StateError> {
        self.with_session(node, session, now, |e, total| {
            let state = s.state.unwrap_or_default();
            let bytes = state.encoded_len() as u64;
            total.fetch_add(bytes, Ordering::Relaxed);
            total.fetch_sub(e.state_bytes, Ordering::Relaxed);
            e.state_bytes = bytes;
            let facts = Arc::new(NodeFacts::from_state(&state));
            e.state = state;
            e.epoch = Some(s.epoch);
            e.seq = s.seq;
            e.last_report = SystemTime::now();
            Ok(Some(facts))
        })
    }

    /// Applies a delta that continues the stored sequence; anything else asks for a resync
    /// and leaves the stored state as it was.
    pub fn apply_delta(&self, node: &str, session: SessionId, d: pb::Delta, now: Instant) -> Result<(), StateError> {
        self.with_session(node, session, now, |e, total| {
            let Some(epoch) = e.epoch else {
                return Err(StateError::NoSnapshot("delta"));
            };
            if d.epoch != epoch || e.seq.checked_add(1) != Some(d.seq) {
                return Err(StateError::NeedResync(format!(
                    "delta epoch {} seq {} does not follow stored epoch {} seq {}",
                    d.epoch, d.seq, epoch, e.seq
                )));
            }
            e.seq = d.seq;
            hearth_proto::convert::apply_delta(&mut e.state, d);
            let facts = Arc::new(NodeFacts::from_state(&e.state));
            let bytes = e.state.encoded_len() as u64;
            total.fetch_add(bytes, Ordering::Relaxed);
            total.fetch_sub(e.state_bytes, Ordering::Relaxed);
            e.state_bytes = bytes;
            e.last_report = SystemTime::now();
            Ok(Some(facts))
        })
    }

    /// Records liveness; a heartbeat that reveals a gap (the agent sent a seq we never saw)
    /// asks for a resync.
    pub fn heartbeat(&self, node: &str, session: SessionId, h: &pb::Heartbeat, now: Instant) -> Result<(), StateError> {
        self.with_session(node, session, now, |e, _| match e.epoch {
            None => Err(StateError::NoSnapshot("heartbeat")),
            Some(epoch) if epoch != h.epoch || h.seq > e.seq => Err(StateError::NeedResync(format!(
                "heartbeat epoch {} seq {} is ahead of stored epoch {} seq {}",
                h.epoch, h.seq, epoch, e.seq
            ))),
            Some(_) => Ok(None),
        })
    }

    /// Marks any message as proof of life.
    pub fn touch(&self, node: &str, session: SessionId, now: Instant) -> Result<(), StateError> {
        self.with_session(node, session, now, |_, _| Ok(None))
    }

    /// Ends a session; its node keeps its last state, shown as disconnected, until forgotten.
    pub fn close_session(&self, node: &str, session: SessionId) {
        let mut nodes = self.write();
        if let Some(e) = nodes.by_name.get_mut(node)
            && e.session.as_ref().is_some_and(|s| s.id == session)
        {
            e.session = None;
            nodes.sync_row(node);
        }
    }

    fn connection(&self, e: &NodeEntry, now: Instant) -> Connection {
        match &e.session {
            None => Connection::Disconnected,
            Some(_) if now.saturating_duration_since(e.last_seen) >= self.stale_after => Connection::Stale,
            Some(_) => Connection::Connected,
        }
    }

    fn view(&self, name: &str, e: &NodeEntry, now: Instant) -> NodeView {
        NodeView {
            name: name.to_owned(),
            connection: self.connection(e, now),
            hello: e.hello.clone(),
            epoch: e.epoch.unwrap_or(0),
            seq: e.seq,
            last_report: e.last_report,
            last_report_age: now.saturating_duration_since(e.last_seen),
            peer: e.session.as_ref().map(|s| s.peer.clone()).unwrap_or_default(),
        }
    }

    /// Every node, sorted by name, with the parts of its state a summary needs.
    pub fn list<T>(&self, now: Instant, f: impl Fn(NodeView, &pb::NodeState) -> T) -> Vec<T> {
        let nodes = self.read();
        nodes.by_name.iter().map(|(n, e)| f(self.view(n, e, now), &e.state)).collect()
    }

    pub fn get(&self, name: &str, now: Instant) -> Option<(NodeView, pb::NodeState)> {
        let nodes = self.read();
        nodes.by_name.get(name).map(|e| (self.view(name, e, now), e.state.clone()))
    }

    /// Placement's view of the named nodes (every node when `names` is None), in name order
    /// for the whole cluster and in the given order otherwise. A name no agent reports comes
    /// back with `None`; a node that has not sent its first snapshot has `has_report` false.
    pub fn placement_view<T>(&self, now: Instant, names: Option<&[String]>, mut f: impl FnMut(&str, PlacementNode<'_>) -> T) -> Vec<T> {
        let nodes = self.read();
        let mut one = |name: &str, e: Option<&NodeEntry>| {
            let n = e.map(|e| PlacementNode {
                known: true,
                connection: self.connection(e, now),
                has_report: e.epoch.is_some(),
                facts: &nodes.index.row(e.row).facts,
            });
            f(name, n.unwrap_or(PlacementNode { known: false, connection: Connection::Disconnected, has_report: false, facts: &EMPTY }))
        };
        match names {
            Some(names) => names.iter().map(|n| one(n, nodes.by_name.get(n))).collect(),
            None => nodes.by_name.iter().map(|(n, e)| one(n, Some(e))).collect(),
        }
    }

    fn row_connection(&self, r: &Row, now: Instant) -> Connection {
        if !r.session {
            Connection::Disconnected
        } else if now.saturating_duration_since(r.last_seen) >= self.stale_after {
            Connection::Stale
        } else {
            Connection::Connected
        }
    }

    /// Scoring's walk: the named nodes in the given order, or every node in index order (not
    /// name order), each with the model's inverted-index entries looked up once for the call.
    pub fn placement_scan(
        &self,
        now: Instant,
        names: Option<&[String]>,
        model: (&(String, String), &str, &str, &str),
        mut f: impl FnMut(ScanNode<'_>, &ModelColumns<'_>),
    ) {
        let nodes = self.read();
        let (key, image, uri, name) = model;
        let cols = nodes.index.columns(key, image, uri, name);
        let mut emit = |name: &str, hit: Option<(RowId, &Row)>| {
            let n = match hit {
                Some((id, r)) => ScanNode {
                    name: &r.name,
                    row: id,
                    known: true,
                    connection: self.row_connection(r, now),
                    has_report: r.has_report,
                    hot: &r.hot,
                    facts: &r.facts,
                },
                None => ScanNode {
                    name,
                    row: RowId::MAX,
                    known: false,
                    connection: Connection::Disconnected,
                    has_report: false,
                    hot: &COLD,
                    facts: &EMPTY,
                },
            };
            f(n, &cols);
        };
        match names {
            None => nodes.index.rows().for_each(|(id, r)| emit(&r.name, Some((id, r)))),
            Some(names) => {
                for name in names {
                    emit(name, nodes.index.find(name));
                }
            }
        }
    }

    /// Calls `f` with the facts of every node that runs a replica of the model named `name`
    /// (by catalog name) or serving its cached weights `key`, each node once.
    pub fn with_runtimes_of(&self, name: &str, key: &(String, String), mut f: impl FnMut(&str, &NodeFacts)) {
        let nodes = self.read();
        for r in nodes.index.rows_running(name, key) {
            f(&r.name, &r.facts);
        }
    }

    /// Queues a command for a connected node's stream. Fails when the node has no session or
    /// its queue is full (backpressure: the caller retries or reports).
    pub fn send_command(&self, node: &str, cmd: pb::Command) -> Result<(), StateError> {
        let nodes = self.read();
        let s = nodes.by_name.get(node).and_then(|e| e.session.as_ref()).ok_or_else(|| StateError::Superseded { node: node.to_owned() })?;
        s.commands.try_send(cmd).map_err(|_| StateError::NeedResync(format!("command queue for node {node:?} is full or closed")))
    }

    /// Whether the node said in its Hello that it runs commands of this kind (e.g.
    /// "prefetch_image": an agent that has a container runtime to pull into).
    pub fn has_capability(&self, node: &str, capability: &str) -> bool {
        self.read().by_name.get(node).is_some_and(|e| e.hello.capabilities.iter().any(|c| c == capability))
    }

    /// Drops disconnected nodes not heard from within `forget_after`. Returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut guard = self.write();
        let nodes = &mut *guard;
        let before = nodes.by_name.len();
        let forget = self.forget_after;
        let mut freed = 0;
        let index = &mut nodes.index;
        nodes.by_name.retain(|_, e| {
            let keep = e.session.is_some() || now.saturating_duration_since(e.last_seen) < forget;
            if !keep {
                freed += e.state_bytes;
                index.remove(e.row);
            }
            keep
        });
        self.state_bytes.fetch_sub(freed, Ordering::Relaxed);
        before - nodes.by_name.len()
    }

    /// Node count by connection state, for metrics.
    pub fn counts(&self, now: Instant) -> [(Connection, u64); 3] {
        let nodes = self.read();
        let mut c = [(Connection::Connected, 0), (Connection::Stale, 0), (Connection::Disconnected, 0)];
        for e in nodes.by_name.values() {
            let i = match self.connection(e, now) {
                Connection::Connected => 0,
                Connection::Stale => 1,
                Connection::Disconnected => 2,
            };
            c[i].1 += 1;
        }
        c
    }

    /// Encoded size of all stored node states.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
pub(crate) mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node: &str, boot: &str) -> AgentHello {
        AgentHello {
            node_name: node.into(),
            boot_id: boot.into(),
            agent_version: "t".into(),
            api_version: hearth_proto::API_VERSION,
            capabilities: vec![],
            heartbeat_interval_ms: 1000,
        }
    }

    fn state() -> ClusterState {
        ClusterState::new(Duration::from_secs(15), Duration::from_secs(600))
    }

    fn open(s: &ClusterState, node: &str, now: Instant) -> Result<SessionId, StateError> {
        let (tx, _rx) = mpsc::channel(1);
        s.open_session(hello(node, "b"), "peer".into(), tx, now)
    }

    fn snapshot(epoch: u64, seq: u64, models: usize) -> pb::Snapshot {
        let models = (0..models).map(|i| pb::CachedModel { id: format!("m{i}"), ..Default::default() }).collect();
        pb::Snapshot { epoch, seq, state: Some(pb::NodeState { models, ..Default::default() }) }
    }

    #[test]
    fn second_live_session_is_refused_and_stale_one_taken_over() {
        let s = state();
        let t0 = Instant::now();
        let first = open(&s, "n1", t0).expect("first session");
        let err = open(&s, "n1", t0 + Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, StateError::DuplicateNode { .. }), "{err}");
        // After stale_after without a message, a new agent may take the node over, and the
        // old session's writes are refused from then on.
        let second = open(&s, "n1", t0 + Duration::from_secs(16)).expect("takeover of a stale session");
        assert_ne!(first, second);
        assert_eq!(
            s.apply_snapshot("n1", first, snapshot(1, 1, 0), t0 + Duration::from_secs(17)),
            Err(StateError::Superseded { node: "n1".into() })
        );
    }

    #[test]
    fn deltas_must_follow_the_stored_sequence() {
        let s = state();
        let t = Instant::now();
        let id = open(&s, "n1", t).expect("session");
        let d = |epoch, seq| pb::Delta { epoch, seq, model_removals: vec!["m0".into()], ..Default::default() };
        assert_eq!(s.apply_delta("n1", id, d(1, 2), t), Err(StateError::NoSnapshot("delta")));
        s.apply_snapshot("n1", id, snapshot(1, 1, 2), t).expect("snapshot");
        assert!(matches!(s.apply_delta("n1", id, d(1, 3), t), Err(StateError::NeedResync(_))));
        assert!(matches!(s.apply_delta("n1", id, d(2, 2), t), Err(StateError::NeedResync(_))));
        s.apply_delta("n1", id, d(1, 2), t).expect("in-order delta");
        let (view, st) = s.get("n1", t).expect("node");
        assert_eq!((view.epoch, view.seq), (1, 2));
        assert_eq!(st.models.len(), 1);
    }

    #[test]
    fn heartbeat_ahead_of_stored_seq_asks_for_resync() {
        let s = state();
        let t = Instant::now();
        let id = open(&s, "n1", t).expect("session");
        s.apply_snapshot("n1", id, snapshot(5, 10, 0), t).expect("snapshot");
        let hb = |seq| pb::Heartbeat { epoch: 5, seq, sent_at: None };
        s.heartbeat("n1", id, &hb(10), t).expect("in sync");
        assert!(matches!(s.heartbeat("n1", id, &hb(11), t), Err(StateError::NeedResync(_))));
    }

    #[test]
    fn connection_states_and_forgetting() {
        let s = state();
        let t0 = Instant::now();
        let id = open(&s, "n1", t0).expect("session");
        s.apply_snapshot("n1", id, snapshot(1, 1, 3), t0).expect("snapshot");
        assert!(s.state_bytes() > 0);
        assert_eq!(s.counts(t0)[0].1, 1);
        assert_eq!(s.counts(t0 + Duration::from_secs(20))[1].1, 1, "stale after 15s of silence");
        s.close_session("n1", id);
        assert_eq!(s.counts(t0)[2].1, 1);
        assert_eq!(s.sweep(t0 + Duration::from_secs(60)), 0, "kept within forget_after");
        assert_eq!(s.sweep(t0 + Duration::from_secs(601)), 1);
        assert_eq!(s.state_bytes(), 0);
        assert!(s.get("n1", t0).is_none());
    }
}
