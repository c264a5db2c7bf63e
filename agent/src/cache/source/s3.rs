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

use super::{BoxFut, ErrorKind, RemoteObject, Source, SourceError};
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
/// Objects HEADed to find out whether a store that lists no checksum algorithms has checksums.
const HEAD_SAMPLE: usize = 3;
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
        // A multipart upload's composite checksum is a checksum of part checksums, which no
        // digest of the whole object equals: only full-object checksums are used.
        let composite = out.checksum_type() == Some(&ChecksumType::Composite);
        let candidates = [("CRC64NVME", out.checksum_crc64_nvme()), ("CRC32C", out.checksum_crc32_c()), ("SHA256", out.checksum_sha256())];
        let vouched = if composite {
            None
        } else {
            candidates.iter().find_map(|(alg, v)| {
                v.and_then(|v| verify::parse_s3_checksum(alg, v).ok())
                    .map(|expected| Vouched { expected, kind: VerificationKind::Checksum })
            })
        };
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
                listed.push((key.to_owned(), o.size().unwrap_or(0) as u64, etag, !o.checksum_algorithm().is_empty()));
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        // A checksum comes only from HEAD, one request per object: on a repository of a
        // thousand small files that is most of what a prefetch waits for before its first byte.
        // So HEAD only the objects that have one. AWS S3 lists each object's checksum
        // algorithm. A store that lists none either has no checksums or does not say: HEAD the
        // few largest objects, and if any has a checksum, HEAD them all.
        let mut head: Vec<bool> = listed.iter().map(|l| l.3).collect();
        if !head.iter().any(|&h| h) {
            let mut by_size: Vec<usize> = (0..listed.len()).collect();
            by_size.sort_by_key(|&i| std::cmp::Reverse(listed[i].1));
            let sample: Vec<usize> = by_size.into_iter().take(HEAD_SAMPLE).collect();
            let found = self.head_all(&listed, &sample).await?;
            if found.iter().any(|(_, o)| o.vouched.is_some()) {
                head = vec![true; listed.len()];
            }
        }
        let wanted: Vec<usize> = (0..listed.len()).filter(|&i| head[i]).collect();
        tracing::debug!(listed = listed.len(), with_listed_checksum = listed.iter().filter(|l| l.3).count(), heads = wanted.len(), "listing done");
        let mut headed: std::collections::HashMap<usize, RemoteObject> = self.head_all(&listed, &wanted).await?.into_iter().collect();
        Ok(listed
            .into_iter()
            .enumerate()
            .map(|(i, (key, size, etag, _))| {
                headed.remove(&i).unwrap_or(RemoteObject { key, size, version: etag, vouched: None })
            })
            .collect())
    }

    /// HEADs the listed objects at `which`, 16 at a time.
    async fn head_all(&self, listed: &[(String, u64, String, bool)], which: &[usize]) -> Result<Vec<(usize, RemoteObject)>, SourceError> {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let mut set = tokio::task::JoinSet::new();
        for &i in which {
            let (key, size, etag, _) = listed[i].clone();
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
        Ok(out)
    }

    async fn read(&self, obj: &RemoteObject, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len();
        let key = format!("{}{}", self.prefix, obj.key);
        let err =
            |kind, reason: String| SourceError::Read { source_name: self.source_name(), key: obj.key.clone(), offset, len, reason, kind };
        if len == 0 {
            return Ok(());
        }
        let mut req =
            self.client.get_object().bucket(&self.bucket).key(&key).range(format!("bytes={}-{}", offset, offset + len as u64 - 1));
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
        Ok(())
    }
}

impl Source for S3Source {
    fn name(&self) -> String {
        self.source_name()
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
        Box::pin(async move {
            // Listing meets the same throttles, resets and stalls as the parts do: retry it
            // as patiently, and never wait on one stalled attempt.
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let r = match tokio::time::timeout(LIST_ATTEMPT_TIMEOUT, self.list_all()).await {
                    Ok(r) => r,
                    Err(_) => Err(SourceError::List {
                        source_name: self.source_name(),
                        what: format!("prefix {:?}", self.prefix),
                        reason: format!("no answer within {LIST_ATTEMPT_TIMEOUT:?}"),
                    }),
                };
                match r {
                    Ok(v) => return Ok(v),
                    Err(e) if attempt < LIST_ATTEMPTS && !matches!(e, SourceError::Denied { .. }) => {
                        let delay = hearth_service::retry::jittered(Duration::from_millis(100), Duration::from_secs(5), attempt);
                        tracing::debug!(error = %e, attempt, ?delay, "listing failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    fn read_into<'a>(
        &'a self,
        obj: &'a RemoteObject,
        offset: u64,
        mut buf: AlignedBuf,
    ) -> BoxFut<'a, (AlignedBuf, Result<(), SourceError>)> {
        Box::pin(async move {
            let r = self.read(obj, offset, buf.as_mut_slice()).await;
            (buf, r)
        })
    }
}
