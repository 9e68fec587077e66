//! The worker tier's scaler, as pure functions: what a signal says the
//! tier needs ([`recommend`] for Tidepool's queues, [`recommend_value`] for
//! the number a user's SQL statement returns), and when to act on it
//! ([`Scaler`]). No I/O and no clock: the caller reads the signal, passes
//! the time, and applies the decision (`crate::autoscaler` does, in the
//! operator).
//!
//! **What the queues ask for.** For each served queue, from one reading of
//! its *available* jobs (due and not claimed), the age of the oldest of them
//! and its running jobs:
//! - a count target asks for `⌈available / target⌉` replicas; the queues'
//!   asks add up (every worker serves every queue);
//! - an age target, once the oldest available job is older than it, asks
//!   for at least one replica more than now, in proportion to how far past
//!   the target it is (`⌈max(current, 1) × age / target⌉`);
//! - running jobs ask for the replicas that hold them (`⌈running / jobs per
//!   pod⌉`), so a tier is not cut below the work it is doing;
//! - any available or running job asks for one replica (scale from zero);
//!   nothing at all asks for none (to `minReplicas`, 0 allowed).
//!
//! **What a value asks for** (the shape of KEDA's `postgresql` trigger: an
//! application that keeps its backlog in a table of its own): a value `v`
//! asks for `⌈v / target⌉` replicas, at least one once `v` is above the
//! activation value, none at or below it.
//!
//! The tier's recommendation is the largest ask, within `[min, max]`.
//!
//! **When to act (stabilization).** Recommendations are kept as a step
//! function of time. The replicas go up only to the least recommendation of
//! the whole up window, and down only to the greatest of the whole down
//! window: a change happens only once every reading over its window agrees
//! with it. So a burst that comes and goes within the up window changes
//! nothing, and a load that wavers around a threshold holds the replicas
//! where they are. A new scaler starts as if the current replicas had been
//! recommended until now, so an operator that restarts waits out the
//! windows before it acts. A reading that failed holds the replicas and
//! records nothing. The windows are the same for both signals.

use std::collections::VecDeque;
use std::time::Duration;

/// A queue's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTarget {
    pub queue: String,
    /// Available jobs one replica should have before another is added.
    pub available_jobs_per_replica: Option<u32>,
    /// The age of the oldest available job past which the tier grows.
    pub max_oldest_job_age: Option<Duration>,
}

/// The worker tier's bounds and stabilization windows, whatever its signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub up_window: Duration,
    pub down_window: Duration,
}

impl Policy {
    fn clamp(&self, replicas: u32) -> u32 {
        replicas.clamp(self.min_replicas, self.max_replicas.max(self.min_replicas))
    }
}

/// What Tidepool's queues are scaled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSignal {
    /// Jobs one worker pod runs at once.
    pub jobs_per_pod: u32,
    /// The targets, one per queue that has any.
    pub targets: Vec<QueueTarget>,
}

/// What a value read with a user's statement is scaled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueSignal {
    /// The value one replica should have before another is added.
    pub per_replica: u64,
    /// At or below this value the tier asks for no replica.
    pub activation: u64,
}

/// One queue as read from the database.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueState {
    pub queue: String,
    /// Jobs that are due and not claimed.
    pub available: u64,
    /// How long the oldest of them has been due (zero without any).
    pub oldest_age: Duration,
    /// Jobs claimed by a worker and not finished.
    pub running: u64,
}

/// What the queues ask for, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recommendation {
    pub replicas: u32,
    /// `QueueBacklog`, `OldestJobAge`, `JobsRunning`, `JobsWaiting` or
    /// `QueuesIdle`.
    pub reason: &'static str,
    pub message: String,
}

/// A change of the replicas the scaler decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub from: u32,
    pub to: u32,
    /// The latest recommendation of the window that set the bound (going
    /// down to 1 while a reading of the window still saw running jobs:
    /// that reading).
    pub because: Recommendation,
}

impl Change {
    pub fn direction(&self) -> Direction {
        Direction::of(self.from, self.to)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    /// The direction of a change from `from` to `to` replicas.
    pub fn of(from: u32, to: u32) -> Direction {
        if to > from {
            Direction::Up
        } else {
            Direction::Down
        }
    }

    /// The reason of the Event that announces the change.
    pub fn event_reason(self) -> &'static str {
        match self {
            Direction::Up => "ScaledUp",
            Direction::Down => "ScaledDown",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// `⌈a / b⌉` for `b > 0`, saturating into `u32`.
fn ceil_div(a: u64, b: u64) -> u32 {
    u32::try_from(a.div_ceil(b.max(1))).unwrap_or(u32::MAX)
}

/// What the queues ask for, within `[min, max]`, given `current` replicas.
pub fn recommend(
    policy: &Policy,
    signal: &QueueSignal,
    states: &[QueueState],
    current: u32,
) -> Recommendation {
    let state = |queue: &str| states.iter().find(|s| s.queue == queue);
    let available: u64 = states.iter().map(|s| s.available).sum();
    let running: u64 = states.iter().map(|s| s.running).sum();

    let mut best = if available > 0 {
        Recommendation { replicas: 1, reason: "JobsWaiting", message: format!("jobs available: {available}") }
    } else if running > 0 {
        Recommendation { replicas: 1, reason: "JobsRunning", message: format!("jobs running: {running}") }
    } else {
        Recommendation { replicas: 0, reason: "QueuesIdle", message: "no job available or running".into() }
    };
    let mut raise = |candidate: Recommendation| {
        if candidate.replicas > best.replicas {
            best = candidate;
        }
    };

    let busy = ceil_div(running, u64::from(signal.jobs_per_pod));
    raise(Recommendation {
        replicas: busy,
        reason: "JobsRunning",
        message: format!("jobs running: {running}, {} per pod", signal.jobs_per_pod),
    });

    let mut backlog = 0u32;
    let mut parts = Vec::new();
    for target in &signal.targets {
        let Some(per_replica) = target.available_jobs_per_replica else { continue };
        let queue_available = state(&target.queue).map_or(0, |s| s.available);
        backlog = backlog.saturating_add(ceil_div(queue_available, u64::from(per_replica)));
        parts.push(format!("{} {queue_available} at {per_replica} per replica", target.queue));
    }
    if !parts.is_empty() {
        raise(Recommendation {
            replicas: backlog,
            reason: "QueueBacklog",
            message: format!("available jobs: {}", parts.join(", ")),
        });
    }

    for target in &signal.targets {
        let (Some(max_age), Some(state)) = (target.max_oldest_job_age, state(&target.queue)) else {
            continue;
        };
        if state.available == 0 || state.oldest_age <= max_age {
            continue;
        }
        let ratio = state.oldest_age.as_secs_f64() / max_age.as_secs_f64().max(0.001);
        let proportional = (f64::from(current.max(1)) * ratio).ceil().min(f64::from(u32::MAX)) as u32;
        raise(Recommendation {
            replicas: proportional.max(current.saturating_add(1)),
            reason: "OldestJobAge",
            message: format!(
                "the oldest available job of {} has waited {:.1} s, past the {:.1} s target",
                target.queue,
                state.oldest_age.as_secs_f64(),
                max_age.as_secs_f64()
            ),
        });
    }

    best.replicas = policy.clamp(best.replicas);
    best
}

/// What the value `value` of a user's statement asks for, within
/// `[min, max]`. A negative value asks for none, like zero.
pub fn recommend_value(policy: &Policy, signal: ValueSignal, value: f64) -> Recommendation {
    let shown = if value.fract() == 0.0 { format!("{value:.0}") } else { format!("{value}") };
    let (replicas, reason) = if value <= signal.activation as f64 {
        (0, "ValueIdle")
    } else {
        let per_replica = signal.per_replica.max(1) as f64;
        let replicas = (value / per_replica).ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
        (replicas, "ValueAboveTarget")
    };
    let message = if reason == "ValueIdle" {
        format!("the query returned {shown}, at or below the activation value {}", signal.activation)
    } else {
        format!("the query returned {shown}, at {} per replica", signal.per_replica)
    };
    Recommendation { replicas: policy.clamp(replicas), reason, message }
}

/// What the scaler decided at one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The replicas to have now.
    pub replicas: u32,
    /// Set when they differ from the current ones.
    pub change: Option<Change>,
    /// What the signal asked for at this reading (none when it failed).
    pub recommendation: Option<Recommendation>,
}

/// The stabilization state of one worker tier: its recent recommendations.
#[derive(Debug, Clone)]
pub struct Scaler {
    policy: Policy,
    /// `(time, recommendation)`, oldest first; each holds until the next.
    history: VecDeque<(Duration, Recommendation)>,
}

impl Scaler {
    /// A scaler that acts as if `current` had been recommended until `now`.
    pub fn new(policy: Policy, now: Duration, current: u32) -> Self {
        let started = Recommendation {
            replicas: current,
            reason: "ScalerStarted",
            message: "the replicas the scaler started with".into(),
        };
        Self { policy, history: VecDeque::from([(now, started)]) }
    }

    /// The decision at `now` (not before the previous reading's time) on
    /// what the reading recommended (none when it failed), with `current`
    /// replicas.
    pub fn decide(
        &mut self,
        now: Duration,
        recommendation: Option<Recommendation>,
        current: u32,
    ) -> Decision {
        let Some(recommendation) = recommendation else {
            return Decision { replicas: current, change: None, recommendation: None };
        };
        let now = now.max(self.history.back().map_or(now, |(at, _)| *at));
        self.history.push_back((now, recommendation.clone()));
        self.forget_before(now.saturating_sub(self.policy.up_window.max(self.policy.down_window)));

        let up_to = self.least_over(now, self.policy.up_window);
        let down_to = self.greatest_over(now, self.policy.down_window);
        let mut replicas = current;
        let mut because = &recommendation;
        if let Some(up_to) = up_to.filter(|r| r.replicas > replicas) {
            (replicas, because) = (up_to.replicas, up_to);
        }
        if let Some(down_to) = down_to.filter(|r| r.replicas < replicas) {
            (replicas, because) = (down_to.replicas, down_to);
        }
        let replicas = self.policy.clamp(replicas);
        let change =
            (replicas != current).then(|| Change { from: current, to: replicas, because: because.clone() });
        Decision { replicas, change, recommendation: Some(recommendation) }
    }

    /// The recommendations in force at any time of `(now − window, now]`,
    /// the one in force at its start included, oldest first.
    fn over(&self, now: Duration, window: Duration) -> impl DoubleEndedIterator<Item = &Recommendation> {
        let start = now.saturating_sub(window);
        let first = self.history.iter().rposition(|(at, _)| *at <= start).unwrap_or(0);
        self.history.iter().skip(first).map(|(_, r)| r)
    }

    /// The least recommendation of the window (the latest of equals:
    /// `min_by_key` keeps the first, of the reversed order).
    fn least_over(&self, now: Duration, window: Duration) -> Option<&Recommendation> {
        self.over(now, window).rev().min_by_key(|r| r.replicas)
    }

    /// The greatest recommendation of the window (the latest of equals:
    /// `max_by_key` keeps the last).
    fn greatest_over(&self, now: Duration, window: Duration) -> Option<&Recommendation> {
        self.over(now, window).max_by_key(|r| r.replicas)
    }

    /// Drops what no window can reach: everything before the last entry at
    /// or before `start`.
    fn forget_before(&mut self, start: Duration) {
        while self.history.len() > 1 && self.history.get(1).is_some_and(|(at, _)| *at <= start) {
            self.history.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy(min: u32, max: u32) -> Policy {
        Policy { min_replicas: min, max_replicas: max, up_window: S(15), down_window: S(60) }
    }

    /// One queue, `default`, at 100 available jobs per replica; 50 jobs per pod.
    fn signal() -> QueueSignal {
        QueueSignal {
            jobs_per_pod: 50,
            targets: vec![QueueTarget {
                queue: "default".into(),
                available_jobs_per_replica: Some(100),
                max_oldest_job_age: None,
            }],
        }
    }

    /// A reading of the queues, or the failure to get one.
    enum Reading {
        Read(Vec<QueueState>),
        Failed,
    }

    impl Scaler {
        /// The decision on a reading of [`signal`]'s queue.
        fn on(&mut self, now: Duration, reading: &Reading, current: u32) -> Decision {
            let recommendation = match reading {
                Reading::Read(states) => Some(recommend(&self.policy, &signal(), states, current)),
                Reading::Failed => None,
            };
            self.decide(now, recommendation, current)
        }
    }

    fn queue(available: u64, oldest: u64, running: u64) -> Vec<QueueState> {
        vec![QueueState { queue: "default".into(), available, oldest_age: S(oldest), running }]
    }

    fn read(available: u64) -> Reading {
        Reading::Read(queue(available, 0, 0))
    }

    #[test]
    fn a_backlog_asks_for_one_replica_per_target() {
        let p = policy(0, 1000);
        assert_eq!(recommend(&p, &signal(), &queue(10_000, 0, 0), 1).replicas, 100);
        assert_eq!(recommend(&p, &signal(), &queue(101, 0, 0), 1).replicas, 2);
        assert_eq!(recommend(&p, &signal(), &queue(1, 0, 0), 0).replicas, 1, "one job starts a worker");
        assert_eq!(recommend(&p, &signal(), &queue(0, 0, 0), 3).replicas, 0, "idle asks for none");
        assert_eq!(recommend(&p, &signal(), &queue(0, 0, 0), 3).reason, "QueuesIdle");
        assert_eq!(
            recommend(&policy(0, 7), &signal(), &queue(10_000, 0, 0), 1).replicas,
            7,
            "never above max"
        );
        assert_eq!(recommend(&policy(2, 7), &signal(), &queue(0, 0, 0), 1).replicas, 2, "never below min");
    }

    #[test]
    fn running_jobs_keep_their_workers() {
        let p = policy(0, 10);
        let r = recommend(&p, &signal(), &queue(0, 0, 120), 5);
        assert_eq!((r.replicas, r.reason), (3, "JobsRunning"));
        assert_eq!(recommend(&p, &signal(), &queue(0, 0, 1), 5).replicas, 1);
    }

    #[test]
    fn the_queues_asks_add_up() {
        let p = policy(0, 100);
        let mut two = signal();
        two.targets.push(QueueTarget {
            queue: "mail".into(),
            available_jobs_per_replica: Some(10),
            max_oldest_job_age: None,
        });
        let states = vec![
            QueueState { queue: "default".into(), available: 250, oldest_age: S(1), running: 0 },
            QueueState { queue: "mail".into(), available: 25, oldest_age: S(1), running: 0 },
        ];
        let r = recommend(&p, &two, &states, 1);
        assert_eq!(r.replicas, 6);
        assert_eq!(r.message, "available jobs: default 250 at 100 per replica, mail 25 at 10 per replica");
    }

    #[test]
    fn an_old_job_scales_up_under_the_count_target() {
        let p = policy(0, 20);
        let mut aged = signal();
        aged.targets[0].max_oldest_job_age = Some(S(30));
        let under_count = queue(10, 90, 0);
        let r = recommend(&p, &aged, &under_count, 2);
        assert_eq!(
            (r.replicas, r.reason),
            (6, "OldestJobAge"),
            "three times the age: three times the replicas"
        );
        assert_eq!(recommend(&p, &aged, &queue(10, 31, 0), 2).replicas, 3, "at least one more");
        assert_eq!(
            recommend(&p, &aged, &queue(10, 30, 0), 2).replicas,
            1,
            "at the target: the count decides"
        );
        assert_eq!(recommend(&p, &aged, &queue(10, 90, 0), 0).replicas, 3, "from zero");
        aged.targets[0].available_jobs_per_replica = None;
        assert_eq!(recommend(&p, &aged, &queue(10, 5, 0), 4).replicas, 1, "an age-only queue of young jobs");
    }

    const BACKLOG: ValueSignal = ValueSignal { per_replica: 20, activation: 0 };

    #[test]
    fn a_value_asks_for_one_replica_per_target() {
        let p = policy(0, 10);
        let ask = |signal, value| {
            let r = recommend_value(&p, signal, value);
            (r.replicas, r.reason)
        };
        assert_eq!(ask(BACKLOG, 0.0), (0, "ValueIdle"));
        assert_eq!(ask(BACKLOG, -5.0), (0, "ValueIdle"), "a negative value is no backlog");
        assert_eq!(ask(BACKLOG, 0.5), (1, "ValueAboveTarget"), "anything above activation starts one");
        assert_eq!(ask(BACKLOG, 20.0), (1, "ValueAboveTarget"));
        assert_eq!(ask(BACKLOG, 21.0), (2, "ValueAboveTarget"));
        assert_eq!(ask(BACKLOG, 1e12), (10, "ValueAboveTarget"), "never above max");
        assert_eq!(ask(BACKLOG, f64::INFINITY), (10, "ValueAboveTarget"));
        let activated = ValueSignal { per_replica: 20, activation: 5 };
        assert_eq!(ask(activated, 5.0), (0, "ValueIdle"), "at activation: none");
        assert_eq!(ask(activated, 6.0), (1, "ValueAboveTarget"));
        assert_eq!(recommend_value(&policy(2, 10), BACKLOG, 0.0).replicas, 2, "never below min");
        assert_eq!(recommend_value(&p, BACKLOG, 45.0).message, "the query returned 45, at 20 per replica");
        assert_eq!(
            recommend_value(&p, activated, 2.5).message,
            "the query returned 2.5, at or below the activation value 5"
        );
    }

    #[test]
    fn a_value_signal_has_the_same_windows() {
        let p = policy(0, 10);
        let mut scaler = Scaler::new(p.clone(), S(0), 1);
        let value = |v| Some(recommend_value(&p, BACKLOG, v));
        assert_eq!(scaler.decide(S(5), value(200.0), 1).replicas, 1, "seen once: wait");
        let up = scaler.decide(S(20), value(200.0), 1).change.expect("up after the up window");
        assert_eq!((up.to, up.because.reason), (10, "ValueAboveTarget"));
        assert_eq!(scaler.decide(S(30), None, 10).replicas, 10, "a failed reading holds");
        assert_eq!(scaler.decide(S(40), value(0.0), 10).replicas, 10);
        assert_eq!(scaler.decide(S(99), value(0.0), 10).replicas, 10, "the down window from the last 200");
        let down = scaler.decide(S(100), value(0.0), 10).change.expect("down after the down window");
        assert_eq!((down.to, down.because.reason), (0, "ValueIdle"));
    }

    #[test]
    fn a_failed_reading_holds_the_replicas() {
        let mut scaler = Scaler::new(policy(0, 10), S(0), 4);
        for t in [10, 100, 1000] {
            let decision = scaler.on(S(t), &Reading::Failed, 4);
            assert_eq!((decision.replicas, decision.change), (4, None));
        }
        // The failures recorded nothing: the next reading still waits out
        // the window from the start.
        assert_eq!(scaler.on(S(1001), &read(0), 4).replicas, 4);
        assert_eq!(scaler.on(S(1062), &read(0), 4).replicas, 0);
    }

    #[test]
    fn up_after_the_up_window_down_after_the_down_window() {
        let mut scaler = Scaler::new(policy(0, 10), S(0), 1);
        assert_eq!(scaler.on(S(5), &read(1000), 1).replicas, 1, "seen once: wait");
        assert_eq!(scaler.on(S(19), &read(1000), 1).replicas, 1, "not yet the whole window");
        let up = scaler.on(S(20), &read(1000), 1);
        assert_eq!(up.replicas, 10);
        assert_eq!(up.change.as_ref().map(|c| (c.from, c.to, c.direction())), Some((1, 10, Direction::Up)));
        assert_eq!(up.change.map(|c| c.because.reason), Some("QueueBacklog"));
        assert_eq!(scaler.on(S(30), &read(0), 10).replicas, 10, "drained: wait the down window");
        assert_eq!(scaler.on(S(80), &read(0), 10).replicas, 10);
        let down = scaler.on(S(90), &read(0), 10);
        assert_eq!((down.replicas, down.change.map(|c| c.direction())), (0, Some(Direction::Down)));
    }

    #[test]
    fn a_change_names_the_reading_that_set_its_bound() {
        let mut scaler = Scaler::new(policy(0, 10), S(0), 2);
        let running = Reading::Read(queue(0, 0, 30));
        assert_eq!(scaler.on(S(10), &running, 2).replicas, 2, "running jobs hold one pod of 50");
        let down = scaler.on(S(71), &read(0), 2).change.expect("down to the running jobs' pod");
        assert_eq!((down.to, down.because.reason), (1, "JobsRunning"), "{down:?}");
        let idle = scaler.on(S(132), &read(0), 1).change.expect("idle");
        assert_eq!((idle.to, idle.because.reason), (0, "QueuesIdle"));
        let mut scaler = Scaler::new(policy(0, 10), S(0), 0);
        scaler.on(S(1), &read(950), 0);
        let up = scaler.on(S(20), &read(120), 0).change.expect("up to the least of the window");
        assert_eq!(
            (up.to, up.because.message.as_str()),
            (2, "available jobs: default 120 at 100 per replica")
        );
    }

    #[test]
    fn a_burst_inside_the_up_window_changes_nothing() {
        let mut scaler = Scaler::new(policy(1, 10), S(0), 1);
        for (t, backlog) in [(20, 0), (25, 900), (30, 900), (34, 0), (40, 0), (100, 0)] {
            assert_eq!(scaler.on(S(t), &read(backlog), 1).change, None, "at {t} s");
        }
    }

    #[test]
    fn a_new_scaler_waits_out_both_windows() {
        let mut scaler = Scaler::new(policy(0, 10), S(100), 5);
        assert_eq!(scaler.on(S(101), &read(0), 5).replicas, 5);
        assert_eq!(scaler.on(S(160), &read(0), 5).replicas, 5);
        assert_eq!(scaler.on(S(161), &read(0), 5).replicas, 0);
    }

    #[test]
    fn zero_windows_follow_each_reading() {
        let mut p = policy(0, 10);
        p.up_window = Duration::ZERO;
        p.down_window = Duration::ZERO;
        let mut scaler = Scaler::new(p, S(0), 0);
        assert_eq!(scaler.on(S(1), &read(250), 0).replicas, 3);
        assert_eq!(scaler.on(S(2), &read(0), 3).replicas, 0);
    }

    /// A scaler's run: readings at increasing times, the replicas it sets
    /// fed back as the current ones.
    fn run(policy: Policy, readings: &[(u64, Option<u64>)], start: u32) -> Vec<(Duration, Decision)> {
        let mut scaler = Scaler::new(policy, Duration::ZERO, start);
        let mut current = start;
        let mut decisions = Vec::new();
        for (t, available) in readings {
            let reading = available.map_or(Reading::Failed, read);
            let decision = scaler.on(S(*t), &reading, current);
            current = decision.replicas;
            decisions.push((S(*t), decision));
        }
        decisions
    }

    fn readings() -> impl Strategy<Value = Vec<(u64, Option<u64>)>> {
        prop::collection::vec((1u64..30, prop::option::weighted(0.9, 0u64..3000)), 1..60).prop_map(|steps| {
            let mut t = 0;
            steps
                .into_iter()
                .map(|(dt, available)| {
                    t += dt;
                    (t, available)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn always_within_the_bounds(min in 0u32..5, extra in 0u32..20, start in 0u32..30, readings in readings()) {
            let max = min + extra.max(1);
            let start = start.clamp(min, max);
            for (_, decision) in run(policy(min, max), &readings, start) {
                prop_assert!((min..=max).contains(&decision.replicas));
            }
        }

        /// A change only to a value every recommendation over its window
        /// agrees with: up to at most the least of the up window, down to
        /// at least the greatest of the down window; a failed reading
        /// changes nothing.
        #[test]
        fn changes_only_what_the_whole_window_agrees_with(readings in readings()) {
            let p = policy(0, 30);
            let decisions = run(p.clone(), &readings, 1);
            let mut in_force: Vec<(Duration, u32)> = vec![(Duration::ZERO, 1)];
            for (at, decision) in &decisions {
                let Some(recommendation) = &decision.recommendation else {
                    prop_assert!(decision.change.is_none());
                    continue;
                };
                in_force.push((*at, recommendation.replicas));
                let window = |w: Duration| {
                    let start = at.saturating_sub(w);
                    let first = in_force.iter().rposition(|(t, _)| *t <= start).unwrap_or(0);
                    in_force[first..].iter().map(|(_, r)| *r).collect::<Vec<_>>()
                };
                if let Some(change) = &decision.change {
                    match change.direction() {
                        Direction::Up => prop_assert!(window(p.up_window).iter().all(|r| *r >= change.to)),
                        Direction::Down => prop_assert!(window(p.down_window).iter().all(|r| *r <= change.to)),
                    }
                }
            }
        }

        /// Steady readings settle on what they ask for once both windows
        /// have passed, and then stay.
        #[test]
        fn a_steady_queue_settles(available in 0u64..5000, start in 0u32..30) {
            let readings: Vec<(u64, Option<u64>)> = (1..=20).map(|i| (i * 10, Some(available))).collect();
            let decisions = run(policy(0, 30), &readings, start);
            let wanted = recommend(&policy(0, 30), &signal(), &queue(available, 0, 0), start).replicas;
            let settled: Vec<u32> = decisions.iter().filter(|(t, _)| *t >= S(70)).map(|(_, d)| d.replicas).collect();
            prop_assert!(settled.iter().all(|r| *r == wanted), "{settled:?} != {wanted}");
            let changes = decisions.iter().filter(|(_, d)| d.change.is_some()).count();
            prop_assert!(changes <= 1);
        }

        /// A greater value never asks for fewer replicas, and every ask is
        /// within the bounds.
        #[test]
        fn a_greater_value_never_asks_for_less(a in -1e6f64..1e9, b in -1e6f64..1e9, per_replica in 1u64..10_000, activation in 0u64..100, min in 0u32..5, extra in 0u32..50) {
            let p = policy(min, min + extra);
            let signal = ValueSignal { per_replica, activation };
            let (low, high) = (recommend_value(&p, signal, a.min(b)), recommend_value(&p, signal, a.max(b)));
            prop_assert!(low.replicas <= high.replicas);
            prop_assert!((min..=min + extra).contains(&low.replicas) && (min..=min + extra).contains(&high.replicas));
        }

        /// More available jobs never ask for fewer replicas.
        #[test]
        fn more_backlog_never_asks_for_less(a in 0u64..100_000, b in 0u64..100_000, current in 0u32..50, age in 0u64..600) {
            let p = policy(0, 1000);
            let mut aged = signal();
            aged.targets[0].max_oldest_job_age = Some(S(60));
            let (low, high) = (a.min(b), a.max(b));
            prop_assert!(recommend(&p, &aged, &queue(low, age, 0), current).replicas <= recommend(&p, &aged, &queue(high, age, 0), current).replicas);
        }

        /// A load that wavers around a threshold, faster than the up
        /// window, never changes the replicas.
        #[test]
        fn wavering_at_a_threshold_does_not_flap(phase in 0u64..2, period in 2u64..6) {
            let readings: Vec<(u64, Option<u64>)> = (1..=120)
                .map(|i| (i * 5, Some(if (i / (period / 2).max(1) + phase) % 2 == 0 { 300 } else { 301 })))
                .collect();
            let decisions = run(policy(0, 30), &readings, 3);
            prop_assert!(decisions.iter().all(|(_, d)| d.change.is_none()));
        }
    }
}
