//! Container image references as the container runtime normalizes them: `ubuntu` is
//! `docker.io/library/ubuntu:latest`, a first component with a dot, a colon or `localhost` is
//! a registry, a digest pins the content. The normalized form is what CRI reports in
//! `repo_tags`, so the agent's records, the runtime's and the controller's catalog (matched
//! against what nodes report) compare equal.

use std::fmt;

/// Where Docker Hub's registry API really lives.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("image reference {input:?}: expected {expected}")]
pub struct ReferenceError {
    pub input: String,
    pub expected: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// As written in references: `docker.io`, `127.0.0.1:5000`, `123.dkr.ecr.us-east-1.amazonaws.com`.
    pub registry: String,
    /// `library/ubuntu`, `vllm/vllm-openai`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |expected| ReferenceError { input: input.to_owned(), expected };
        let s = input.trim();
        if s.is_empty() || s.len() > 4096 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("[registry/]repository[:tag][@sha256:digest] without spaces"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(|| err("a sha256 digest after '@'"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(err("a digest of sha256: and 64 lowercase hex digits"));
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/' (a registry port has a '/' after it).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_owned())),
            None => (rest, None),
        };
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || t.starts_with(['.', '-'])
                || !t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
        {
            return Err(err("a tag of letters, digits, '_', '.', '-' (at most 128, not starting with '.' or '-')"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (first.to_owned(), path.to_owned()),
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" { "docker.io".to_owned() } else { registry };
        let repository = if registry == "docker.io" && !repository.contains('/') { format!("library/{repository}") } else { repository };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if repository.is_empty() || !repository.split('/').all(component_ok) {
            return Err(err("a repository of lowercase path components (letters, digits, '.', '_', '-')"));
        }
        if registry.is_empty() || !registry.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')) {
            return Err(err("a registry host[:port]"));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
        Ok(Self { registry, repository, tag, digest })
    }

    /// The host the registry API answers on.
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" { DOCKER_HUB_API } else { &self.registry }
    }

    /// The tag or digest a manifest is fetched by (a digest wins: it pins the content).
    pub fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Registries on the loopback answer plain HTTP, as containerd assumes for them.
    pub fn is_loopback(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { self.registry.as_str() });
        host == "localhost" || host == "[::1]" || host.starts_with("127.")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_normalized_as_the_runtime_does() {
        let r = Reference::parse("ubuntu").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/ubuntu:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(Reference::parse("vllm/vllm-openai:v0.6.3").unwrap().to_string(), "docker.io/vllm/vllm-openai:v0.6.3");
        assert_eq!(Reference::parse("index.docker.io/library/busybox:1").unwrap().to_string(), "docker.io/library/busybox:1");
    }

    #[test]
    fn registries_ports_and_digests() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("127.0.0.1:5000/team/app:v1@{d}")).unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("127.0.0.1:5000", "team/app", Some("v1")));
        assert_eq!(r.manifest_ref(), d);
        assert!(r.is_loopback());
        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!((r.tag.as_deref(), r.is_loopback()), (Some("latest"), true));
        let r = Reference::parse("123456789012.dkr.ecr.us-east-1.amazonaws.com/vllm@".to_owned().as_str());
        assert!(r.is_err());
        let r = Reference::parse("nvcr.io/nvidia/tritonserver:24.08-py3").unwrap();
        assert_eq!((r.registry.as_str(), r.is_loopback()), ("nvcr.io", false));
    }

    #[test]
    fn bad_references_say_what_was_expected() {
        for bad in ["", "Ubuntu", "a b", "x:", "x:-t", "r.io/a//b", "x@sha256:zz", "x@md5:00"] {
            let e = Reference::parse(bad).unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("expected"), "{e}");
        }
    }
}
