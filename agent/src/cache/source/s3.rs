//! S3 (and S3-compatible stores) as a source, through the official AWS SDK.
//!
//! Why the SDK and not `object_store`: nodes get credentials in every way AWS offers
//! (environment, shared profile with `AWS_PROFILE`, web identity for IRSA, EKS Pod Identity's
//! container endpoint, IMDSv2), and `aws-config` implements that whole chain as AWS does;
//! `object_store` has no shared-profile support and does not surface the object checksums
//! (`x-amz-checksum-crc64nvme` and friends) that let us verify without a manifest. The cost is
//! compile time, kept down by leaving out SSO and using rustls on ring.
//!
//! Retries belong to the download engine (it knows about parts, hedging and throttling), so
//! the SDK's own retries are off for reads; listing gets a few SDK retries.

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{ChecksumMode, ChecksumType};

use super::{BoxFut, Checked, ErrorKind, RemoteObject, Source, SourceError};
use crate::cache::buf::AlignedBuf;
use crate::cache::verify::{self, VerificationKind, Vouched};

/// How to reach the store, beyond what the standard AWS environment and files say.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// A custom endpoint (S3-compatible store, VPC endpoint). `AWS_ENDPOINT_URL_S3` and
    /// `AWS_ENDPOINT_URL` are honoured without this.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing; defaults to on with a custom endpoint, off for AWS.
    pub force_path_style: Option<bool>,
}

const LIST_ATTEMPTS: u32 = 8;
/// A page of 1,000 keys plus the HEADs for them: seconds at worst on a healthy store.
const LIST_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct S3Source {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

fn custom_endpoint_from_env() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"].iter().find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
}

impl S3Source {
    pub async fn new(bucket: &str, prefix: &str, opts: &S3Options) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if let Some(r) = &opts.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let sdk = loader.load().await;
        let endpoint = opts.endpoint.clone().or_else(custom_endpoint_from_env);
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(aws_sdk_s3::config::timeout::TimeoutConfig::builder().connect_timeout(Duration::from_secs(5)).build());
        if let Some(ep) = &endpoint {
            b = b.endpoint_url(ep);
        }
        b = b.force_path_style(opts.force_path_style.unwrap_or(endpoint.is_some()));
        if sdk.region().is_none() {
            // S3-compatible stores ignore the region but SigV4 needs one.
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        Self { client: aws_sdk_s3::Client::from_conf(b.build()), bucket: bucket.to_owned(), prefix: prefix.to_owned() }
    }

    fn source_name(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    fn classify<E>(err: &SdkError<E, HttpResponse>) -> (ErrorKind, String)
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = match err {
            SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
            _ => None,
        };
        let code = err.code().unwrap_or("").to_owned();
        let msg = match (&code[..], err.message()) {
            // The SDK's own context printer ends in its Debug form; the chain of messages says
            // the same in words.
            ("", None) => hearth_service::telemetry::describe_error(err),
            (c, m) => format!("{c} {}", m.unwrap_or("")).trim().to_owned(),
        };
        let kind = match (status, code.as_str()) {
            (_, "SlowDown" | "Throttling" | "ThrottlingException" | "RequestLimitExceeded") | (Some(503 | 429), _) => ErrorKind::Throttled,
            (Some(403 | 404 | 412 | 416), _) | (_, "NoSuchKey" | "NoSuchBucket" | "AccessDenied" | "PreconditionFailed") => {
                ErrorKind::Permanent
            }
            _ => ErrorKind::Transient,
        };
        (kind, msg)
    }

    async fn head(&self, key: &str, size: u64, etag: String) -> Result<RemoteObject, SourceError> {
        let full = format!("{}{key}", self.prefix);
        let out =
            self.client.head_object().bucket(&self.bucket).key(&full).checksum_mode(ChecksumMode::Enabled).send().await.map_err(|e| {
                let (_, reason) = Self::classify(&e);
                SourceError::List { source_name: self.source_name(), what: full.clone(), reason }
            })?;
        let vouched = full_object_checksum(out.checksum_type(), out.checksum_crc64_nvme(), out.checksum_crc32_c(), out.checksum_sha256());
        let version = out.version_id().map_or(etag.clone(), |v| format!("{etag}@{v}"));
        Ok(RemoteObject { key: key.to_owned(), size: out.content_length().map_or(size, |l| l as u64), version, vouched })
    }

    async fn list_all(&self) -> Result<Vec<RemoteObject>, SourceError> {
        let mut listed = Vec::new();
        let mut token = None;
        loop {
            let mut req = self.client.list_objects_v2().bucket(&self.bucket).prefix(&self.prefix);
            if let Some(t) = token.take() {
                req = req.continuation_token(t);
            }
            let out = req.send().await.map_err(|e| {
                let (kind, reason) = Self::classify(&e);
                if kind == ErrorKind::Permanent && e.code() == Some("AccessDenied") {
                    SourceError::Denied { source_name: self.source_name(), reason }
                } else {
                    SourceError::List { source_name: self.source_name(), what: format!("prefix {:?}", self.prefix), reason }
                }
            })?;
            for o in out.contents() {
                let Some(key) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                if key.is_empty() || key.ends_with('/') {
                    continue;
                }
                let etag = o.e_tag().unwrap_or("").trim_matches('"').to_owned();
                listed.push(RemoteObject { key: key.to_owned(), size: o.size().unwrap_or(0) as u64, version: etag, vouched: None });
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        // No HEAD here: a checksum costs a request per object, which on a repository of a
        // thousand small files is most of what a prefetch would wait for before its first
        // byte. Objects read in several parts get theirs from `checksums`; the others from
        // the GET that reads them whole.
        Ok(listed)
    }

    /// HEADs every object for its checksum, 16 at a time; the order is kept.
    async fn head_all(&self, objs: &[RemoteObject]) -> Result<Vec<RemoteObject>, SourceError> {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let mut set = tokio::task::JoinSet::new();
        for (i, o) in objs.iter().enumerate() {
            // The listing's version is the ETag alone: HEAD adds the version id, if any.
            let (key, size, etag) = (o.key.clone(), o.size, o.version.clone());
            let me = self.clone();
            let sem = sem.clone();
            set.spawn(async move {
                let _p = sem.acquire().await;
                me.head(&key, size, etag).await.map(|o| (i, o))
            });
        }
        let mut out = Vec::with_capacity(set.len());
        while let Some(r) = set.join_next().await {
            let r = r.map_err(|e| SourceError::List { source_name: self.source_name(), what: "HEAD".into(), reason: e.to_string() })?;
            out.push(r?);
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, o)| o).collect())
    }

    /// Retries a listing step as patiently as parts are retried, never waiting on one
    /// stalled attempt; access denied is final.
    async fn patiently<T, F: Future<Output = Result<T, SourceError>>>(&self, what: &str, f: impl Fn() -> F) -> Result<T, SourceError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let r = match tokio::time::timeout(LIST_ATTEMPT_TIMEOUT, f()).await {
                Ok(r) => r,
                Err(_) => Err(SourceError::List {
                    source_name: self.source_name(),
                    what: what.to_owned(),
                    reason: format!("no answer within {LIST_ATTEMPT_TIMEOUT:?}"),
                }),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if attempt < LIST_ATTEMPTS && !matches!(e, SourceError::Denied { .. }) => {
                    let delay = hearth_service::retry::jittered(Duration::from_millis(100), Duration::from_secs(5), attempt);
                    tracing::debug!(error = %e, attempt, ?delay, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read(&self, obj: &RemoteObject, offset: u64, buf: &mut [u8]) -> Result<Checked, SourceError> {
        let len = buf.len();
        let key = format!("{}{}", self.prefix, obj.key);
        let err =
            |kind, reason: String| SourceError::Read { source_name: self.source_name(), key: obj.key.clone(), offset, len, reason, kind };
        if len == 0 {
            return Ok(None);
        }
        // An object read in one request whose checksum nobody fetched: S3 returns the
        // full-object checksum with a whole-object GET (never with a range), so the read checks
        // it and no HEAD is needed.
        let whole = offset == 0 && len as u64 == obj.size && obj.vouched.is_none();
        let mut req = self.client.get_object().bucket(&self.bucket).key(&key);
        req = if whole {
            req.checksum_mode(ChecksumMode::Enabled)
        } else {
            req.range(format!("bytes={}-{}", offset, offset + len as u64 - 1))
        };
        // The object must not change between parts: a new upload fails the precondition.
        let etag = obj.version.split('@').next().unwrap_or("");
        if !etag.is_empty() {
            req = req.if_match(format!("\"{etag}\""));
        }
        let out = req.send().await.map_err(|e| {
            let (kind, reason) = Self::classify(&e);
            let reason = if e.code() == Some("PreconditionFailed") {
                "object changed during the download (ETag no longer matches)".to_owned()
            } else {
                reason
            };
            err(kind, reason)
        })?;
        let checksum = if whole {
            full_object_checksum(out.checksum_type(), out.checksum_crc64_nvme(), out.checksum_crc32_c(), out.checksum_sha256())
        } else {
            None
        };
        let mut body = out.body;
        let mut filled = 0usize;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| err(ErrorKind::Transient, format!("body: {e}")))?;
            let end = filled + chunk.len();
            if end > len {
                return Err(err(ErrorKind::Transient, format!("server sent more than the {len} bytes asked for")));
            }
            buf[filled..end].copy_from_slice(&chunk);
            filled = end;
        }
        if filled != len {
            return Err(err(ErrorKind::Transient, format!("short body: {filled} of {len} bytes")));
        }
        let Some(v) = checksum else { return Ok(None) };
        let mut d = verify::Digester::new(&v.expected, len as u64);
        d.update(buf);
        // Bytes that do not match the store's own checksum were damaged on the way: read again.
        d.finish().map_err(|e| err(ErrorKind::Transient, format!("{e} (the object's own checksum, on a whole-object GET)")))?;
        Ok(Some(v))
    }
}

/// The object's full-object checksum, from a HEAD or a whole-object GET. A multipart upload's
/// composite checksum is a checksum of part checksums, which no digest of the whole object
/// equals: it is not used.
fn full_object_checksum(
    kind: Option<&ChecksumType>,
    crc64nvme: Option<&str>,
    crc32c: Option<&str>,
    sha256: Option<&str>,
) -> Option<Vouched> {
    if kind == Some(&ChecksumType::Composite) {
        return None;
    }
    [("CRC64NVME", crc64nvme), ("CRC32C", crc32c), ("SHA256", sha256)].iter().find_map(|(alg, v)| {
        v.and_then(|v| verify::parse_s3_checksum(alg, v).ok()).map(|expected| Vouched { expected, kind: VerificationKind::Checksum })
    })
}

impl Source for S3Source {
    fn name(&self) -> String {
        self.source_name()
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
        Box::pin(async move { self.patiently(&format!("prefix {:?}", self.prefix), || self.list_all()).await })
    }

    fn checksums(&self, objs: Vec<RemoteObject>) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
        Box::pin(async move {
            if objs.is_empty() {
                return Ok(objs);
            }
            let objs = &objs;
            self.patiently("HEAD", || self.head_all(objs)).await
        })
    }

    fn read_into<'a>(
        &'a self,
        obj: &'a RemoteObject,
        offset: u64,
        mut buf: AlignedBuf,
    ) -> BoxFut<'a, (AlignedBuf, Result<Checked, SourceError>)> {
        Box::pin(async move {
            let r = self.read(obj, offset, buf.as_mut_slice()).await;
            (buf, r)
        })
    }
}
