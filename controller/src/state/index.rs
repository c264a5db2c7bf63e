//! The placement index: every node as one row of a dense table, with the few facts scoring
//! reads on every call copied into the row, and inverted indexes from a model's weights, an
//! image and a source to the rows that have them. Scoring a 5,000-node cluster then walks one
//! array and does a handful of integer-keyed lookups per node, instead of chasing each
//! node's own tables (which is where the time went: the work per node is small, the cache
//! misses were not). Rows are kept in step with the node entries by `ClusterState`, under
//! the same lock; a forgotten node's row is cleared and reused.

use std::sync::Arc;
use std::time::Instant;

use crate::placement::facts::{CachedBytes, FastMap, NodeFacts};

/// What scoring reads for every node on every call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Hot {
    pub memory_available: u64,
    /// `NodeFacts::whole_free`.
    pub whole_free: u64,
    pub gpu_count: u32,
    /// `gpus[k].index == k` for every GPU, so a slot can be named from the mask alone.
    pub dense_gpu_indices: bool,
    pub requests: f64,
    pub kv_cache: f64,
    /// Free bytes on the cache volume; u64::MAX when the node does not say.
    pub cache_free: u64,
}

impl Hot {
    pub fn of(f: &NodeFacts) -> Self {
        Self {
            memory_available: f.memory_available,
            whole_free: f.whole_free,
            gpu_count: f.gpus.len() as u32,
            dense_gpu_indices: f.gpus.iter().enumerate().all(|(k, g)| g.index as usize == k),
            requests: f.requests,
            kv_cache: f.kv_cache,
            cache_free: f.cache_free.unwrap_or(u64::MAX),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub live: bool,
    pub session: bool,
    pub has_report: bool,
    pub last_seen: Instant,
    pub hot: Hot,
    pub facts: Arc<NodeFacts>,
}

pub type RowId = u32;

#[derive(Debug, Default)]
pub struct Index {
    rows: Vec<Row>,
    free: Vec<RowId>,
    /// Node name -> row: a candidate list from a scheduler is resolved with one hash probe
    /// per name (the name-ordered map costs a dozen string compares, each a cache miss).
    names: FastMap<String, RowId>,
    /// (source URI, revision) -> rows with bytes of it.
    cached: FastMap<(String, String), FastMap<RowId, CachedBytes>>,
    /// Image reference or digest -> rows that have it.
    images: FastMap<String, FastMap<RowId, ()>>,
    /// Source prefix -> rows that measured it, with the bandwidth.
    bandwidth: FastMap<String, FastMap<RowId, f64>>,
    /// Model id as runtimes name it -> rows running it; and the (source URI, revision) of
    /// the cached model a runtime's id names -> rows. The scaling loop reads a model's
    /// replicas from these instead of walking every node.
    runtimes: FastMap<String, FastMap<RowId, ()>>,
    runtime_keys: FastMap<(String, String), FastMap<RowId, ()>>,
    /// Model id -> rows that measured a runtime of it starting, with the seconds (the
    /// slowest, when a node ran several).
    starts: FastMap<String, FastMap<RowId, f64>>,
}

/// The inverted-index entries one model's Score reads, looked up once per call.
#[derive(Debug, Clone, Copy)]
pub struct ModelColumns<'a> {
    cached: Option<&'a FastMap<RowId, CachedBytes>>,
    start: Option<&'a FastMap<RowId, f64>>,
    image: Option<&'a FastMap<RowId, ()>>,
    /// Measured image pull rate from the image's registry (`oci://<registry>`).
    image_source: Option<&'a FastMap<RowId, f64>>,
    /// Sources that are prefixes of the model's URI, longest first.
    sources: [Option<&'a FastMap<RowId, f64>>; 4],
    more_sources: bool,
    index: &'a Index,
    uri: &'a str,
}

impl ModelColumns<'_> {
    pub fn cached(&self, row: RowId) -> CachedBytes {
        self.cached.and_then(|m| m.get(&row)).copied().unwrap_or_default()
    }

    /// Seconds a runtime of the model took from start to ready on the row, when measured.
    pub fn start(&self, row: RowId) -> Option<f64> {
        self.start.and_then(|m| m.get(&row)).copied()
    }

    pub fn image_cached(&self, row: RowId) -> bool {
        self.image.is_some_and(|m| m.contains_key(&row))
    }

    /// How fast the row pulled images from the model's image's registry, if it has.
    pub fn image_bandwidth(&self, row: RowId) -> Option<f64> {
        self.image_source.and_then(|m| m.get(&row).copied())
    }

    /// The row's measured bandwidth from the longest source prefix of the URI, if any.
    pub fn bandwidth(&self, row: RowId) -> Option<f64> {
        if self.more_sources {
            // More than four matching prefixes: rare enough to take the slow, exact path.
            return self.index.rows.get(row as usize).and_then(|r| r.facts.bandwidth_for(self.uri));
        }
        self.sources.iter().flatten().find_map(|m| m.get(&row).copied())
    }
}

fn is_prefix(src: &str, uri: &str) -> bool {
    uri.starts_with(src) && (uri.len() == src.len() || uri.as_bytes()[src.len()] == b'/')
}

impl Index {
    pub fn row(&self, id: RowId) -> &Row {
        &self.rows[id as usize]
    }

    pub fn rows(&self) -> impl Iterator<Item = (RowId, &Row)> {
        self.rows.iter().enumerate().filter(|(_, r)| r.live).map(|(i, r)| (i as RowId, r))
    }

    pub fn insert(&mut self, name: &str, now: Instant) -> RowId {
        let row = Row {
            name: name.to_owned(),
            live: true,
            session: true,
            has_report: false,
            last_seen: now,
            hot: Hot::default(),
            facts: Arc::default(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.rows[id as usize] = row;
                id
            }
            None => {
                self.rows.push(row);
                (self.rows.len() - 1) as RowId
            }
        };
        self.names.insert(name.to_owned(), id);
        id
    }

    /// The live row of the node named `name`.
    pub fn find(&self, name: &str) -> Option<(RowId, &Row)> {
        self.names.get(name).map(|&id| (id, &self.rows[id as usize]))
    }

    pub fn row_mut(&mut self, id: RowId) -> &mut Row {
        &mut self.rows[id as usize]
    }

    fn unindex(&mut self, id: RowId) {
        let old = self.rows[id as usize].facts.clone();
        for key in old.models.keys() {
            if let Some(m) = self.cached.get_mut(key) {
                m.remove(&id);
                if m.is_empty() {
                    self.cached.remove(key);
                }
            }
        }
        for img in &old.images {
            if let Some(m) = self.images.get_mut(img) {
                m.remove(&id);
                if m.is_empty() {
                    self.images.remove(img);
                }
            }
        }
        for (src, _) in &old.bandwidth {
            if let Some(m) = self.bandwidth.get_mut(src) {
                m.remove(&id);
                if m.is_empty() {
                    self.bandwidth.remove(src);
                }
            }
        }
        for r in &old.runtimes {
            if let Some(m) = self.starts.get_mut(&r.model_id) {
                m.remove(&id);
                if m.is_empty() {
                    self.starts.remove(&r.model_id);
                }
            }
            if let Some(m) = self.runtimes.get_mut(&r.model_id) {
                m.remove(&id);
                if m.is_empty() {
                    self.runtimes.remove(&r.model_id);
                }
            }
            if let Some(k) = &r.model_key
                && let Some(m) = self.runtime_keys.get_mut(k)
            {
                m.remove(&id);
                if m.is_empty() {
                    self.runtime_keys.remove(k);
                }
            }
        }
    }

    /// Rows with a runtime whose model id is `name` or that serves the cached model `key`,
    /// each once.
    pub fn rows_running(&self, name: &str, key: &(String, String)) -> impl Iterator<Item = &Row> {
        let by_name = self.runtimes.get(name);
        let by_key =
            self.runtime_keys.get(key).into_iter().flat_map(|m| m.keys()).filter(move |id| !by_name.is_some_and(|n| n.contains_key(id)));
        by_name.into_iter().flat_map(|m| m.keys()).chain(by_key).map(|id| &self.rows[*id as usize])
    }

    /// Replaces a row's facts and its entries in the inverted indexes.
    pub fn set_facts(&mut self, id: RowId, facts: Arc<NodeFacts>) {
        self.unindex(id);
        for (key, c) in &facts.models {
            self.cached.entry(key.clone()).or_default().insert(id, *c);
        }
        for img in &facts.images {
            self.images.entry(img.clone()).or_default().insert(id, ());
        }
        for (src, b) in &facts.bandwidth {
            self.bandwidth.entry(src.clone()).or_default().insert(id, *b);
        }
        for r in &facts.runtimes {
            if let Some(s) = r.start_seconds {
                let e = self.starts.entry(r.model_id.clone()).or_default().entry(id).or_insert(s);
                *e = e.max(s);
            }
            self.runtimes.entry(r.model_id.clone()).or_default().insert(id, ());
            if let Some(k) = &r.model_key {
                self.runtime_keys.entry(k.clone()).or_default().insert(id, ());
            }
        }
        let row = &mut self.rows[id as usize];
        row.hot = Hot::of(&facts);
        row.facts = facts;
    }

    pub fn remove(&mut self, id: RowId) {
        self.unindex(id);
        let row = &mut self.rows[id as usize];
        self.names.remove(&row.name);
        row.live = false;
        row.facts = Arc::default();
        row.name.clear();
        self.free.push(id);
    }

    pub fn columns<'a>(&'a self, key: &(String, String), image: &str, uri: &'a str, name: &str) -> ModelColumns<'a> {
        let mut matching: Vec<(&String, &FastMap<RowId, f64>)> = self.bandwidth.iter().filter(|(src, _)| is_prefix(src, uri)).collect();
        matching.sort_by_key(|(src, _)| std::cmp::Reverse(src.len()));
        let mut sources = [None; 4];
        for (slot, (_, m)) in sources.iter_mut().zip(&matching) {
            *slot = Some(*m);
        }
        ModelColumns {
            cached: self.cached.get(key),
            start: self.starts.get(name),
            image: self.images.get(image),
            // Images are normalized (`registry/repository:tag`): the registry leads.
            image_source: image.split_once('/').and_then(|(registry, _)| self.bandwidth.get(&format!("oci://{registry}"))),
            sources,
            more_sources: matching.len() > sources.len(),
            index: self,
            uri,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::v1 as pb;

    fn facts(models: &[(&str, u64)], images: &[&str], bw: &[(&str, f64)]) -> Arc<NodeFacts> {
        let s = pb::NodeState {
            models: models.iter().map(|(u, b)| pb::CachedModel::ready(*u, *u, "r", *b)).collect(),
            images: images.iter().map(|i| pb::CachedImage { reference: i.to_string(), ..Default::default() }).collect(),
            source_bandwidth: bw
                .iter()
                .map(|(s, b)| pb::SourceBandwidth { source: s.to_string(), bytes_per_second: *b, samples: 1 })
                .collect(),
            ..Default::default()
        };
        Arc::new(NodeFacts::from_state(&s))
    }

    #[test]
    fn inverted_indexes_follow_every_update_and_removal() {
        let mut ix = Index::default();
        let t = Instant::now();
        let a = ix.insert("a", t);
        let b = ix.insert("b", t);
        ix.set_facts(a, facts(&[("s3://m/x", 10)], &["img"], &[("s3://m", 1e9), ("s3://m/x", 2e9)]));
        ix.set_facts(b, facts(&[("s3://m/y", 20)], &[], &[("s3://m", 5e8)]));
        let key = |u: &str| (u.to_owned(), "r".to_owned());
        let c = ix.columns(&key("s3://m/x"), "img", "s3://m/x", "x");
        assert_eq!((c.cached(a).present, c.cached(b).present), (10, 0));
        assert_eq!((c.image_cached(a), c.image_cached(b)), (true, false));
        assert_eq!((c.bandwidth(a), c.bandwidth(b)), (Some(2e9), Some(5e8)), "longest prefix first");
        // "s3://m/xy" is not under "s3://m/x".
        assert_eq!(ix.columns(&key("s3://m/xy"), "", "s3://m/xy", "xy").bandwidth(a), Some(1e9));
        // An update replaces a row's entries; a removal clears them and frees the row.
        ix.set_facts(a, facts(&[], &[], &[]));
        let c = ix.columns(&key("s3://m/x"), "img", "s3://m/x", "x");
        assert_eq!((c.cached(a).present, c.image_cached(a), c.bandwidth(a)), (0, false, None));
        ix.remove(b);
        assert!(ix.cached.is_empty() && ix.images.is_empty() && ix.bandwidth.is_empty() && ix.runtimes.is_empty());
        assert_eq!(ix.rows().count(), 1);
        assert!(ix.find("b").is_none() && ix.find("a").is_some_and(|(id, r)| id == a && r.name == "a"));
        assert_eq!(ix.insert("c", t), b, "the freed row is reused");
        assert_eq!(ix.find("c").map(|(id, _)| id), Some(b));
    }
}
