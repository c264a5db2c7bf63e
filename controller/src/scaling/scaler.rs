//! One model deployment's replica recommendation, Knative-KPA style, plus lead time.
//!
//! Demand is requests in the system (waiting + running, over every replica). The stable
//! window average drives normal decisions; the panic window average, when it reaches
//! `panic_threshold` x current capacity, switches to panic mode, in which the count only
//! goes up until the stable window has calmed for a whole window. Changes within the
//! tolerance band are ignored; scale-down waits `scale_down_delay` of sustained lower
//! recommendations; with `min_replicas: 0` a deployment with no demand for
//! `scale_to_zero_after` goes to zero, and any demand activates it again at once.
//!
//! Lead time: a new replica takes its predicted time-to-ready (placement's score of its best
//! node) to serve. The scaler projects demand that far ahead from the stable window's trend,
//! so a model whose cold start takes ten minutes scales up while demand is still rising
//! instead of after it has arrived.
//!
//! Pure: time is passed in, nothing here does I/O. The controller's loop and the simulator
//! drive the same code.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::catalog::ScalingSpec;

/// What the replicas of one model reported at one moment.
/// The most a trend projection may multiply current demand by.
const MAX_GROWTH: f64 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    /// Waiting + running requests over every replica (plus any external pending count).
    pub demand: f64,
    /// Highest KV-cache use of a ready replica (0..1).
    pub kv_cache: f64,
    /// Worst TTFT p50 of a ready replica.
    pub ttft_p50: Duration,
    /// Replicas serving now.
    pub ready: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Within tolerance, or nothing changed.
    Steady,
    ScaleUp,
    /// Panic window demand spiked; only up until it calms.
    Panic,
    /// Demand projected `lead_time` ahead needs more replicas than now.
    LeadTime,
    /// KV-cache use or TTFT over target.
    Saturation,
    ScaleDown,
    /// Held up by scale_down_delay.
    CoolingDown,
    ScaleToZero,
    Activation,
    /// Clamped to min/max.
    Bounds,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Steady => "steady",
            Reason::ScaleUp => "scale_up",
            Reason::Panic => "panic",
            Reason::LeadTime => "lead_time",
            Reason::Saturation => "saturation",
            Reason::ScaleDown => "scale_down",
            Reason::CoolingDown => "cooling_down",
            Reason::ScaleToZero => "scale_to_zero",
            Reason::Activation => "activation",
            Reason::Bounds => "bounds",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub desired: u32,
    pub current: u32,
    pub reason: Reason,
    pub panic: bool,
    pub stable_demand: f64,
    pub panic_demand: f64,
    /// Stable demand projected `lead_time` ahead.
    pub projected_demand: f64,
    pub lead_time: Duration,
    /// Replicas the projection asks for at the end of the pre-warm horizon (what pre-warm
    /// plans for), at least `desired`.
    pub upcoming: u32,
}

#[derive(Debug, Clone)]
pub struct Scaler {
    spec: ScalingSpec,
    samples: VecDeque<(Instant, f64)>,
    /// When panic mode started; it lasts at least a stable window.
    panic_since: Option<Instant>,
    /// Unclamped-by-delay recommendations over the last scale_down_delay (plus one older,
    /// which proves the window is covered).
    recent: VecDeque<(Instant, u32)>,
    last_demand_at: Option<Instant>,
    current: u32,
    /// The last recommendation: replicas asked for but not ready yet still count as held.
    last_desired: u32,
}

impl Scaler {
    pub fn new(spec: ScalingSpec, current: u32) -> Self {
        Self {
            spec,
            samples: VecDeque::new(),
            panic_since: None,
            recent: VecDeque::new(),
            last_demand_at: None,
            current,
            last_desired: current,
        }
    }

    pub fn spec(&self) -> &ScalingSpec {
        &self.spec
    }

    /// The replica count the caller actually runs (what the scaler compares against).
    pub fn set_current(&mut self, n: u32) {
        self.current = n;
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    pub fn observe(&mut self, now: Instant, demand: f64) {
        let demand = if demand.is_finite() && demand > 0.0 { demand } else { 0.0 };
        if demand > 0.0 {
            self.last_demand_at = Some(now);
        }
        self.samples.push_back((now, demand));
        while let Some((t, _)) = self.samples.front() {
            if now.saturating_duration_since(*t) > self.spec.stable_window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    fn average(&self, now: Instant, window: Duration) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .rev()
            .take_while(|(t, _)| now.saturating_duration_since(*t) <= window)
            .fold((0.0, 0u32), |(s, n), (_, d)| (s + d, n + 1));
        if n == 0 { 0.0 } else { sum / f64::from(n) }
    }

    /// Where the trend's history starts: after the last sample with no demand. A step up
    /// from zero (a model activating) is not a trend, however steep its least-squares line
    /// over a window that is mostly zeros.
    fn trend_start(&self) -> usize {
        self.samples.iter().rposition(|(_, d)| *d == 0.0).map_or(0, |i| i + 1)
    }

    /// Least-squares slope of demand per second, over the samples from `from` on.
    fn slope(&self, from: usize) -> f64 {
        let Some((t0, _)) = self.samples.get(from) else { return 0.0 };
        let n = (self.samples.len() - from) as f64;
        if n < 3.0 {
            return 0.0;
        }
        let xs = self.samples.range(from..).map(|(t, _)| t.saturating_duration_since(*t0).as_secs_f64());
        let mx = xs.clone().sum::<f64>() / n;
        let my = self.samples.range(from..).map(|(_, d)| d).sum::<f64>() / n;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (x, (_, y)) in xs.zip(self.samples.range(from..)) {
            sxy += (x - mx) * (y - my);
            sxx += (x - mx) * (x - mx);
        }
        if sxx <= f64::EPSILON { 0.0 } else { sxy / sxx }
    }

    fn replicas_for(&self, demand: f64) -> u32 {
        let r = (demand / self.spec.target_concurrency).ceil();
        if r.is_finite() { r.clamp(0.0, f64::from(u32::MAX)) as u32 } else { u32::MAX }
    }

    /// The recommendation for `now`, given the predicted time-to-ready of the next replica
    /// and how far ahead pre-warm looks beyond it. Call after `observe`.
    pub fn recommend(&mut self, now: Instant, obs: &Observation, lead_time: Duration, prewarm_horizon: Duration) -> Recommendation {
        let s = &self.spec;
        let stable = self.average(now, s.stable_window);
        let panic_avg = self.average(now, s.panic_window);
        // A trend needs history: at least half a stable window of samples with demand, or a
        // burst over a second (or an activation from zero) would be extrapolated across a
        // ten-minute cold start. And a projection never asks for more than MAX_GROWTH x
        // today's demand.
        let from = self.trend_start();
        let covered = self.samples.get(from).is_some_and(|(t, _)| now.saturating_duration_since(*t) >= s.stable_window / 2);
        let slope = if covered { self.slope(from).max(0.0) } else { 0.0 };
        let cap = stable.max(panic_avg) * MAX_GROWTH;
        let project = |ahead: Duration| (stable + slope * ahead.as_secs_f64()).min(cap).max(stable);
        let projected = project(lead_time);
        let current = self.current;
        let capacity = f64::from(current.max(1)) * s.target_concurrency;

        // Panic: a short-window spike well over what the replicas can take.
        if panic_avg >= s.panic_threshold * capacity && panic_avg > 0.0 {
            self.panic_since.get_or_insert(now);
        } else if let Some(since) = self.panic_since
            && now.saturating_duration_since(since) >= s.stable_window
        {
            self.panic_since = None;
        }
        let panic = self.panic_since.is_some();

        let mut reason = Reason::Steady;
        let mut want = self.replicas_for(stable);
        if panic {
            want = want.max(self.replicas_for(panic_avg)).max(current);
            reason = Reason::Panic;
        }
        let ahead = self.replicas_for(projected);
        if ahead > want {
            want = ahead;
            reason = Reason::LeadTime;
        }
        // Saturation signals: a replica's KV cache or TTFT over target adds one.
        let saturated = obs.ready > 0 && (obs.kv_cache > s.target_kv_cache || (!s.target_ttft.is_zero() && obs.ttft_p50 > s.target_ttft));
        if saturated && want <= obs.ready {
            want = obs.ready + 1;
            reason = Reason::Saturation;
        }
        // What is held: ready replicas, or more when replicas asked for are still starting.
        // Going down from there waits for the delay like any scale-down, so a replica that
        // is still loading is never cancelled by a quiet moment.
        let held = current.max(self.last_desired);
        // Activation: any demand with nothing held gets one at once.
        if held == 0 && (stable > 0.0 || panic_avg > 0.0) && want == 0 {
            want = 1;
        }
        if held == 0 && want > 0 {
            reason = Reason::Activation;
        }
        // Scale to zero only after the quiet period; until then keep one.
        if want == 0 && held > 0 {
            let quiet = self.last_demand_at.is_none_or(|t| now.saturating_duration_since(t) >= s.scale_to_zero_after);
            if s.min_replicas > 0 || !quiet {
                want = 1;
            }
        }
        let bounded = want.clamp(s.min_replicas, s.max_replicas);
        if bounded != want {
            want = bounded;
            reason = Reason::Bounds;
        }

        let desired = if want > held {
            // Tolerance applies to up and down alike, except when activating from zero.
            if held > 0 && reason != Reason::Panic && f64::from(want) <= f64::from(held) * (1.0 + s.tolerance) {
                reason = Reason::Steady;
                held
            } else {
                if reason == Reason::Steady {
                    reason = Reason::ScaleUp;
                }
                want
            }
        } else if want < held {
            if panic {
                // Never down in panic mode.
                reason = Reason::Panic;
                held
            } else if want > 0 && f64::from(want) >= f64::from(held) * (1.0 - s.tolerance) {
                reason = Reason::Steady;
                held
            } else {
                // Scale down to the highest recommendation of the last scale_down_delay, and
                // only once that much history exists: a brief dip never drops replicas.
                let full = self.recent.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) >= s.scale_down_delay);
                let highest = self.recent.iter().map(|(_, w)| *w).max().unwrap_or(want).max(want);
                if full && highest < held {
                    reason = if highest == 0 { Reason::ScaleToZero } else { Reason::ScaleDown };
                    highest
                } else {
                    reason = Reason::CoolingDown;
                    held
                }
            }
        } else {
            held
        };
        self.last_desired = desired;
        self.recent.push_back((now, want));
        while self.recent.len() > 1 && self.recent.get(1).is_some_and(|(t, _)| now.saturating_duration_since(*t) >= s.scale_down_delay) {
            self.recent.pop_front();
        }
        let upcoming_demand = project(lead_time + prewarm_horizon);
        let upcoming = self.replicas_for(upcoming_demand).clamp(s.min_replicas, s.max_replicas).max(desired);
        Recommendation {
            desired,
            current,
            reason,
            panic,
            stable_demand: stable,
            panic_demand: panic_avg,
            projected_demand: projected,
            lead_time,
            upcoming,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScalingSpec {
        ScalingSpec {
            min_replicas: 0,
            max_replicas: 20,
            target_concurrency: 10.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            scale_down_delay: Duration::from_secs(120),
            scale_to_zero_after: Duration::from_secs(300),
            ..ScalingSpec::defaults()
        }
    }

    /// Feeds `demand` once a second for `secs` seconds and returns the last recommendation,
    /// with its reason replaced by the reason of the last change in the run (if any).
    fn run(s: &mut Scaler, t: &mut Instant, secs: u64, demand: f64, lead: Duration) -> Recommendation {
        let mut last: Option<Recommendation> = None;
        let mut changed = None;
        for _ in 0..secs {
            *t += Duration::from_secs(1);
            s.observe(*t, demand);
            let r = s.recommend(*t, &Observation { demand, ready: s.current(), ..Default::default() }, lead, Duration::ZERO);
            if r.desired != r.current {
                changed = Some(r.reason);
            }
            s.set_current(r.desired);
            last = Some(r);
        }
        let mut last = last.unwrap();
        if let Some(c) = changed
            && last.reason == Reason::Steady
        {
            last.reason = c;
        }
        last
    }

    #[test]
    fn steady_demand_settles_on_demand_over_target() {
        let mut s = Scaler::new(spec(), 1);
        let mut t = Instant::now();
        let r = run(&mut s, &mut t, 120, 45.0, Duration::ZERO);
        assert_eq!(r.desired, 5);
        // 10% tolerance: 52 demand would ask for 6, more than 5 x 1.1 = 5.5: scales.
        assert_eq!(run(&mut s, &mut t, 120, 52.0, Duration::ZERO).desired, 6);
        // 57 asks for 6 too: inside tolerance of 6, nothing changes.
        let r = run(&mut s, &mut t, 30, 57.0, Duration::ZERO);
        assert_eq!((r.desired, r.reason), (6, Reason::Steady));
    }

    #[test]
    fn a_spike_panics_up_and_never_down_until_calm() {
        let mut s = Scaler::new(spec(), 2);
        let mut t = Instant::now();
        run(&mut s, &mut t, 60, 20.0, Duration::ZERO);
        // 10 s at 100: the 6 s panic window sees 100 >= 2 x 20 capacity.
        let r = run(&mut s, &mut t, 10, 100.0, Duration::ZERO);
        assert!(r.panic);
        assert_eq!(r.desired, 10, "panic scales to the panic-window demand");
        // Back to 20: still in panic for a stable window, so no scale-down.
        let r = run(&mut s, &mut t, 30, 20.0, Duration::ZERO);
        assert_eq!((r.desired, r.panic), (10, true));
        // After the window and the scale-down delay it comes back down.
        let r = run(&mut s, &mut t, 240, 20.0, Duration::ZERO);
        assert_eq!((r.desired, r.panic, r.reason), (2, false, Reason::ScaleDown));
    }

    #[test]
    fn scale_down_waits_for_the_delay() {
        let mut s = Scaler::new(spec(), 1);
        let mut t = Instant::now();
        run(&mut s, &mut t, 120, 80.0, Duration::ZERO);
        assert_eq!(s.current(), 8);
        let r = run(&mut s, &mut t, 100, 10.0, Duration::ZERO);
        assert_eq!((r.desired, r.reason), (8, Reason::CoolingDown));
        let r = run(&mut s, &mut t, 120, 10.0, Duration::ZERO);
        assert_eq!((r.desired, r.reason), (1, Reason::ScaleDown));
    }

    #[test]
    fn zero_demand_scales_to_zero_after_the_quiet_period_and_demand_activates() {
        let mut s = Scaler::new(spec(), 1);
        let mut t = Instant::now();
        run(&mut s, &mut t, 60, 5.0, Duration::ZERO);
        let r = run(&mut s, &mut t, 200, 0.0, Duration::ZERO);
        assert_eq!(r.desired, 1, "quiet for 200 s of the 300 s needed");
        let r = run(&mut s, &mut t, 300, 0.0, Duration::ZERO);
        assert_eq!((r.desired, r.reason), (0, Reason::ScaleToZero));
        let r = run(&mut s, &mut t, 1, 1.0, Duration::ZERO);
        assert_eq!((r.desired, r.reason), (1, Reason::Activation));
        // With min_replicas 1 it never goes to zero.
        let mut s = Scaler::new(ScalingSpec { min_replicas: 1, ..spec() }, 1);
        assert_eq!(run(&mut s, &mut t, 1000, 0.0, Duration::ZERO).desired, 1);
    }

    #[test]
    fn a_long_cold_start_scales_up_earlier_on_a_rising_trend() {
        // Demand rises 0.1 requests/s. With a 10-minute time-to-ready the scaler asks for
        // the capacity needed 10 minutes from now; without lead time only for today's.
        let ramp = |lead: Duration| {
            let mut s = Scaler::new(spec(), 1);
            let mut t = Instant::now();
            let mut r = None;
            for i in 0..300u32 {
                t += Duration::from_secs(1);
                let d = 10.0 + 0.1 * f64::from(i);
                s.observe(t, d);
                let rec = s.recommend(t, &Observation { demand: d, ready: s.current(), ..Default::default() }, lead, Duration::ZERO);
                s.set_current(rec.desired);
                r = Some(rec);
            }
            r.unwrap()
        };
        let now_only = ramp(Duration::ZERO);
        let ahead = ramp(Duration::from_secs(600));
        assert!(now_only.desired <= 4, "{now_only:?}");
        assert!(ahead.desired >= now_only.desired + 5, "{ahead:?} vs {now_only:?}");
        assert_eq!(ahead.reason, Reason::LeadTime);
    }

    #[test]
    fn a_step_up_from_zero_is_not_read_as_a_trend() {
        // A model at zero gets 5 requests and keeps them: one replica (target 10) is enough.
        // Reading the step as a ramp over a 10-minute cold start would ask for two.
        let mut s = Scaler::new(spec(), 0);
        let mut t = Instant::now();
        let lead = Duration::from_secs(600);
        run(&mut s, &mut t, 120, 0.0, lead);
        for i in 0..120 {
            t += Duration::from_secs(1);
            s.observe(t, 5.0);
            let r = s.recommend(t, &Observation { demand: 5.0, ready: s.current(), ..Default::default() }, lead, Duration::ZERO);
            s.set_current(r.desired);
            assert_eq!(r.desired, 1, "second {i}: {r:?}");
        }
        // A real ramp that starts from zero is still projected once it has lasted half a
        // stable window.
        let mut s = Scaler::new(spec(), 0);
        run(&mut s, &mut t, 120, 0.0, lead);
        let mut last = None;
        for i in 1..=120u32 {
            t += Duration::from_secs(1);
            let d = 0.5 * f64::from(i);
            s.observe(t, d);
            let r = s.recommend(t, &Observation { demand: d, ready: s.current(), ..Default::default() }, lead, Duration::ZERO);
            s.set_current(r.desired);
            last = Some(r);
        }
        let r = last.unwrap();
        assert!(r.desired > 6 && r.reason == Reason::LeadTime, "60 requests now, rising 0.5/s: {r:?}");
    }

    #[test]
    fn replicas_still_starting_are_held_through_a_quiet_moment() {
        let mut s = Scaler::new(spec(), 0);
        let mut t = Instant::now();
        let obs = |d: f64| Observation { demand: d, ready: 0, ..Default::default() };
        t += Duration::from_secs(1);
        s.observe(t, 30.0);
        let r = s.recommend(t, &obs(30.0), Duration::ZERO, Duration::ZERO);
        assert_eq!((r.desired, r.reason), (3, Reason::Activation));
        // Nothing is ready yet (current stays 0) and the queue drains to the gateway: the
        // three replicas loading weights are kept, not dropped to zero.
        for _ in 0..200 {
            t += Duration::from_secs(1);
            s.observe(t, 0.0);
            let r = s.recommend(t, &obs(0.0), Duration::ZERO, Duration::ZERO);
            assert!(r.desired >= 1, "{r:?}");
        }
        // After the scale-down delay it comes down to one, and to zero only after the quiet period.
        assert_eq!(s.recommend(t, &obs(0.0), Duration::ZERO, Duration::ZERO).desired, 1);
        for _ in 0..400 {
            t += Duration::from_secs(1);
            s.observe(t, 0.0);
            s.recommend(t, &obs(0.0), Duration::ZERO, Duration::ZERO);
        }
        assert_eq!(s.recommend(t, &obs(0.0), Duration::ZERO, Duration::ZERO).desired, 0);
    }

    #[test]
    fn saturation_adds_a_replica_and_bounds_clamp() {
        let mut s = Scaler::new(ScalingSpec { max_replicas: 3, ..spec() }, 2);
        let t = Instant::now();
        s.observe(t, 5.0);
        let r =
            s.recommend(t, &Observation { demand: 5.0, kv_cache: 0.95, ready: 2, ..Default::default() }, Duration::ZERO, Duration::ZERO);
        assert_eq!((r.desired, r.reason), (3, Reason::Saturation));
        s.observe(t, 500.0);
        let r = s.recommend(t, &Observation { demand: 500.0, ready: 2, ..Default::default() }, Duration::ZERO, Duration::ZERO);
        assert_eq!(r.desired, 3);
    }
}
