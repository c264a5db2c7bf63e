//! The partition reconciler's `Drain`, implemented by the runtime supervisors: before GPUs
//! are repartitioned, every agent-managed runtime bound to them is drained and held; after
//! the apply it starts again. Bound means its `visible_devices` names one of the GPU
//! indices, or names a MIG instance (whose parent GPU the agent-managed spec does not say:
//! such runtimes are held for any repartition, the safe side).
//!
//! The partition subsystem starts before the runtime subsystem, so it holds a [`LateDrain`]
//! that the runtime subsystem fills in; until then nothing runs to be drained.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::partition::reconcile::Drain;

/// Runtimes held by a repartition, and which of them have stopped.
#[derive(Debug)]
pub struct Pauses {
    held: watch::Sender<BTreeSet<String>>,
    stopped: Mutex<BTreeSet<String>>,
    /// Each runtime's name and devices.
    bound: Mutex<Vec<(String, Option<String>)>>,
    /// The longest drain any runtime may take.
    pub(super) deadline: Mutex<Duration>,
}

impl Default for Pauses {
    fn default() -> Self {
        Self {
            held: watch::channel(BTreeSet::new()).0,
            stopped: Mutex::default(),
            bound: Mutex::default(),
            deadline: Mutex::new(Duration::ZERO),
        }
    }
}

impl Pauses {
    pub fn register(&self, name: &str, devices: Option<String>, drain: Duration) {
        self.bound.lock().unwrap_or_else(|p| p.into_inner()).push((name.to_owned(), devices));
        let mut d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        // Its drain, and a second for the supervisor to notice the hold.
        *d = (*d).max(drain + Duration::from_secs(1));
    }

    /// The devices a registered runtime holds, learnt after it started.
    pub fn rebind(&self, name: &str, devices: Option<String>) {
        for (n, d) in self.bound.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if n == name {
                d.clone_from(&devices);
            }
        }
    }

    pub fn unregister(&self, name: &str) {
        self.bound.lock().unwrap_or_else(|p| p.into_inner()).retain(|(n, _)| n != name);
    }

    /// A receiver that changes when the held set does.
    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<String>> {
        self.held.subscribe()
    }

    pub fn is_held(&self, name: &str) -> bool {
        self.held.borrow().contains(name)
    }

    /// The supervisor says its server is down while held.
    pub fn stopped(&self, name: &str) {
        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned());
    }

    fn bound_to(&self, gpus: &[u32]) -> Vec<String> {
        let b = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        b.iter()
            .filter(|(_, d)| {
                d.as_deref().is_some_and(|d| {
                    d.split(',').map(str::trim).any(|x| x.starts_with("MIG-") || x.parse::<u32>().is_ok_and(|i| gpus.contains(&i)))
                })
            })
            .map(|(n, _)| n.clone())
            .collect()
    }
}

impl Drain for Pauses {
    /// Blocks (the reconciler calls it on the blocking pool) until every bound runtime has
    /// stopped, or the deadline passes.
    fn drain(&self, gpus: &[u32]) -> Result<(), String> {
        let names = self.bound_to(gpus);
        if names.is_empty() {
            return Ok(());
        }
        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).retain(|n| !names.contains(n));
        self.held.send_modify(|h| h.extend(names.iter().cloned()));
        let deadline = *self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        loop {
            let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let left: Vec<&String> = names.iter().filter(|n| !stopped.contains(*n)).collect();
            if left.is_empty() {
                return Ok(());
            }
            if t0.elapsed() > deadline {
                self.release(gpus);
                return Err(format!("runtimes {left:?} did not stop within {deadline:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn release(&self, gpus: &[u32]) {
        let names = self.bound_to(gpus);
        self.held.send_modify(|h| h.retain(|n| !names.contains(n)));
    }
}

/// The reconciler's drain, filled in once the runtime subsystem starts.
#[derive(Debug, Default, Clone)]
pub struct LateDrain(Arc<OnceLock<Arc<Pauses>>>);

impl LateDrain {
    pub fn set(&self, p: Arc<Pauses>) {
        let _ = self.0.set(p);
    }
}

impl Drain for LateDrain {
    fn drain(&self, gpus: &[u32]) -> Result<(), String> {
        self.0.get().map_or(Ok(()), |p| p.drain(gpus))
    }
    fn release(&self, gpus: &[u32]) {
        if let Some(p) = self.0.get() {
            p.release(gpus);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_on_the_repartitioned_gpus_are_held_and_stopped_before_the_apply() {
        let p = Arc::new(Pauses::default());
        p.register("on-0", Some("0".into()), Duration::from_millis(100));
        p.register("on-1", Some("1,2".into()), Duration::from_millis(100));
        p.register("mig", Some("MIG-1234".into()), Duration::from_millis(100));
        p.register("nowhere", None, Duration::from_millis(100));
        assert_eq!(p.bound_to(&[0]), ["on-0", "mig"]);
        assert_eq!(p.bound_to(&[2]), ["on-1", "mig"]);
        // A supervisor that stops when held: drain returns once both have.
        let q = p.clone();
        let t = std::thread::spawn(move || q.drain(&[0]));
        while !p.is_held("on-0") {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(p.is_held("mig") && !p.is_held("on-1"));
        p.stopped("on-0");
        p.stopped("mig");
        assert_eq!(t.join().unwrap(), Ok(()));
        p.release(&[0]);
        assert!(!p.is_held("on-0") && !p.is_held("mig"));
        // One that never stops: the drain gives up at the deadline and holds nothing.
        let e = p.drain(&[1]).unwrap_err();
        assert!(e.contains("on-1"), "{e}");
        assert!(!p.is_held("on-1"));
    }
}
