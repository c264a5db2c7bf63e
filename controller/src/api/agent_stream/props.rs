//! Property tests of the stream handler: whatever message follows a Hello (any bytes that
//! decode, corrupted reports, well-formed reports in any order) is answered with an Ack of
//! its own sequence number or a Resync, or refused as InvalidArgument, and never panics.

use std::time::Duration;

use hearth_proto::prost::Message as _;
use proptest::prelude::*;
use proptest::sample::Index;
use tonic::Code;

use super::*;
use crate::state::props::{Floats, Report, one_node, report};

fn service(state: Arc<ClusterState>) -> NodeAgentService {
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default(), state.clone());
    NodeAgentService::new(
        state,
        metrics,
        true,
        super::super::auth::Auth::default(),
        Duration::from_secs(1),
        CancellationToken::new(),
        TaskTracker::new(),
        crate::leader::Leadership::always(),
    )
}

fn message(r: Report) -> pb::AgentMessage {
    let kind = match r {
        Report::Snapshot(s) => In::Snapshot(s),
        Report::Delta(d) => In::Delta(d),
        Report::Heartbeat(h) => In::Heartbeat(h),
    };
    pb::AgentMessage { kind: Some(kind) }
}

/// Any message the stream may carry after Hello, Hello and empty ones included.
fn any_message() -> BoxedStrategy<pb::AgentMessage> {
    let status = ("\\PC{0,8}", any::<i32>(), any::<f64>()).prop_map(|(command_id, phase, progress)| pb::AgentMessage {
        kind: Some(In::CommandStatus(pb::CommandStatus { command_id, phase, progress, ..Default::default() })),
    });
    prop_oneof![
        8 => report(Floats::Any).prop_map(message),
        1 => status,
        1 => Just(pb::AgentMessage { kind: Some(In::Hello(pb::Hello::default())) }),
        1 => Just(pb::AgentMessage { kind: None }),
    ]
    .boxed()
}

/// Wire bytes: random ones, or an encoded message with a few bytes overwritten.
fn wire() -> BoxedStrategy<Vec<u8>> {
    let corrupted = (any_message(), prop::collection::vec((any::<Index>(), any::<u8>()), 0..4)).prop_map(|(m, edits)| {
        let mut bytes = m.encode_to_vec();
        for (i, b) in edits {
            if !bytes.is_empty() {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
        }
        bytes
    });
    prop_oneof![1 => prop::collection::vec(any::<u8>(), 0..256), 3 => corrupted].boxed()
}

/// What `handle` must answer: an Ack of the message's own kind and sequence number or a
/// Resync for a report, an Ack for a command status, InvalidArgument for Hello or nothing.
fn check_answer(m: &pb::AgentMessage, got: &Result<Option<pb::ControllerMessage>, Status>) -> Result<(), TestCaseError> {
    let acked = |seq, kind: pb::AckedKind| Some(Out::Ack(pb::Ack { seq, kind: kind as i32 }));
    let reply = match got {
        Ok(Some(r)) => r.kind.clone(),
        Ok(None) => return Err(TestCaseError::fail(format!("no answer to {m:?}"))),
        Err(s) => {
            prop_assert!(matches!(m.kind, None | Some(In::Hello(_))), "{:?} refused: {:?}", m, s);
            prop_assert_eq!(s.code(), Code::InvalidArgument);
            return Ok(());
        }
    };
    let want = match &m.kind {
        Some(In::Snapshot(s)) => acked(s.seq, pb::AckedKind::Snapshot),
        Some(In::Delta(d)) => acked(d.seq, pb::AckedKind::Delta),
        Some(In::Heartbeat(h)) => acked(h.seq, pb::AckedKind::Heartbeat),
        Some(In::CommandStatus(_)) => acked(0, pb::AckedKind::CommandStatus),
        other => return Err(TestCaseError::fail(format!("{other:?} was not refused"))),
    };
    match reply {
        Some(Out::Resync(r)) => {
            prop_assert!(!matches!(m.kind, Some(In::Snapshot(_)) | Some(In::CommandStatus(_))), "resync for {:?}", m);
            prop_assert!(r.reason.starts_with("out of order: ") || r.reason.ends_with(" before a snapshot"), "{}", r.reason);
        }
        reply => prop_assert_eq!(reply, want),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_bytes_after_hello_are_answered_or_refused(frames in prop::collection::vec(wire(), 1..8)) {
        let (state, session, _) = one_node();
        let svc = service(state);
        for bytes in &frames {
            let Ok(m) = pb::AgentMessage::decode(bytes.as_slice()) else { continue };
            let got = svc.handle("n1", session, m.clone());
            check_answer(&m, &got)?;
        }
    }

    #[test]
    fn any_message_sequence_is_answered_in_order(messages in prop::collection::vec(any_message(), 1..12)) {
        let (state, session, _) = one_node();
        let svc = service(state.clone());
        for m in &messages {
            let got = svc.handle("n1", session, m.clone());
            check_answer(m, &got)?;
        }
        // The session survives everything a live agent can send.
        prop_assert!(state.get("n1", Instant::now()).is_some());
    }
}
