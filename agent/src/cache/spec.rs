//! What to cache: a source URI prefix with optional include/exclude globs and a revision,
//! and the stable id and directory name derived from them.

use sha2::Digest as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("model URI {0:?}: expected s3://bucket/prefix/ or file:///absolute/path/")]
    Uri(String),
    #[error("glob {0:?}: expected a pattern of path segments with *, ** and ?, no empty segments")]
    Glob(String),
}

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceUri {
    /// Bucket and key prefix (no leading '/', ends with '/' unless empty).
    S3 { bucket: String, prefix: String },
    /// An absolute directory on a mounted filesystem (FSx for Lustre, NFS, local).
    Posix { root: std::path::PathBuf },
}

impl SourceUri {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::Uri(s.to_owned());
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !bucket_ok {
                return Err(bad());
            }
            let mut prefix = prefix.trim_start_matches('/').to_owned();
            if !prefix.is_empty() && !prefix.ends_with('/') {
                prefix.push('/');
            }
            return Ok(Self::S3 { bucket: bucket.to_owned(), prefix });
        }
        let path = s.strip_prefix("file://").ok_or_else(bad)?;
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(bad());
        }
        Ok(Self::Posix { root: std::path::PathBuf::from(path.trim_end_matches('/')).join("") })
    }

    /// The source as metrics and bandwidth estimates see it: "s3://bucket", "file:///fsx".
    pub fn source_key(&self) -> String {
        match self {
            Self::S3 { bucket, .. } => format!("s3://{bucket}"),
            Self::Posix { root } => {
                let first = root.components().nth(1).map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
                format!("file:///{first}")
            }
        }
    }
}

impl std::fmt::Display for SourceUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Self::Posix { root } => write!(f, "file://{}", root.display()),
        }
    }
}

/// A path glob: `*` matches within a segment, `**` any number of segments, `?` one char.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    segments: Vec<String>,
}

impl Glob {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let segments: Vec<String> = s.split('/').map(str::to_owned).collect();
        if s.is_empty() || segments.iter().any(String::is_empty) {
            return Err(SpecError::Glob(s.to_owned()));
        }
        Ok(Self { text: s.to_owned(), segments })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a relative path (with '/' separators) matches. A pattern without '/' matches
    /// the file name at any depth, as .gitignore does, so `*.safetensors` means what people
    /// expect.
    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        if self.segments.len() == 1 && self.segments[0] != "**" {
            return parts.last().is_some_and(|name| segment_match(self.segments[0].as_bytes(), name.as_bytes()));
        }
        let pat: Vec<&str> = self.segments.iter().map(String::as_str).collect();
        match_segments(&pat, &parts)
    }
}

fn match_segments(pat: &[&str], parts: &[&str]) -> bool {
    match pat.split_first() {
        None => parts.is_empty(),
        Some((&"**", rest)) => (0..=parts.len()).any(|i| match_segments(rest, &parts[i..])),
        Some((p, rest)) => {
            parts.split_first().is_some_and(|(first, tail)| segment_match(p.as_bytes(), first.as_bytes()) && match_segments(rest, tail))
        }
    }
}

fn segment_match(p: &[u8], s: &[u8]) -> bool {
    match (p.split_first(), s.split_first()) {
        (None, None) => true,
        (Some((b'*', pr)), _) => (0..=s.len()).any(|i| segment_match(pr, &s[i..])),
        (Some((b'?', pr)), Some((_, sr))) => segment_match(pr, sr),
        (Some((pc, pr)), Some((sc, sr))) => pc == sc && segment_match(pr, sr),
        _ => false,
    }
}

/// One model to cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub uri: SourceUri,
    pub include: Vec<Glob>,
    pub exclude: Vec<Glob>,
    /// A label the operator chooses (a git sha, "v2"); part of the identity, so a new
    /// revision is a new entry and the old one stays until evicted.
    pub revision: String,
}

impl ModelSpec {
    pub fn new(uri: &str, include: &[String], exclude: &[String], revision: &str) -> Result<Self, SpecError> {
        Ok(Self {
            uri: SourceUri::parse(uri)?,
            include: include.iter().map(|g| Glob::parse(g)).collect::<Result<_, _>>()?,
            exclude: exclude.iter().map(|g| Glob::parse(g)).collect::<Result<_, _>>()?,
            revision: revision.to_owned(),
        })
    }

    /// Whether a file (relative path) belongs to the model.
    pub fn wants(&self, path: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|g| g.matches(path))) && !self.exclude.iter().any(|g| g.matches(path))
    }

    /// Stable id: the last path segment for people, a hash of everything for uniqueness.
    pub fn id(&self) -> String {
        let mut h = sha2::Sha256::new();
        h.update(self.uri.to_string().as_bytes());
        h.update([0]);
        h.update(self.revision.as_bytes());
        for g in &self.include {
            h.update(b"\0+");
            h.update(g.as_str().as_bytes());
        }
        for g in &self.exclude {
            h.update(b"\0-");
            h.update(g.as_str().as_bytes());
        }
        let digest = h.finalize();
        let uri = self.uri.to_string();
        let name = uri.trim_end_matches('/').rsplit('/').next().unwrap_or("model");
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' { c.to_ascii_lowercase() } else { '-' })
            .take(48)
            .collect();
        format!("{slug}-{}", hex::encode(&digest[..6]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            SourceUri::parse("s3://my-bucket/models/llama").unwrap(),
            SourceUri::S3 { bucket: "my-bucket".into(), prefix: "models/llama/".into() }
        );
        assert_eq!(SourceUri::parse("s3://bkt").unwrap(), SourceUri::S3 { bucket: "bkt".into(), prefix: String::new() });
        assert_eq!(SourceUri::parse("file:///fsx/m/").unwrap(), SourceUri::Posix { root: "/fsx/m/".into() });
        for bad in ["http://x/y", "s3://B/x", "s3://a/x", "file://rel/path", "file:///a/../b", "/abs"] {
            assert!(SourceUri::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(SourceUri::parse("file:///fsx/models/x").unwrap().source_key(), "file:///fsx");
        assert_eq!(SourceUri::parse("s3://bkt/p/").unwrap().source_key(), "s3://bkt");
    }

    #[test]
    fn globs() {
        let g = |s| Glob::parse(s).unwrap();
        assert!(g("*.safetensors").matches("model-00001.safetensors"));
        assert!(g("*.safetensors").matches("sub/dir/x.safetensors"));
        assert!(!g("*.safetensors").matches("x.bin"));
        assert!(g("original/**").matches("original/a/b.pth"));
        assert!(!g("original/**").matches("other/a.pth"));
        assert!(g("**/config.json").matches("config.json"));
        assert!(g("a/*/c").matches("a/b/c") && !g("a/*/c").matches("a/b/x/c"));
        assert!(g("tok?n.json").matches("token.json"));
        assert!(Glob::parse("a//b").is_err() && Glob::parse("").is_err());
    }

    #[test]
    fn spec_filters_and_ids() {
        let s = ModelSpec::new("s3://bkt/llama-3-8B/", &["*.safetensors".into(), "*.json".into()], &["original/**".into()], "r1").unwrap();
        assert!(s.wants("config.json") && s.wants("model.safetensors"));
        assert!(!s.wants("original/consolidated.safetensors") && !s.wants("README.md"));
        let id = s.id();
        assert!(id.starts_with("llama-3-8b-") && id.len() == "llama-3-8b-".len() + 12, "{id}");
        let other = ModelSpec::new("s3://bkt/llama-3-8B/", &[], &[], "r1").unwrap();
        assert_ne!(other.id(), id, "filters are part of the identity");
        assert_eq!(
            ModelSpec::new("s3://bkt/llama-3-8B", &["*.safetensors".into(), "*.json".into()], &["original/**".into()], "r1").unwrap().id(),
            id
        );
    }
}
