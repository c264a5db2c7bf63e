//! Verifying downloaded model-weight files against what their source vouches for.
//!
//! Owns: parsing S3 `x-amz-checksum-*` values, the streaming digester that checks a file's
//! size and digest as it is written, the `hearth-manifest.json` format, and the sanity check
//! of a safetensors header. It reads local files only to build a manifest; fetching, placing
//! and evicting files belong to the rest of the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use sha2::Digest as _;

/// File name of the per-model manifest at the root of a model directory.
pub const MANIFEST_NAME: &str = "hearth-manifest.json";

/// No real model has a bigger header; the cap bounds what a corrupt length makes us read.
const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;
/// Large reads keep hashing multi-GiB shards bound by the hash, not by syscalls.
const READ_CHUNK: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not fatal: the caller falls back to a manifest or to size only.
    #[error("S3 checksum algorithm {0:?}: expected CRC64NVME, CRC32C or SHA256")]
    UnsupportedAlgorithm(String),
    /// A checksum of part checksums, which no digest of the whole object equals.
    #[error("S3 {algorithm} checksum {value:?} is a multipart composite, not a full-object one")]
    Composite { algorithm: String, value: String },
    #[error("S3 {algorithm} checksum {value:?}: expected base64 of {len} bytes, {problem}")]
    BadChecksum { algorithm: String, value: String, len: usize, problem: String },
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("{algorithm} mismatch: expected {expected}, computed {computed}")]
    DigestMismatch { algorithm: &'static str, expected: String, computed: String },
    #[error("manifest: expected {{\"version\": 1, \"files\": {{..}}}}: {0}")]
    ManifestJson(#[source] serde_json::Error),
    #[error("manifest: expected version 1, got {0}")]
    ManifestVersion(u64),
    #[error("manifest: file key {key:?}: expected {expected}")]
    ManifestEntry { key: String, expected: &'static str },
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: expected a UTF-8 file name to use as a manifest key", .0.display())]
    NonUtf8Name(PathBuf),
    /// Not fatal: read the first `needed` bytes of the file and call again.
    #[error("safetensors: need the first {needed} bytes of the file to check the header")]
    NeedMore { needed: u64 },
    #[error("safetensors header: {0}")]
    Header(String),
    #[error("safetensors: tensor {name:?}: {problem}")]
    Tensor { name: String, problem: String },
}

/// What a source or manifest vouches for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Crc64Nvme(u64),
    Crc32c(u32),
    Sha256([u8; 32]),
    SizeOnly,
}

/// How a file came to be trusted. A metric and report label, bounded by its three values.
/// Ordered from weakest to strongest: a model is trusted as its weakest file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerificationKind {
    Unverified,
    Manifest,
    Checksum,
}

impl std::fmt::Display for VerificationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The index's spelling of a verification that may not exist yet: `""` until the file (or
/// every file of a model) is ready, so index files written before the type existed read
/// back unchanged.
pub mod verification_field {
    use super::VerificationKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<VerificationKind>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.map_or("", VerificationKind::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<VerificationKind>, D::Error> {
        match String::deserialize(d)?.as_str() {
            "" => Ok(None),
            "checksum" => Ok(Some(VerificationKind::Checksum)),
            "manifest" => Ok(Some(VerificationKind::Manifest)),
            "unverified" => Ok(Some(VerificationKind::Unverified)),
            other => Err(serde::de::Error::custom(format!("verification: expected checksum, manifest, unverified or \"\", got {other:?}"))),
        }
    }
}

impl VerificationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Checksum => "checksum",
            Self::Manifest => "manifest",
            Self::Unverified => "unverified",
        }
    }
}

/// Checks a whole file on disk against `expected` (size first, then the digest), reading it
/// in 8 MiB blocks. Blocking.
pub fn check_file(path: &Path, expected: &Expected, size: u64) -> Result<(), VerifyError> {
    let io = |source| VerifyError::Io { path: path.to_owned(), source };
    let mut f = File::open(path).map_err(io)?;
    let mut d = Digester::new(expected, size);
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    d.finish()
}

/// An expectation with who vouched for it: a SHA-256 may come from S3 or from a manifest,
/// so the kind is the caller's to say, not derived from `Expected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vouched {
    pub expected: Expected,
    pub kind: VerificationKind,
}

/// Parses an S3 `x-amz-checksum-<algorithm>` value: base64 of the big-endian digest.
pub fn parse_s3_checksum(algorithm: &str, value_b64: &str) -> Result<Expected, VerifyError> {
    let upper = algorithm.to_ascii_uppercase();
    let len = match upper.as_str() {
        "CRC64NVME" => 8,
        "CRC32C" => 4,
        "SHA256" => 32,
        _ => return Err(VerifyError::UnsupportedAlgorithm(algorithm.to_owned())),
    };
    let value = value_b64.to_owned();
    if let Some((_, parts)) = value_b64.rsplit_once('-')
        && !parts.is_empty()
        && parts.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(VerifyError::Composite { algorithm: upper, value });
    }
    let bad = |problem| VerifyError::BadChecksum { algorithm: upper.clone(), value, len, problem };
    let bytes = match BASE64.decode(value_b64) {
        Ok(bytes) if bytes.len() == len => bytes,
        Ok(bytes) => return Err(bad(format!("got {} bytes", bytes.len()))),
        Err(e) => return Err(bad(format!("got invalid base64 ({e})"))),
    };
    let mut be = [0u8; 32];
    be[32 - len..].copy_from_slice(&bytes);
    let int = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    Ok(match len {
        8 => Expected::Crc64Nvme(int),
        4 => Expected::Crc32c(int as u32), // four bytes: the cast loses nothing
        _ => Expected::Sha256(be),
    })
}

/// Running digest, each with the value it must end at.
enum State {
    Crc64(crc64fast_nvme::Digest, u64),
    Crc32c(u32, u32),
    Sha256(sha2::Sha256, [u8; 32]),
    SizeOnly,
}

/// Checks a file's size and digest as its bytes stream past, so a download is verified
/// without reading it back. Bytes must be fed in file order.
pub struct Digester {
    state: State,
    expected_size: u64,
    seen: u64,
}

impl Digester {
    pub fn new(expected: &Expected, expected_size: u64) -> Self {
        let state = match *expected {
            Expected::Crc64Nvme(want) => State::Crc64(crc64fast_nvme::Digest::new(), want),
            Expected::Crc32c(want) => State::Crc32c(0, want),
            Expected::Sha256(want) => State::Sha256(sha2::Sha256::new(), want),
            Expected::SizeOnly => State::SizeOnly,
        };
        Self { state, expected_size, seen: 0 }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.seen = self.seen.saturating_add(data.len() as u64);
        match &mut self.state {
            State::Crc64(digest, _) => digest.write(data),
            State::Crc32c(crc, _) => *crc = crc32c::crc32c_append(*crc, data),
            State::Sha256(hasher, _) => hasher.update(data),
            State::SizeOnly => {}
        }
    }

    /// Size first: a truncated file fails the digest too, but its size says why.
    pub fn finish(self) -> Result<(), VerifyError> {
        let (expected, actual) = (self.expected_size, self.seen);
        if expected != actual {
            return Err(VerifyError::SizeMismatch { expected, actual });
        }
        // Compared as text: the mismatch error needs both as text anyway.
        let (algorithm, expected, computed) = match self.state {
            State::Crc64(d, want) => ("crc64nvme", format!("{want:#018x}"), format!("{:#018x}", d.sum64())),
            State::Crc32c(got, want) => ("crc32c", format!("{want:#010x}"), format!("{got:#010x}")),
            State::Sha256(h, want) => ("sha256", hex::encode(want), hex::encode(h.finalize())),
            State::SizeOnly => return Ok(()),
        };
        if expected == computed {
            return Ok(());
        }
        Err(VerifyError::DigestMismatch { algorithm, expected, computed })
    }
}

/// SHA-256 of a whole file, for writing manifests.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], io::Error> {
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Per-file size and SHA-256 of a model directory, keyed by '/'-separated relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub files: BTreeMap<String, ManifestEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    version: u64,
    files: BTreeMap<String, RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    size: u64,
    sha256: String,
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Manifest, VerifyError> {
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(VerifyError::ManifestJson)?;
        if raw.version != 1 {
            return Err(VerifyError::ManifestVersion(raw.version));
        }
        let mut files = BTreeMap::new();
        for (key, RawEntry { size, sha256: text }) in raw.files {
            // Keys are joined onto the model directory; one that could leave it must not load.
            let odd = key.split('/').any(|s| s.is_empty() || s == "." || s == "..");
            if odd || key.contains('\\') {
                let expected = "a relative '/'-separated path without empty, . or .. parts";
                return Err(VerifyError::ManifestEntry { key, expected });
            }
            let mut sha256 = [0u8; 32];
            if hex::decode_to_slice(&text, &mut sha256).is_err() {
                let expected = "sha256 of 64 hex characters";
                return Err(VerifyError::ManifestEntry { key, expected });
            }
            files.insert(key, ManifestEntry { size, sha256 });
        }
        Ok(Manifest { files })
    }

    /// Pretty JSON that `parse` reads back; keys come out sorted.
    pub fn to_json(&self) -> String {
        let files: serde_json::Map<_, _> =
            self.files.iter().map(|(k, e)| (k.clone(), serde_json::json!({"size": e.size, "sha256": hex::encode(e.sha256)}))).collect();
        format!("{:#}", serde_json::json!({"version": 1, "files": files}))
    }

    /// Hashes every regular file under `dir`. Hidden entries (`.git`, partial downloads) and
    /// the manifest itself are left out, and so are symlinks, so that the manifest vouches
    /// only for bytes inside `dir`.
    pub fn build(dir: &Path) -> Result<Manifest, VerifyError> {
        let at = |path: &Path| {
            let path = path.to_owned();
            move |source| VerifyError::Io { path, source }
        };
        let mut files = BTreeMap::new();
        let mut pending = vec![(dir.to_owned(), String::new())];
        while let Some((path, prefix)) = pending.pop() {
            for entry in std::fs::read_dir(&path).map_err(at(&path))? {
                let entry = entry.map_err(at(&path))?;
                let path = entry.path();
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    return Err(VerifyError::NonUtf8Name(path));
                };
                if name.starts_with('.') || (prefix.is_empty() && name == MANIFEST_NAME) {
                    continue;
                }
                let key = format!("{prefix}{name}");
                let file_type = entry.file_type().map_err(at(&path))?;
                if file_type.is_dir() {
                    pending.push((path, format!("{key}/")));
                } else if file_type.is_file() {
                    let size = entry.metadata().map_err(at(&path))?.len();
                    let sha256 = sha256_file(&path).map_err(at(&path))?;
                    files.insert(key, ManifestEntry { size, sha256 });
                }
            }
        }
        Ok(Manifest { files })
    }
}

/// What a sane safetensors header describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsHeader {
    pub header_len: u64,
    pub tensors: usize,
    pub data_len: u64,
    /// Dtypes newer than this agent knows. Their tensors had their offsets checked but not
    /// their size; the caller says so in a log line rather than failing a valid download.
    pub unknown_dtypes: BTreeSet<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Bits per element of every dtype of the safetensors format, as `Dtype::bitsize` has them in
/// huggingface/safetensors (safetensors/src/tensor.rs, checked at 24b0b28, May 2026). In bits
/// because F4 and F6 elements are packed several to a byte.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Bytes a tensor of `bits`-bit elements and `shape` takes, or why it cannot be stored.
/// Matches the safetensors crate's `Metadata::validate`: a tensor whose bits do not fill whole
/// bytes is rejected, not rounded up, since the next tensor would have to start mid-byte.
fn tensor_bytes(bits: u64, shape: &[u64], dtype: &str) -> Result<Option<u64>, String> {
    // u128 so that a product too big for u64 is still exact enough to say so.
    let nbits = shape.iter().try_fold(u128::from(bits), |acc, &dim| acc.checked_mul(u128::from(dim)));
    match nbits {
        Some(n) if n % 8 != 0 => Err(format!("shape {shape:?} of {dtype} is {n} bits: expected a whole number of bytes")),
        Some(n) => Ok(u64::try_from(n / 8).ok()),
        None => Ok(None),
    }
}

/// Checks that a safetensors header is self-consistent and fits a file of `file_size` bytes,
/// catching a truncated or mislabelled file before a runtime maps it. It rejects what the
/// safetensors crate's loader rejects: tensors must tile the data section from its start to
/// the end of the file, each sized by its dtype and shape. A dtype newer than this code is
/// checked for offsets only and listed in `unknown_dtypes`. `prefix` is the start of the file;
/// when it is too short, `NeedMore` says how much to read.
pub fn check_safetensors_header(prefix: &[u8], file_size: u64) -> Result<SafetensorsHeader, VerifyError> {
    let Some(len) = prefix.first_chunk::<8>() else {
        return Err(VerifyError::NeedMore { needed: 8 });
    };
    let header_len = u64::from_le_bytes(*len);
    let data_len = file_size.checked_sub(8).and_then(|n| n.checked_sub(header_len));
    let Some(data_len) = data_len.filter(|_| header_len <= MAX_SAFETENSORS_HEADER) else {
        return Err(VerifyError::Header(format!(
            "length {header_len}: expected at most {MAX_SAFETENSORS_HEADER} bytes within a file of {file_size}"
        )));
    };
    let needed = 8 + header_len;
    let Some(json) = usize::try_from(needed).ok().and_then(|end| prefix.get(8..end)) else {
        return Err(VerifyError::NeedMore { needed });
    };
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| VerifyError::Header(format!("expected a JSON object: {e}")))?;
    let mut ranges = Vec::with_capacity(header.len());
    let mut unknown_dtypes = BTreeSet::new();
    for (name, value) in header {
        if name == "__metadata__" {
            let meta = serde_json::from_value::<BTreeMap<String, String>>(value);
            meta.map_err(|e| VerifyError::Header(format!("__metadata__: expected strings: {e}")))?;
            continue;
        }
        let fail = |problem| VerifyError::Tensor { name: name.clone(), problem };
        let t: RawTensor = serde_json::from_value(value).map_err(|e| fail(format!("expected {{dtype, shape, data_offsets}}: {e}")))?;
        let [begin, end] = t.data_offsets;
        if begin > end || end > data_len {
            return Err(fail(format!("data_offsets [{begin}, {end}]: expected begin <= end <= {data_len}")));
        }
        match dtype_bits(&t.dtype) {
            Some(bits) => {
                let needs = tensor_bytes(bits, &t.shape, &t.dtype).map_err(fail)?;
                if needs != Some(end - begin) {
                    let needs = needs.map_or("over 2^64".to_owned(), |n| n.to_string());
                    let (held, shape, dtype) = (end - begin, t.shape, t.dtype);
                    return Err(fail(format!(
                        "data_offsets [{begin}, {end}] hold {held} bytes but shape {shape:?} of {dtype} needs {needs}"
                    )));
                }
            }
            None => {
                unknown_dtypes.insert(t.dtype);
            }
        }
        ranges.push((begin, end, name));
    }
    let tensors = ranges.len();
    // Sorted by offsets as the safetensors crate sorts them; names only break ties.
    ranges.sort();
    let mut prev: Option<&(u64, u64, String)> = None;
    for range @ (b, e, name) in &ranges {
        let at = prev.map_or(0, |p| p.1);
        if *b != at {
            let problem = match prev {
                Some((pb, pe, first)) if *b < at => format!("data_offsets [{b}, {e}] overlap tensor {first:?} at [{pb}, {pe}]"),
                Some((_, pe, first)) => format!("data_offsets [{b}, {e}]: expected to begin at {pe}, where tensor {first:?} ends"),
                None => format!("data_offsets [{b}, {e}]: expected the first tensor to begin at 0"),
            };
            return Err(VerifyError::Tensor { name: name.clone(), problem });
        }
        prev = Some(range);
    }
    let end = prev.map_or(0, |p| p.1);
    if end != data_len {
        return Err(VerifyError::Header(format!(
            "tensors end at byte {end} of the data section: expected them to fill all {data_len} bytes up to the end of the file"
        )));
    }
    Ok(SafetensorsHeader { header_len, tensors, data_len, unknown_dtypes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(expected: Expected, chunks: &[&[u8]]) -> Result<(), VerifyError> {
        let mut d = Digester::new(&expected, chunks.iter().map(|c| c.len() as u64).sum());
        chunks.iter().for_each(|c| d.update(c));
        d.finish()
    }

    fn err<T: std::fmt::Debug>(result: Result<T, VerifyError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn catalogue_check_values_hold_however_the_data_is_chunked() {
        let sha = "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225";
        let sha = hex::decode(sha).unwrap().try_into().unwrap();
        let crc64 = Expected::Crc64Nvme(0xae8b14860a799888);
        let kinds = [crc64, Expected::Crc32c(0xe3069283), Expected::Sha256(sha), Expected::SizeOnly];
        for expected in kinds {
            digest(expected, &[b"123456789"]).unwrap();
            digest(expected, &[b"1", b"", b"2345", b"6789"]).unwrap();
        }
    }

    #[test]
    fn mismatches_show_expected_and_computed() {
        let got = err(digest(Expected::Crc64Nvme(0x1234abcd5678ef00), &[b"123456789"]));
        assert_eq!(got, "crc64nvme mismatch: expected 0x1234abcd5678ef00, computed 0xae8b14860a799888");
        let got = err(digest(Expected::Crc32c(1), &[b"123456789"]));
        assert_eq!(got, "crc32c mismatch: expected 0x00000001, computed 0xe3069283");
        let got = err(digest(Expected::Sha256([0; 32]), &[b"abc"]));
        assert!(got.ends_with("computed ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
        let mut d = Digester::new(&Expected::Crc32c(0), 1048576);
        d.update(&[0; 1048575]);
        assert_eq!(err(d.finish()), "size mismatch: expected 1048576 bytes, got 1048575");
    }

    #[test]
    fn s3_checksums_decode_or_say_why_not() {
        let crc64 = BASE64.encode(0xae8b14860a799888u64.to_be_bytes());
        assert_eq!(parse_s3_checksum("crc64nvme", &crc64).unwrap(), Expected::Crc64Nvme(0xae8b14860a799888));
        assert_eq!(parse_s3_checksum("CRC32C", "4waSgw==").unwrap(), Expected::Crc32c(0xe3069283));
        let sha = BASE64.encode([7u8; 32]);
        assert_eq!(parse_s3_checksum("Sha256", &sha).unwrap(), Expected::Sha256([7; 32]));
        for unknown in ["CRC32", "SHA1"] {
            let got = parse_s3_checksum(unknown, "AAAAAA==");
            assert!(matches!(got, Err(VerifyError::UnsupportedAlgorithm(_))), "{got:?}");
        }
        let got = parse_s3_checksum("CRC32C", "4waSgw==-12");
        assert!(matches!(got, Err(VerifyError::Composite { .. })), "{got:?}");
        let got = err(parse_s3_checksum("CRC64NVME", "4waSgw=="));
        assert_eq!(got, r#"S3 CRC64NVME checksum "4waSgw==": expected base64 of 8 bytes, got 4 bytes"#);
        assert!(err(parse_s3_checksum("sha256", "not base64!")).contains("invalid base64"));
    }

    #[test]
    fn manifest_built_from_a_directory_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &str, data: &[u8]| {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        };
        write("a.safetensors", b"abc");
        write("sub/b.json", b"123456789");
        write("sub/.cache/x", b"hidden");
        write(".partial", b"hidden");
        write(MANIFEST_NAME, b"{}");
        let m = Manifest::build(dir.path()).unwrap();
        assert_eq!(m.files.keys().collect::<Vec<_>>(), ["a.safetensors", "sub/b.json"]);
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!((m.files["a.safetensors"].size, hex::encode(m.files["a.safetensors"].sha256)), (3, sha.into()));
        assert_eq!(Manifest::parse(m.to_json().as_bytes()).unwrap(), m);
    }

    #[test]
    fn manifest_rejects_escaping_keys_bad_hashes_and_other_versions() {
        let with = |key: &str, sha: &str| {
            let json = format!(r#"{{"version":1,"files":{{"{key}":{{"size":1,"sha256":"{sha}"}}}}}}"#);
            Manifest::parse(json.as_bytes())
        };
        let upper = "AB".repeat(32);
        assert_eq!(with("x/y", &upper).unwrap().files["x/y"].sha256, [0xab; 32]);
        for key in ["../etc/passwd", "a/../../b", "/abs", "a//b", "./a", ""] {
            assert!(matches!(with(key, &upper), Err(VerifyError::ManifestEntry { .. })), "{key}");
        }
        let got = err(with("w.bin", "abc"));
        assert_eq!(got, r#"manifest: file key "w.bin": expected sha256 of 64 hex characters"#);
        assert!(matches!(Manifest::parse(br#"{"version":2,"files":{}}"#), Err(VerifyError::ManifestVersion(2))));
        let extra = br#"{"version":1,"files":{},"extra":0}"#;
        assert!(matches!(Manifest::parse(extra), Err(VerifyError::ManifestJson(_))));
    }

    /// A safetensors file's start for `header`, and the size of the file with `data` bytes.
    fn st(header: &str, data: u64) -> (Vec<u8>, u64) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let size = bytes.len() as u64 + data;
        (bytes, size)
    }

    fn check(header: &str, data: u64) -> Result<SafetensorsHeader, VerifyError> {
        let (prefix, size) = st(header, data);
        check_safetensors_header(&prefix, size)
    }

    #[test]
    fn safetensors_valid_header() {
        let h = r#"{"__metadata__":{"format":"pt"},
            "model.embed.weight":{"dtype":"F16","shape":[10,20],"data_offsets":[0,400]},
            "lm_head.bias":{"dtype":"F32","shape":[5],"data_offsets":[400,420]}}"#;
        let want = SafetensorsHeader { header_len: h.len() as u64, tensors: 2, data_len: 420, unknown_dtypes: BTreeSet::new() };
        assert_eq!(check(h, 420).unwrap(), want);
    }

    #[test]
    fn safetensors_rejects_inconsistent_tensors() {
        let short = r#"{"model.embed.weight":{"dtype":"F16","shape":[10,20],"data_offsets":[0,100]}}"#;
        assert_eq!(
            err(check(short, 400)),
            r#"safetensors: tensor "model.embed.weight": data_offsets [0, 100] hold 100 bytes but shape [10, 20] of F16 needs 400"#
        );
        let overlap = r#"{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},
            "b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
        assert!(err(check(overlap, 12)).contains(r#""b": data_offsets [8, 12] overlap tensor "a""#));
        let past_end = r#"{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]}}"#;
        assert!(err(check(past_end, 9)).contains("expected begin <= end <= 9"));
        let overflow = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        assert!(err(check(overflow, 0)).contains("needs over 2^64"));
        assert!(matches!(check("[1]", 0), Err(VerifyError::Header(_))));
    }

    /// Every dtype of the safetensors format with its bits per element, copied from
    /// `Dtype::bitsize` in huggingface/safetensors safetensors/src/tensor.rs.
    const FORMAT_DTYPES: [(&str, u64); 22] = [
        ("BOOL", 8),
        ("F4", 4),
        ("F6_E2M3", 6),
        ("F6_E3M2", 6),
        ("U8", 8),
        ("I8", 8),
        ("F8_E5M2", 8),
        ("F8_E4M3", 8),
        ("F8_E8M0", 8),
        ("F8_E4M3FNUZ", 8),
        ("F8_E5M2FNUZ", 8),
        ("I16", 16),
        ("U16", 16),
        ("F16", 16),
        ("BF16", 16),
        ("I32", 32),
        ("U32", 32),
        ("F32", 32),
        ("C64", 64),
        ("F64", 64),
        ("I64", 64),
        ("U64", 64),
    ];

    /// A header laying `(dtype, shape, bytes)` tensors end to end from offset 0, named t0, t1..,
    /// and the data length they fill.
    fn layout(tensors: &[(&str, &[u64], u64)]) -> (String, u64) {
        let mut header = serde_json::Map::new();
        let mut at = 0;
        for (i, (dtype, shape, bytes)) in tensors.iter().enumerate() {
            let t = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes]});
            header.insert(format!("t{i}"), t);
            at += bytes;
        }
        (serde_json::Value::Object(header).to_string(), at)
    }

    #[test]
    fn safetensors_every_dtype_of_the_format_is_sized_in_bits() {
        // Element counts that fill whole bytes at any width, and for byte-wide dtypes a scalar
        // and odd counts too. F4 [2, 6] is 6 bytes and F6 [3, 8] is 18: sizes that are no
        // whole number of bytes per element.
        let packed: [&[u64]; 5] = [&[0], &[4], &[2, 6], &[3, 8], &[1, 4, 1]];
        let whole_bytes: [&[u64]; 3] = [&[], &[3], &[5, 7]];
        for (dtype, bits) in FORMAT_DTYPES {
            let mut shapes = packed.to_vec();
            if bits % 8 == 0 {
                shapes.extend(whole_bytes);
            }
            let tensors: Vec<_> = shapes.iter().map(|&s| (dtype, s, s.iter().product::<u64>() * bits / 8)).collect();
            let (h, data_len) = layout(&tensors);
            let got = check(&h, data_len).unwrap_or_else(|e| panic!("{dtype}: {e}"));
            assert_eq!((got.tensors, got.unknown_dtypes.len()), (shapes.len(), 0), "{dtype}");
            // One byte too many for the last tensor: the size is checked, not only the offsets.
            let mut tensors = tensors;
            if let Some(last) = tensors.last_mut() {
                last.2 += 1;
            }
            let (h, data_len) = layout(&tensors);
            assert!(err(check(&h, data_len)).contains(&format!("of {dtype} needs")), "{dtype}");
        }
    }

    #[test]
    fn safetensors_sub_byte_tensors_must_fill_whole_bytes() {
        // As the safetensors crate does (MisalignedSlice), whether the offsets round down or up.
        for (dtype, shape) in [("F4", &[3u64][..]), ("F4", &[1, 5]), ("F6_E2M3", &[2]), ("F6_E3M2", &[3]), ("F6_E3M2", &[])] {
            for bytes in [0, 1, 2, 3] {
                let (h, data_len) = layout(&[(dtype, shape, bytes)]);
                assert!(err(check(&h, data_len)).contains("expected a whole number of bytes"), "{dtype} {shape:?} in {bytes}");
            }
        }
        let (h, data_len) = layout(&[("U8", &[4], 4), ("F6_E2M3", &[3], 3)]);
        assert_eq!(
            err(check(&h, data_len)),
            r#"safetensors: tensor "t1": shape [3] of F6_E2M3 is 18 bits: expected a whole number of bytes"#
        );
    }

    #[test]
    fn safetensors_sub_byte_tensor_of_the_wrong_size_fails() {
        // Sized a byte per element, as a checker that knows no sub-byte dtype would.
        let (h, data_len) = layout(&[("BF16", &[2], 4), ("F4", &[4, 4], 16)]);
        assert_eq!(
            err(check(&h, data_len)),
            r#"safetensors: tensor "t1": data_offsets [4, 20] hold 16 bytes but shape [4, 4] of F4 needs 8"#
        );
        let (h, data_len) = layout(&[("F6_E3M2", &[8], 8)]);
        assert!(err(check(&h, data_len)).contains("hold 8 bytes but shape [8] of F6_E3M2 needs 6"));
    }

    #[test]
    fn safetensors_unknown_dtype_passes_on_offsets_alone() {
        let (h, data_len) = layout(&[("F2_E1M0", &[7], 3), ("F16", &[2], 4), ("F2_E1M0", &[1], 5), ("I3", &[9], 0)]);
        let got = check(&h, data_len).unwrap();
        assert_eq!(got.unknown_dtypes.iter().collect::<Vec<_>>(), ["F2_E1M0", "I3"]);
        assert_eq!(got.tensors, 4);
        // Its offsets are still checked: past the end, overlapping, leaving a gap, not at 0.
        let cases = [
            (r#"{"a":{"dtype":"X9","shape":[3],"data_offsets":[0,11]}}"#, 10, "expected begin <= end <= 10"),
            (
                r#"{"a":{"dtype":"X9","shape":[3],"data_offsets":[0,6]},"b":{"dtype":"X9","shape":[3],"data_offsets":[5,10]}}"#,
                10,
                r#"tensor "b": data_offsets [5, 10] overlap tensor "a" at [0, 6]"#,
            ),
            (
                r#"{"a":{"dtype":"X9","shape":[3],"data_offsets":[0,4]},"b":{"dtype":"X9","shape":[3],"data_offsets":[5,10]}}"#,
                10,
                r#"tensor "b": data_offsets [5, 10]: expected to begin at 4, where tensor "a" ends"#,
            ),
            (r#"{"a":{"dtype":"X9","shape":[3],"data_offsets":[2,10]}}"#, 10, "expected the first tensor to begin at 0"),
            (
                r#"{"a":{"dtype":"X9","shape":[3],"data_offsets":[0,8]}}"#,
                10,
                "tensors end at byte 8 of the data section: expected them to fill all 10 bytes",
            ),
        ];
        for (h, data_len, want) in cases {
            assert!(err(check(h, data_len)).contains(want), "{h}: {}", err(check(h, data_len)));
        }
    }

    #[test]
    fn safetensors_tensors_must_tile_the_data_section() {
        // What the safetensors crate's loader refuses: a gap, a late start, trailing bytes.
        let gap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#;
        assert!(err(check(gap, 10)).contains(r#"expected to begin at 4, where tensor "a" ends"#));
        let late = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[1,5]}}"#;
        assert!(err(check(late, 5)).contains("expected the first tensor to begin at 0"));
        let trailing = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert_eq!(
            err(check(trailing, 6)),
            "safetensors header: tensors end at byte 4 of the data section: expected them to fill all 6 bytes up to the end of the file"
        );
        // Empty tensors may share an offset with their neighbours, in any name order.
        let empty = r#"{"z":{"dtype":"F4","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"m":{"dtype":"F32","shape":[2,0],"data_offsets":[4,4]}}"#;
        assert_eq!(check(empty, 4).unwrap().tensors, 3);
        assert_eq!(check("{}", 0).unwrap().tensors, 0);
    }

    #[test]
    fn safetensors_short_prefix_and_impossible_lengths() {
        let (prefix, size) = st(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1);
        let got = check_safetensors_header(&prefix[..20], size);
        assert!(matches!(got, Err(VerifyError::NeedMore { needed }) if needed == prefix.len() as u64));
        let got = check_safetensors_header(&prefix[..3], size);
        assert!(matches!(got, Err(VerifyError::NeedMore { needed: 8 })));
        assert!(err(check_safetensors_header(&prefix, size - 2)).contains("within a file of"));
        let huge = (MAX_SAFETENSORS_HEADER + 1).to_le_bytes();
        assert!(matches!(check_safetensors_header(&huge, u64::MAX), Err(VerifyError::Header(_))));
    }
}
