//! `hearth call`: any RPC of the controller's APIs (Placement, Scaling, the KEDA external
//! scaler, Operator) with a proto3 JSON request in and proto3 JSON out, the way grpcurl
//! prints it (lowerCamelCase names, zero values left out, 64-bit integers as strings). The
//! messages are read and written through the descriptor set the controller serves for
//! reflection, so every method of every service works with no code per method. Like
//! `hearth status`, it reaches a running `hearth local` with no flags.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, SerializeOptions};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use crate::status::StatusArgs;

#[derive(Debug, Clone)]
pub struct CallArgs {
    /// `hearth.v1.Placement/Score` (or `hearth.v1.Placement.Score`).
    pub method: Option<String>,
    /// The request as proto3 JSON; empty means `{}`.
    pub data: String,
    /// Stop a server stream after this many messages.
    pub max_messages: Option<u64>,
    /// Stop after this long (a stream otherwise runs until the controller ends it).
    pub max_time: Option<Duration>,
    pub conn: StatusArgs,
}

fn pool() -> anyhow::Result<DescriptorPool> {
    DescriptorPool::decode(hearth_proto::FILE_DESCRIPTOR_SET).context("decoding the built-in descriptor set")
}

/// Every callable method, one `service/method` a line, with its streaming kind.
pub fn list() -> anyhow::Result<String> {
    let mut out = String::new();
    for s in pool()?.services() {
        for m in s.methods() {
            let kind = match (m.is_client_streaming(), m.is_server_streaming()) {
                (false, false) => "",
                (false, true) => "  (server stream)",
                (true, false) => "  (client stream)",
                (true, true) => "  (bidirectional stream)",
            };
            out.push_str(&format!("{}/{}{kind}\n", s.full_name(), m.name()));
        }
    }
    Ok(out)
}

fn find(pool: &DescriptorPool, name: &str) -> anyhow::Result<MethodDescriptor> {
    let (service, method) = name
        .split_once('/')
        .or_else(|| name.rsplit_once('.'))
        .with_context(|| format!("method: expected SERVICE/METHOD like hearth.v1.Placement/Score, got {name:?}"))?;
    let Some(s) = pool.get_service_by_name(service) else {
        let known: Vec<String> = pool.services().map(|s| s.full_name().to_owned()).collect();
        bail!("method {name:?}: no service {service:?} (services: {})", known.join(", "));
    };
    let found = s.methods().find(|m| m.name() == method);
    found.with_context(|| {
        let known: Vec<String> = s.methods().map(|m| m.name().to_owned()).collect();
        format!("method {name:?}: {service} has no method {method:?} (methods: {})", known.join(", "))
    })
}

/// Builds the request message from JSON, naming the method's input type in errors.
pub fn request(method: &MethodDescriptor, json: &str) -> anyhow::Result<DynamicMessage> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize(method.input(), &mut de)
        .with_context(|| format!("-d: expected a JSON {} for {}", method.input().full_name(), method.full_name()))?;
    de.end().with_context(|| format!("-d: trailing characters after the JSON {}", method.input().full_name()))?;
    Ok(msg)
}

/// One response as grpcurl prints it.
pub fn render(msg: &DynamicMessage) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b"  "));
    msg.serialize_with_options(&mut ser, &SerializeOptions::new())?;
    Ok(String::from_utf8(out)?)
}

/// Calls the method and prints each response; a server stream prints one JSON object per
/// message until it ends, `max_messages` or `max_time`.
pub async fn run(a: CallArgs) -> anyhow::Result<()> {
    let Some(name) = &a.method else {
        print!("{}", list()?);
        return Ok(());
    };
    let pool = pool()?;
    let method = find(&pool, name)?;
    if method.is_client_streaming() {
        bail!("{}: client-streaming methods are for agents, not for the command line", method.full_name());
    }
    let body = request(&method, &a.data)?.encode_to_vec();
    let unary_timeout = if method.is_server_streaming() { None } else { Some(a.max_time.unwrap_or(Duration::from_secs(30))) };
    let (url, channel) = crate::status::connect(&a.conn, unary_timeout).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.with_context(|| format!("connecting to the controller at {url}"))?;
    let path = PathAndQuery::try_from(format!("/{}/{}", method.parent_service().full_name(), method.name()))?;
    let status_err = |s: tonic::Status| anyhow::anyhow!("{} answered {:?}: {}", method.full_name(), s.code(), s.message());
    let decode = |bytes: Vec<u8>| DynamicMessage::decode(method.output(), bytes.as_slice()).context("decoding the answer");
    if !method.is_server_streaming() {
        let resp = grpc.unary(tonic::Request::new(body), path, RawCodec).await.map_err(status_err)?;
        println!("{}", render(&decode(resp.into_inner())?)?);
        return Ok(());
    }
    let mut stream = grpc.server_streaming(tonic::Request::new(body), path, RawCodec).await.map_err(status_err)?.into_inner();
    let mut seen = 0u64;
    let deadline = a.max_time.map(|t| tokio::time::Instant::now() + t);
    while a.max_messages.is_none_or(|m| seen < m) {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.message()).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => stream.message().await,
        };
        let Some(bytes) = next.map_err(status_err)? else { break };
        println!("{}", render(&decode(bytes)?)?);
        seen += 1;
    }
    Ok(())
}

/// Passes encoded messages through unchanged: the dynamic messages encode themselves.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_is_listed_and_methods_are_found_either_way() {
        let l = list().unwrap();
        for m in ["hearth.v1.Placement/Score", "hearth.v1.Scaling/Watch  (server stream)", "externalscaler.ExternalScaler/GetMetrics"] {
            assert!(l.contains(m), "{m} missing from:\n{l}");
        }
        let p = pool().unwrap();
        assert_eq!(find(&p, "hearth.v1.Placement/Score").unwrap().full_name(), "hearth.v1.Placement.Score");
        assert_eq!(find(&p, "hearth.v1.Placement.Score").unwrap().full_name(), "hearth.v1.Placement.Score");
        let e = find(&p, "hearth.v1.Placement/Scor").unwrap_err().to_string();
        assert!(e.contains("has no method \"Scor\"") && e.contains("Score"), "{e}");
    }

    #[test]
    fn requests_take_either_name_and_bad_json_names_the_type() {
        let p = pool().unwrap();
        let m = find(&p, "hearth.v1.Placement/Reserve").unwrap();
        let a = request(&m, r#"{"request_id": "pod-1", "model": "m"}"#).unwrap();
        let b = request(&m, r#"{"requestId": "pod-1", "model": "m"}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(render(&a).unwrap(), "{\n  \"requestId\": \"pod-1\",\n  \"model\": \"m\"\n}");
        let e = format!("{:#}", request(&m, r#"{"modle": "m"}"#).unwrap_err());
        assert!(e.contains("expected a JSON hearth.v1.ReserveRequest"), "{e}");
    }
}
