#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The controller's front door over real mTLS on loopback: who gets in, who is refused and
//! how that is counted, and what a bad message does to one stream and to everyone else.

use std::time::Duration;

use anyhow::Result;
use bytes::BufMut;
use hearth_proto::prost::Message;
use hearth_proto::v1::{self as pb, agent_message::Kind as Out, controller_message::Kind as In};
use hearth_tests::*;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

struct Env {
    _dir: tempfile::TempDir,
    pki: TestPki,
    ctl: hearth_controller::Running,
    stop: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn env() -> Result<Env> {
    env_with(|_| {}).await
}

async fn env_with(tweak: impl FnOnce(&mut hearth_controller::config::RawConfig)) -> Result<Env> {
    hearth_service::telemetry::init_logging(Default::default(), "warn");
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), tweak).await?;
    Ok(Env { _dir: dir, pki, ctl, stop })
}

impl Env {
    async fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(self.ctl.http_addr, "/metrics").await.expect("scrape controller");
        metric_value(&body, series).unwrap_or(0.0)
    }

    async fn agent_channel(&self, node: &str) -> Result<tonic::transport::Channel> {
        channel(self.ctl.grpc_addr, Some(&self.pki.client_material(node)?)).await
    }
}

fn snapshot(seq: u64) -> Out {
    Out::Snapshot(pb::Snapshot {
        epoch: 7,
        seq,
        state: Some(pb::NodeState { accelerators: vec![pb::Accelerator::h100(0)], ..Default::default() }),
    })
}

#[tokio::test]
async fn matching_certificate_connects_and_snapshot_and_delta_are_acked() -> Result<()> {
    let e = env().await?;
    let mut a = RawAgent::connect(e.agent_channel("node-a").await?, "node-a").await?;
    a.send(snapshot(1)).await?;
    assert!(matches!(a.next().await?.kind, Some(In::Ack(pb::Ack { seq: 1, .. }))));
    a.send(Out::Delta(pb::Delta {
        epoch: 7,
        seq: 2,
        model_upserts: vec![pb::CachedModel { id: "m".into(), ..Default::default() }],
        ..Default::default()
    }))
    .await?;
    assert!(matches!(a.next().await?.kind, Some(In::Ack(pb::Ack { seq: 2, .. }))));
    let nodes = list_nodes(e.ctl.grpc_addr, &e.pki.client_material("operator")?).await?;
    assert_eq!(nodes.len(), 1);
    assert_eq!((nodes[0].name.as_str(), nodes[0].seq, nodes[0].cached_models), ("node-a", 2, 1));
    assert_eq!(nodes[0].accelerator_summary, vec!["1 x NVIDIA H100 80GB HBM3".to_string()]);
    assert_eq!(e.metric("hearth_controller_connected_agents").await, 1.0);
    Ok(())
}

#[tokio::test]
async fn certificate_for_another_node_is_refused_and_counted() -> Result<()> {
    let e = env().await?;
    let err = RawAgent::connect(e.agent_channel("node-a").await?, "node-b").await.err().expect("must be refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not valid for node \"node-b\""), "{}", err.message());
    assert_eq!(e.metric("hearth_controller_sessions_refused_total{reason=\"identity_mismatch\"}").await, 1.0);
    assert!(list_nodes(e.ctl.grpc_addr, &e.pki.client_material("operator")?).await?.is_empty());
    Ok(())
}

/// The chart's DaemonSet shares one agent certificate: listed in `auth.fleet_agents`, its
/// identity may report as any node; any other certificate still must name its node.
#[tokio::test]
async fn a_fleet_agent_identity_reports_as_any_node_and_others_still_must_match() -> Result<()> {
    let e = env_with(|raw| raw.auth.fleet_agents.push("hearth-agent".into())).await?;
    let mut a = RawAgent::connect(e.agent_channel("hearth-agent").await?, "ip-10-0-3-7.ec2.internal").await?;
    a.send(snapshot(1)).await?;
    assert!(matches!(a.next().await?.kind, Some(In::Ack(pb::Ack { seq: 1, .. }))));
    let err = RawAgent::connect(e.agent_channel("node-a").await?, "node-b").await.err().expect("must be refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let e2 = env().await?;
    let err = RawAgent::connect(e2.agent_channel("hearth-agent").await?, "node-c").await.err().expect("not a fleet identity by default");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    Ok(())
}

#[tokio::test]
async fn connection_without_client_certificate_is_refused_and_counted() -> Result<()> {
    let e = env().await?;
    let ch =
        tonic::transport::Endpoint::from_shared(format!("https://{}", e.ctl.grpc_addr))?.tls_config(e.pki.ca_only())?.connect().await?;
    let err = RawAgent::connect(ch.clone(), "node-a").await.err().expect("must be refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("no client certificate"), "{}", err.message());
    assert_eq!(e.metric("hearth_controller_sessions_refused_total{reason=\"no_certificate\"}").await, 1.0);
    // The read API is closed to it as well.
    let err = pb::operator_client::OperatorClient::new(ch).list_nodes(pb::ListNodesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    Ok(())
}

async fn refused_in_handshake(e: &Env, tls: hearth_proto::transport::TlsMaterial, reason: &str) -> Result<()> {
    // With TLS 1.3 the client learns of the refusal on first use, so try a whole call.
    let outcome = async {
        let ch = channel(e.ctl.grpc_addr, Some(&tls)).await?;
        RawAgent::connect(ch, "node-a").await.map_err(anyhow::Error::from)
    }
    .await;
    assert!(outcome.is_err(), "a {reason} certificate must not get a session");
    let series = format!("hearth_controller_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    wait_for(&series, Duration::from_secs(5), || async { Ok((e.metric(&series).await >= 1.0).then_some(())) }).await?;
    assert!(list_nodes(e.ctl.grpc_addr, &e.pki.client_material("operator")?).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn expired_certificate_is_refused_in_the_handshake() -> Result<()> {
    let e = env().await?;
    refused_in_handshake(&e, e.pki.expired_client_material("node-a")?, "expired").await
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused_in_the_handshake() -> Result<()> {
    let e = env().await?;
    refused_in_handshake(&e, e.pki.foreign_client_material("node-a")?, "untrusted").await
}

#[tokio::test]
async fn second_agent_claiming_the_same_node_is_refused() -> Result<()> {
    let e = env().await?;
    let mut first = RawAgent::connect(e.agent_channel("node-a").await?, "node-a").await?;
    let err = RawAgent::connect(e.agent_channel("node-a").await?, "node-a").await.err().expect("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("already has a live session"), "{}", err.message());
    assert_eq!(e.metric("hearth_controller_sessions_refused_total{reason=\"duplicate_node\"}").await, 1.0);
    first.send(snapshot(1)).await?;
    assert!(matches!(first.next().await?.kind, Some(In::Ack(_))), "the first session is untouched");
    Ok(())
}

#[tokio::test]
async fn out_of_order_delta_asks_for_resync_and_keeps_the_state() -> Result<()> {
    let e = env().await?;
    let mut a = RawAgent::connect(e.agent_channel("node-a").await?, "node-a").await?;
    a.send(snapshot(1)).await?;
    a.next().await?;
    a.send(Out::Delta(pb::Delta { epoch: 7, seq: 5, ..Default::default() })).await?;
    match a.next().await?.kind {
        Some(In::Resync(r)) => assert!(r.reason.contains("seq 5 does not follow"), "{}", r.reason),
        other => panic!("expected Resync, got {other:?}"),
    }
    assert_eq!(e.metric("hearth_controller_resyncs_total").await, 1.0);
    Ok(())
}

/// Sends raw bytes as gRPC messages, to put malformed and oversized frames on the wire.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

struct ReplyDecoder;

impl Decoder for ReplyDecoder {
    type Item = pb::ControllerMessage;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::ControllerMessage>, tonic::Status> {
        pb::ControllerMessage::decode(src).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::ControllerMessage;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

/// Sends Hello then `bad`; returns the status the stream ended with.
async fn send_raw(ch: tonic::transport::Channel, node: &str, bad: Vec<u8>) -> Result<tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch).max_encoding_message_size(64 << 20);
    grpc.ready().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(node).encode_to_vec()).await?;
    tx.send(bad).await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/hearth.v1.NodeAgent/Connect");
    let req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut inbound = grpc.streaming(req, path, RawCodec).await?.into_inner();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("stream ended without an error status"),
            Err(status) => {
                drop(tx);
                return Ok(status);
            }
        }
    }
}

#[tokio::test]
async fn malformed_and_oversized_messages_end_only_their_stream() -> Result<()> {
    let e = env_with(|c| c.max_message_size = "64Ki".into()).await?;
    let mut good = RawAgent::connect(e.agent_channel("good").await?, "good").await?;

    let garbage = vec![0xff; 64];
    let st = send_raw(e.agent_channel("bad-a").await?, "bad-a", garbage).await?;
    assert_eq!(st.code(), Code::Internal, "{st:?}");
    wait_for("malformed counted", Duration::from_secs(5), || async {
        Ok((e.metric("hearth_controller_stream_errors_total{reason=\"malformed\"}").await == 1.0).then_some(()))
    })
    .await?;

    let huge = pb::AgentMessage {
        kind: Some(Out::Snapshot(pb::Snapshot {
            epoch: 1,
            seq: 1,
            state: Some(pb::NodeState {
                info: Some(pb::NodeInfo { hostname: "x".repeat(200 * 1024), ..Default::default() }),
                ..Default::default()
            }),
        })),
    };
    let st = send_raw(e.agent_channel("bad-b").await?, "bad-b", huge.encode_to_vec()).await?;
    assert!(matches!(st.code(), Code::OutOfRange | Code::ResourceExhausted), "{st:?}");
    assert!(st.message().contains("message length too large"), "{}", st.message());
    wait_for("oversize counted", Duration::from_secs(5), || async {
        Ok((e.metric("hearth_controller_stream_errors_total{reason=\"too_large\"}").await == 1.0).then_some(()))
    })
    .await?;

    // Everyone else carries on.
    good.send(snapshot(1)).await?;
    assert!(matches!(good.next().await?.kind, Some(In::Ack(pb::Ack { seq: 1, .. }))));
    let nodes = list_nodes(e.ctl.grpc_addr, &e.pki.client_material("operator")?).await?;
    let good_node = nodes.iter().find(|n| n.name == "good").expect("good node listed");
    assert_eq!(good_node.connection, pb::NodeConnection::Connected as i32);
    Ok(())
}

#[tokio::test]
async fn first_message_must_be_a_valid_hello() -> Result<()> {
    let e = env().await?;
    let ch = e.agent_channel("node-a").await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage { kind: Some(snapshot(1)) }).await?;
    let err = pb::node_agent_client::NodeAgentClient::new(ch)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "expected Hello as the first message, got Snapshot");

    let mut bad = hello("node-a");
    if let Some(Out::Hello(h)) = bad.kind.as_mut() {
        h.api_version = 9;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bad).await?;
    let err = pb::node_agent_client::NodeAgentClient::new(e.agent_channel("node-a").await?)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(err.message(), "Hello.api_version: this controller speaks API version 1, the agent speaks 9");
    Ok(())
}

#[tokio::test]
async fn health_is_served() -> Result<()> {
    let e = env().await?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(e.agent_channel("any").await?);
    let r = h.check(tonic_health::pb::HealthCheckRequest { service: "hearth.v1.NodeAgent".into() }).await?.into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    Ok(())
}

#[tokio::test]
async fn reflection_lists_the_hearth_services() -> Result<()> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };
    let e = env().await?;
    let mut c = ServerReflectionClient::new(e.agent_channel("any").await?);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut resp = c.server_reflection_info(tokio_stream::iter(vec![req])).await?.into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message().await?.and_then(|r| r.message_response) else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["hearth.v1.NodeAgent", "hearth.v1.Operator", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    Ok(())
}
