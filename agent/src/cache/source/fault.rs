//! A fault-injecting wrapper around any source, for tests of the engine's retry, hedging
//! and verification paths: transient errors, throttling, stalls and flipped bytes, each
//! for a given number of reads.

use std::sync::Mutex;
use std::time::Duration;

use super::{BoxFut, Checked, ErrorKind, RemoteObject, Source, SourceError};
use crate::cache::buf::AlignedBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Transient,
    Throttle,
    /// Never answers (until the engine gives up on the attempt).
    Stall,
    /// Returns data with one byte flipped.
    Flip,
}

pub struct FaultSource<S> {
    inner: S,
    /// Faults to inject, in order, one per read of a matching key.
    plan: Mutex<Vec<(String, Fault)>>,
    /// Reads that pass untouched before the first fault.
    skip: std::sync::atomic::AtomicUsize,
}

impl<S: Source> FaultSource<S> {
    pub fn new(inner: S, plan: Vec<(&str, Fault)>) -> Self {
        Self::new_after(inner, plan, 0)
    }

    /// Faults start after `skip` clean reads.
    pub fn new_after(inner: S, plan: Vec<(&str, Fault)>, skip: usize) -> Self {
        Self {
            inner,
            plan: Mutex::new(plan.into_iter().map(|(k, f)| (k.to_owned(), f)).collect()),
            skip: std::sync::atomic::AtomicUsize::new(skip),
        }
    }

    fn take(&self, key: &str) -> Option<Fault> {
        use std::sync::atomic::Ordering;
        if self.skip.load(Ordering::Relaxed) > 0 {
            self.skip.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let mut p = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        let i = p.iter().position(|(k, _)| k == key)?;
        Some(p.remove(i).1)
    }

    pub fn remaining(&self) -> usize {
        self.plan.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<S: Source> Source for FaultSource<S> {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
        self.inner.list()
    }

    fn checksums(&self, objs: Vec<RemoteObject>) -> BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
        self.inner.checksums(objs)
    }

    fn read_into<'a>(
        &'a self,
        obj: &'a RemoteObject,
        offset: u64,
        buf: AlignedBuf,
    ) -> BoxFut<'a, (AlignedBuf, Result<Checked, SourceError>)> {
        Box::pin(async move {
            let err = |kind, reason: &str| SourceError::Read {
                source_name: "fault".into(),
                key: obj.key.clone(),
                offset,
                len: buf.len(),
                reason: reason.into(),
                kind,
            };
            match self.take(&obj.key) {
                None => self.inner.read_into(obj, offset, buf).await,
                Some(Fault::Transient) => {
                    let e = err(ErrorKind::Transient, "injected connection reset");
                    (buf, Err(e))
                }
                Some(Fault::Throttle) => {
                    let e = err(ErrorKind::Throttled, "injected 503 SlowDown");
                    (buf, Err(e))
                }
                Some(Fault::Stall) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    self.inner.read_into(obj, offset, buf).await
                }
                Some(Fault::Flip) => {
                    let (mut buf, r) = self.inner.read_into(obj, offset, buf).await;
                    if let Some(b) = buf.as_mut_slice().first_mut() {
                        *b ^= 0x01;
                    }
                    (buf, r)
                }
            }
        })
    }
}
