//! Owned tasks. Every long-lived task of a Hearth process runs in a [`Tasks`] set that
//! belongs to one subsystem: it is tracked (shutdown waits for it, bounded by a grace
//! period), it carries the subsystem's cancellation token, and a panic in it is logged and
//! counted in `hearth_task_panics_total{subsystem,task}` instead of vanishing with the task.
//! Labels are the static names the code gives, so their cardinality is the number of task
//! kinds in the binary.

use std::future::Future;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

type Labels = [(&'static str, &'static str); 2];

/// The counters every task set reports into; registered once per process.
#[derive(Debug, Clone, Default)]
pub struct TaskMetrics {
    panics: Family<Labels, Counter>,
    running: Family<Labels, Gauge>,
}

impl TaskMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("hearth_task_panics", "Tasks that ended in a panic, by subsystem and task", m.panics.clone());
        registry.register("hearth_tasks_running", "Tasks running now, by subsystem and task", m.running.clone());
        m
    }

    /// Panics counted so far for one subsystem and task (for tests and status).
    pub fn panics(&self, subsystem: &'static str, task: &'static str) -> u64 {
        self.panics.get_or_create(&[("subsystem", subsystem), ("task", task)]).get()
    }
}

/// The tasks of one subsystem.
#[derive(Debug, Clone)]
pub struct Tasks {
    owner: &'static str,
    tracker: TaskTracker,
    cancel: CancellationToken,
    metrics: TaskMetrics,
}

impl Tasks {
    pub fn new(owner: &'static str, cancel: CancellationToken, metrics: TaskMetrics) -> Self {
        Self { owner, tracker: TaskTracker::new(), cancel, metrics }
    }

    pub fn owner(&self) -> &'static str {
        self.owner
    }

    /// Cancelled when the process shuts down; every task here must end soon after.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    fn labels(&self, task: &'static str) -> Labels {
        [("subsystem", self.owner), ("task", task)]
    }

    /// Runs `fut` as a tracked task named `task`, in the current span.
    pub fn spawn<F>(&self, task: &'static str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let labels = self.labels(task);
        let (panics, running) = (self.metrics.panics.clone(), self.metrics.running.clone());
        let owner = self.owner;
        let inner = tokio::spawn(fut.in_current_span());
        running.get_or_create(&labels).inc();
        self.tracker.spawn(async move {
            let ended = inner.await;
            running.get_or_create(&labels).dec();
            if let Err(e) = ended
                && e.is_panic()
            {
                panics.get_or_create(&labels).inc();
                tracing::error!(subsystem = owner, task, panic = %panic_message(e.into_panic()), "task panicked");
            }
        });
    }

    /// Runs blocking `f` on the blocking pool as a tracked task named `task`.
    pub fn spawn_blocking<F>(&self, task: &'static str, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let span = tracing::Span::current();
        self.spawn(task, async move {
            // The inner task's panic surfaces here as a JoinError; re-raise it so the
            // watcher above counts it under this task's name.
            if let Err(e) = tokio::task::spawn_blocking(move || span.in_scope(f)).await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        });
    }

    /// Runs `fut` tracked, and hands back its output (None if it panicked, counted as above).
    pub fn run<F, T>(&self, task: &'static str, fut: F) -> tokio::sync::oneshot::Receiver<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.spawn(task, async move {
            let _ = tx.send(fut.await);
        });
        rx
    }

    /// No new tasks after this; [`Tasks::wait`] then resolves when the last one ends.
    pub fn close(&self) {
        self.tracker.close();
    }

    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map_or_else(|| "(non-string panic payload)".to_owned(), |s| (*s).to_owned()),
    }
}

/// Awaits a closed task set within `grace`; false if tasks were still running then.
pub async fn drain(tasks: &Tasks, grace: std::time::Duration) -> bool {
    tasks.close();
    tokio::time::timeout(grace, tasks.wait()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_task_is_counted_and_shutdown_still_completes() {
        let m = TaskMetrics::default();
        let t = Tasks::new("cache", CancellationToken::new(), m.clone());
        t.spawn("download", async { panic!("boom") });
        t.spawn_blocking("scan", || panic!("blocking boom"));
        let stop = t.cancel_token().clone();
        t.spawn("loop", async move { stop.cancelled().await });
        let out = t.run("answer", async { 42 });
        assert_eq!(out.await.ok(), Some(42));
        t.cancel_token().cancel();
        assert!(drain(&t, Duration::from_secs(5)).await, "tasks did not end");
        assert_eq!(m.panics("cache", "download"), 1);
        assert_eq!(m.panics("cache", "scan"), 1);
        assert_eq!(m.panics("cache", "loop"), 0);
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_reports_a_task_that_outlives_the_grace_period() {
        let t = Tasks::new("x", CancellationToken::new(), TaskMetrics::default());
        t.spawn("stuck", std::future::pending());
        assert!(!drain(&t, Duration::from_secs(1)).await);
    }
}
