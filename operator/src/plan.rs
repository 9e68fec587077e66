//! The connection budget: `Input → Plan`, pure arithmetic with no Kubernetes
//! types, so it is tested exhaustively and shared by the controller, the
//! `plan` and `render` commands and the local stack.
//!
//! # The budget
//!
//! `available = maxConnections − reservedConnections`: the reserve holds all
//! that is not a pod's (superuser slots, admins, migrations, the operator,
//! other clients).
//!
//! A pod's **share** `c` is the most server connections its PgBouncer may
//! hold (`max_db_connections = c`). Tidepool's own app's pools add up to `c`, so
//! its clients never queue inside PgBouncer: web has one pool of `c`; a worker has a task
//! pool of `c − q` and its own queue pool of `q` ([`WORKER_QUEUE_CONNECTIONS`]).
//! An application's process ([`Process::ForeignWorker`], or a web tier
//! with a command) may open more clients than `c` ([`TierInput::client_connections`]):
//! PgBouncer accepts them all and they wait there, for at most the tier's
//! `query_wait_timeout`; its server connections still never pass `c`.
//! A worker's optional LISTEN session bypasses PgBouncer and costs one more
//! connection per pod: a pod's **cost** is `c + listen`.
//!
//! The tiers are a list ([`Input::tiers`]), each of a kind ([`Process`]).
//! Each tier **asks** `a` per pod (web: its database pool; worker:
//! concurrency + `q`) and has a **floor** `f`, the least that works (web 1;
//! worker `q + 1`, below which it starves its own heartbeats); both come
//! from its kind, its replicas and surge from its own spec.
//!
//! **Pods at once** per tier: `P = R + s`, `R` the most replicas the tier
//! may have (its autoscaling maximum, else its replicas), `s` the rolling
//! surge from the spec (never derived from the budget, so more budget never
//! gives less). The invariant, at every size the tiers may take:
//!
//! ```text
//! Σ over tiers of P × (c + listen) ≤ available
//! ```
//!
//! If every tier's ask fits, each gets it. Otherwise the shares come from
//! per-pod max-min fairness with floors (water-filling): the largest level
//! `L` with `Σ P × (clamp(L, f, a) + listen) ≤ available`, each pod getting
//! `clamp(L, f, a)`; the remainder stays unused. If even the floors do not
//! fit, the input is refused with the numbers. Deterministic, and monotone in
//! `available`.
//!
//! # Changes
//!
//! A rolling update mixes old and new pods. [`transition`] orders a change
//! into steps, each of which changes either a tier's replicas or its pod
//! template, never both, so that every mix of old and new pods a Deployment
//! may create along the way (with `maxUnavailable: 0`) stays within
//! `available`: replicas come down first, shares that shrink roll next (with
//! the smaller of the old and new surge), then the rest roll, and replicas
//! go up last.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The worker's own connections, outside its task pool: claims, outcomes,
/// heartbeats and maintenance (the pod contract's
/// [`tidepool_contract::QUEUE_POOL_SIZE`], which the runtime opens).
pub const WORKER_QUEUE_CONNECTIONS: u32 = tidepool_contract::QUEUE_POOL_SIZE as u32;
/// Client connections a pod's PgBouncer accepts beyond the app's pools: the
/// readiness check's own connection, the metrics collector on the admin
/// console, and room for an operator's `psql`.
pub const POOLER_SPARE_CLIENTS: u32 = 16;
/// How long a query may wait inside PgBouncer for a server connection, by
/// default. Tidepool's own pools equal the share, so for them this is a
/// backstop, not a queue; for an application's process it is the bound.
pub const POOLER_QUERY_WAIT_TIMEOUT_SECONDS: u32 = 30;

/// What the planner needs to know, in the spec's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// Connections kept out of every pod's reach.
    pub reserved_connections: u32,
    /// Every tier, each kind at most once, in the order they are planned,
    /// rendered and reported.
    pub tiers: Vec<TierInput>,
}

/// One tier as the spec declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierInput {
    /// Replicas wanted now, within `[min_replicas, max_replicas]`.
    pub replicas: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Extra pods a rolling update may add (`maxSurge`).
    pub surge: u32,
    /// What each of its processes does, which decides its ask and floor.
    pub process: Process,
    /// Client connections the process may open to its PgBouncer at once
    /// when that can be more than its pools: an application's process
    /// (gevent, a misconfigured pool) opens one per request or job, and
    /// those beyond the share wait inside PgBouncer. `None`: Tidepool's
    /// own, whose pools equal the share.
    pub client_connections: Option<u32>,
    /// How long such a client may wait there for a server connection.
    pub query_wait_timeout_seconds: u32,
}

/// What a tier's process does with its connections: its kind, with the
/// numbers its ask and floor come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// Serves requests from one pool to PgBouncer: asks for that pool.
    Web { database_pool: u32 },
    /// Runs `concurrency` jobs at once, each of which may hold a connection,
    /// beside its own queue pool; with `listen`, one LISTEN session outside
    /// PgBouncer.
    Worker { concurrency: u32, listen: bool },
    /// An application's worker (Celery): `concurrency` jobs at once, each
    /// of which may hold a connection, and no connections of its own.
    ForeignWorker { concurrency: u32 },
    /// An application's clock process (Celery beat): one pool, as web.
    Clock { database_pool: u32 },
}

impl Process {
    pub fn tier(self) -> Tier {
        match self {
            Process::Web { .. } => Tier::Web,
            Process::Worker { .. } | Process::ForeignWorker { .. } => Tier::Worker,
            Process::Clock { .. } => Tier::Clock,
        }
    }

    /// `(ask, floor, listen)` per pod, or why the numbers cannot work.
    fn demand(self) -> Result<(u32, u32, u32), String> {
        match self {
            Process::Web { database_pool: 0 } | Process::Clock { database_pool: 0 } => {
                Err("databasePool must be at least 1".into())
            }
            Process::Web { database_pool } | Process::Clock { database_pool } => Ok((database_pool, 1, 0)),
            Process::Worker { concurrency: 0, .. } | Process::ForeignWorker { concurrency: 0 } => {
                Err("concurrency must be at least 1".into())
            }
            Process::ForeignWorker { concurrency } => Ok((concurrency, 1, 0)),
            Process::Worker { concurrency, listen } => Ok((
                concurrency.saturating_add(WORKER_QUEUE_CONNECTIONS),
                WORKER_QUEUE_CONNECTIONS + 1,
                u32::from(listen),
            )),
        }
    }

    /// The app's pools within a pod's `share`.
    fn pools(self, share: u32) -> AppPools {
        match self {
            Process::Web { .. } | Process::Clock { .. } => {
                AppPools { database_pool: share, queue_pool: 0, worker_concurrency: 0 }
            }
            Process::ForeignWorker { .. } => {
                AppPools { database_pool: share, queue_pool: 0, worker_concurrency: share }
            }
            Process::Worker { .. } => {
                let tasks = share - WORKER_QUEUE_CONNECTIONS;
                AppPools {
                    database_pool: tasks,
                    queue_pool: WORKER_QUEUE_CONNECTIONS,
                    worker_concurrency: tasks,
                }
            }
        }
    }
}

/// A tier's kind, and its name in children, labels and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Web,
    Worker,
    /// A process that must never run twice (Celery beat, a clock): one
    /// replica, no surge, and admission holds a new pod while another of
    /// the tier holds ([`crate::admission`]).
    Clock,
}

impl Tier {
    /// Every kind there is.
    pub const ALL: [Tier; 3] = [Tier::Web, Tier::Worker, Tier::Clock];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Web => "web",
            Tier::Worker => "worker",
            Tier::Clock => "clock",
        }
    }

    /// The tier whose [`name`](Self::name) is `name` (a pod's component
    /// label, say).
    pub fn named(name: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|tier| tier.name() == name)
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Something kept per tier: the one way the code does so.
pub type PerTier<T> = BTreeMap<Tier, T>;

/// The plan: what every pod of every tier gets, and the totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub max_connections: u32,
    pub reserved_connections: u32,
    /// `max_connections − reserved_connections`.
    pub available: u32,
    /// `Σ P × (c + listen)`: the most connections the tiers can hold at
    /// once, rolling updates included.
    pub planned_peak: u32,
    /// Whether every tier got its ask.
    pub asks_met: bool,
    /// Every tier of the input, in its order.
    pub tiers: Vec<TierPlan>,
}

impl Plan {
    pub fn tier(&self, tier: Tier) -> Option<&TierPlan> {
        self.tiers.iter().find(|t| t.tier == tier)
    }

    pub fn tier_mut(&mut self, tier: Tier) -> Option<&mut TierPlan> {
        self.tiers.iter_mut().find(|t| t.tier == tier)
    }
}

/// One tier's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPlan {
    pub tier: Tier,
    pub process: Process,
    /// Replicas now.
    pub replicas: u32,
    pub min_replicas: u32,
    /// `R`: the most replicas the tier may have.
    pub max_replicas: u32,
    /// `s`: pods a rolling update may add.
    pub surge: u32,
    /// `P = R + s` (0 when the tier has no pods at all).
    pub pods_at_once: u32,
    pub ask: u32,
    pub floor: u32,
    /// `c`: server connections through this pod's PgBouncer.
    pub share: u32,
    /// Direct connections outside PgBouncer per pod (the worker's LISTEN).
    pub listen: u32,
    pub pools: AppPools,
    pub pooler: PoolerSizing,
}

impl TierPlan {
    /// What one pod costs the database: `c + listen`.
    pub fn per_pod(&self) -> u32 {
        self.share + self.listen
    }

    /// `P × (c + listen)`.
    pub fn peak(&self) -> u32 {
        self.pods_at_once * self.per_pod()
    }

    /// Whether the budget cut this tier below its ask.
    pub fn limited(&self) -> bool {
        self.share < self.ask
    }

    /// What one pod's app may do at once within its share: web, its
    /// request pool; a worker, its jobs.
    pub fn app_pool_per_pod(&self) -> u32 {
        match self.process {
            Process::Web { .. } | Process::Clock { .. } => self.pools.database_pool,
            Process::Worker { .. } | Process::ForeignWorker { .. } => self.pools.worker_concurrency,
        }
    }
}

/// The app's pools in one pod; they add up to the pod's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppPools {
    /// Web: the request pool. Worker: the task pool.
    pub database_pool: u32,
    /// Worker: its own queue pool; web: 0.
    pub queue_pool: u32,
    /// Worker: jobs run at once, never more than its task pool, so a job
    /// never waits for a connection it cannot get; web: 0 (its HTTP
    /// concurrency is not the planner's).
    pub worker_concurrency: u32,
}

/// The settings of one pod's PgBouncer that the plan decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolerSizing {
    /// The share: the hard cap of server connections.
    pub max_db_connections: u32,
    /// One (database, user) pair per pod: the whole share.
    pub default_pool_size: u32,
    /// Kept open while idle, so a burst after a quiet spell finds them.
    pub min_pool_size: u32,
    pub max_client_conn: u32,
    pub query_wait_timeout_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "reservedConnections ({reserved}) must be below maxConnections ({max}): nothing would be left for the pods"
    )]
    NothingAvailable { max: u32, reserved: u32 },
    #[error("{tier}: {message}")]
    Invalid { tier: Tier, message: String },
    #[error("the connection budget cannot fit even the least each pod needs: {need_detail} = {need} connections, but only {available} are available (maxConnections {max} − reservedConnections {reserved}); raise maxConnections, lower reservedConnections, or allow fewer pods")]
    FloorsDoNotFit { need: u64, need_detail: String, available: u32, max: u32, reserved: u32 },
}

/// What one tier demands of the budget, in the planner's terms.
#[derive(Debug, Clone, Copy)]
struct Demand {
    input: TierInput,
    ask: u32,
    floor: u32,
    listen: u32,
}

impl Demand {
    fn of(input: &TierInput) -> Result<Demand, PlanError> {
        let tier = input.process.tier();
        let invalid = |message: String| PlanError::Invalid { tier, message };
        let (replicas, min, max) = (input.replicas, input.min_replicas, input.max_replicas);
        if min > max {
            return Err(invalid(format!("minReplicas ({min}) is above maxReplicas ({max})")));
        }
        if !(min..=max).contains(&replicas) {
            return Err(invalid(format!("replicas ({replicas}) must be within [{min}, {max}]")));
        }
        let (ask, floor, listen) = input.process.demand().map_err(invalid)?;
        Ok(Demand { input: *input, ask, floor, listen })
    }

    fn tier(&self) -> Tier {
        self.input.process.tier()
    }

    fn pods_at_once(&self) -> u32 {
        if self.input.max_replicas == 0 {
            0
        } else {
            self.input.max_replicas.saturating_add(self.input.surge)
        }
    }

    /// `P × (clamp(level, f, a) + listen)`, without overflow.
    fn cost_at(&self, level: u32) -> u64 {
        u64::from(self.pods_at_once()) * u64::from(level.clamp(self.floor, self.ask) + self.listen)
    }
}

fn demands(input: &Input) -> Result<Vec<Demand>, PlanError> {
    let mut seen = BTreeSet::new();
    input
        .tiers
        .iter()
        .map(|tier| {
            if !seen.insert(tier.process.tier()) {
                return Err(PlanError::Invalid {
                    tier: tier.process.tier(),
                    message: "is declared twice".into(),
                });
            }
            Demand::of(tier)
        })
        .collect()
}

fn total_at(demands: &[Demand], level: u32) -> u64 {
    demands.iter().map(|d| d.cost_at(level)).sum()
}

/// Sizes every tier to the budget, or refuses with the numbers.
pub fn plan(input: &Input) -> Result<Plan, PlanError> {
    let (max, reserved) = (input.max_connections, input.reserved_connections);
    if reserved >= max {
        return Err(PlanError::NothingAvailable { max, reserved });
    }
    let available = max - reserved;
    let demands = demands(input)?;
    let lowest = demands.iter().map(|d| d.floor).min().unwrap_or(1);
    let highest = demands.iter().map(|d| d.ask).max().unwrap_or(1);

    let need = total_at(&demands, lowest);
    if need > u64::from(available) {
        let need_detail = demands
            .iter()
            .filter(|d| d.pods_at_once() > 0)
            .map(|d| {
                let listen = if d.listen > 0 { format!(" + {} LISTEN", d.listen) } else { String::new() };
                format!("{} {} pods × ({}{listen})", d.tier(), d.pods_at_once(), d.floor)
            })
            .collect::<Vec<_>>()
            .join(" + ");
        return Err(PlanError::FloorsDoNotFit { need, need_detail, available, max, reserved });
    }
    // The largest level that fits: `total_at` is monotone in the level.
    let level = if total_at(&demands, highest) <= u64::from(available) {
        highest
    } else {
        let (mut fits, mut too_much) = (lowest, highest);
        while too_much - fits > 1 {
            let mid = fits + (too_much - fits) / 2;
            if total_at(&demands, mid) <= u64::from(available) {
                fits = mid;
            } else {
                too_much = mid;
            }
        }
        fits
    };

    let tiers: Vec<TierPlan> = demands.iter().map(|d| tier_plan(d, d.ask.min(level.max(d.floor)))).collect();
    Ok(Plan {
        max_connections: max,
        reserved_connections: reserved,
        available,
        planned_peak: tiers.iter().map(TierPlan::peak).sum(),
        asks_met: !tiers.iter().any(TierPlan::limited),
        tiers,
    })
}

fn tier_plan(demand: &Demand, share: u32) -> TierPlan {
    let input = &demand.input;
    TierPlan {
        tier: demand.tier(),
        process: input.process,
        replicas: input.replicas,
        min_replicas: input.min_replicas,
        max_replicas: input.max_replicas,
        surge: input.surge,
        pods_at_once: demand.pods_at_once(),
        ask: demand.ask,
        floor: demand.floor,
        share,
        listen: demand.listen,
        pools: input.process.pools(share),
        pooler: PoolerSizing {
            max_db_connections: share,
            default_pool_size: share,
            min_pool_size: share,
            max_client_conn: share
                .max(input.client_connections.unwrap_or(0))
                .saturating_add(POOLER_SPARE_CLIENTS),
            query_wait_timeout_seconds: input.query_wait_timeout_seconds,
        },
    }
}

/// Which pod template a tier's pods have during a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    Old,
    New,
}

/// One tier during one step of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierStep {
    pub replicas: u32,
    pub template: Template,
    /// What each pod of that template costs: `c + listen`.
    pub per_pod: u32,
    /// The Deployment's `maxSurge` for this step.
    pub surge: u32,
}

impl TierStep {
    /// A tier's pods once its plan has rolled out.
    pub fn at(tier: &TierPlan) -> TierStep {
        TierStep {
            replicas: tier.replicas,
            template: Template::Old,
            per_pod: tier.per_pod(),
            surge: tier.surge,
        }
    }
}

/// The state every tier is brought to by one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub tiers: PerTier<TierStep>,
}

impl Step {
    /// The state a plan's children are in once rolled out.
    pub fn at(plan: &Plan) -> Step {
        Step { tiers: plan.tiers.iter().map(|t| (t.tier, TierStep::at(t))).collect() }
    }

    pub fn tier(&self, tier: Tier) -> Option<&TierStep> {
        self.tiers.get(&tier)
    }

    /// Where `tier` is in this step: a tier the step lacks has no pods yet
    /// (its Deployment is still to be made, with the plan's template).
    pub fn of(&self, tier: &TierPlan) -> TierStep {
        self.tier(tier.tier).copied().unwrap_or(TierStep { replicas: 0, ..TierStep::at(tier) })
    }
}

/// The steps from the children as they are (`from`, every tier with its
/// old template; a tier it lacks has no pods yet) to those of `to`,
/// starting with `from` (over `to`'s tiers). `rolls(tier)` says whether
/// that tier's pod template changes at all (a new image or setting rolls
/// the pods even when the share stays). Each step changes a tier's replicas
/// or its template, not both; see the module's "Changes".
pub fn transition(from: &Step, to: &Plan, rolls: impl Fn(Tier) -> bool) -> Vec<Step> {
    let legs: PerTier<Leg> = to
        .tiers
        .iter()
        .map(|t| {
            let (new, old) = (TierStep::at(t), from.of(t));
            // A new share is a new pod annotation and PgBouncer setting: a roll.
            let rolls = rolls(t.tier) || old.per_pod != new.per_pod;
            (t.tier, Leg { old, new, rolls })
        })
        .collect();
    let mut steps = vec![Step { tiers: legs.iter().map(|(&tier, leg)| (tier, leg.old)).collect() }];
    // 1. Fewer replicas first, with the old pods.
    push_step(&mut steps, &legs, |leg, step| step.replicas = step.replicas.min(leg.new.replicas));
    // 2. Shares that shrink, with the smaller surge of the two.
    push_step(&mut steps, &legs, |leg, step| {
        if leg.rolls && leg.new.per_pod < leg.old.per_pod {
            *step = TierStep {
                template: Template::New,
                per_pod: leg.new.per_pod,
                surge: leg.old.surge.min(leg.new.surge),
                ..*step
            };
        }
    });
    // 3. Every other template change, and the new surge.
    push_step(&mut steps, &legs, |leg, step| {
        if leg.rolls && step.template == Template::Old {
            *step = TierStep { template: Template::New, per_pod: leg.new.per_pod, ..*step };
        }
        step.surge = leg.new.surge;
    });
    // 4. More replicas last, with the new pods.
    push_step(&mut steps, &legs, |leg, step| step.replicas = leg.new.replicas);
    steps
}

/// One tier's way through a [`transition`].
struct Leg {
    old: TierStep,
    new: TierStep,
    /// Whether its pod template changes.
    rolls: bool,
}

/// The state to bring the children to next, from `live` (what the
/// Deployments say now) towards `to`. A change that keeps every pod's cost
/// (no template and no live pod at another cost than `to` gives it,
/// `pods_at_other_costs` says the latter) goes at once: the plan covers
/// every mix of its old and new pods. One that changes a cost goes a step
/// of [`transition`] at a time, the next only once the Deployments have
/// `settled` on the last (rolled out, or given up on by their progress
/// deadline).
pub fn next_step(
    live: &Step,
    to: &Plan,
    rolls: impl Fn(Tier) -> bool,
    settled: bool,
    pods_at_other_costs: bool,
) -> Step {
    let mut steps = transition(live, to, rolls);
    let cost_changes = pods_at_other_costs
        || to.tiers.iter().any(|t| live.tier(t.tier).is_some_and(|now| now.per_pod != t.per_pod()));
    match (cost_changes, settled) {
        (false, _) => steps.pop().unwrap_or_else(|| live.clone()),
        (true, false) => steps.swap_remove(0),
        (true, true) if steps.len() > 1 => steps.swap_remove(1),
        (true, true) => steps.swap_remove(0),
    }
}

/// Appends the last step with each tier changed by `change`, unless
/// nothing changed.
fn push_step(steps: &mut Vec<Step>, legs: &PerTier<Leg>, change: impl Fn(&Leg, &mut TierStep)) {
    let Some(last) = steps.last() else {
        return;
    };
    let mut next = last.clone();
    for (tier, step) in &mut next.tiers {
        if let Some(leg) = legs.get(tier) {
            change(leg, step);
        }
    }
    if &next != last {
        steps.push(next);
    }
}

/// The most connections the pods of one tier can hold while going from
/// step `a` to step `b`, over every mix of old and new pods a Deployment
/// with `maxUnavailable: 0` may create (`None` when the pair changes both
/// replicas and template, which [`transition`] never gives).
pub fn worst_mix(a: &TierStep, b: &TierStep) -> Option<u64> {
    if a.template == b.template && a.per_pod == b.per_pod {
        // A scale: old and new counts are both reached, nothing in between
        // exceeds the larger.
        return Some(u64::from(a.replicas.max(b.replicas)) * u64::from(a.per_pod));
    }
    if a.replicas != b.replicas {
        return None;
    }
    let (r, s) = (u64::from(a.replicas), u64::from(b.surge));
    if r == 0 {
        return Some(0);
    }
    // o old pods and n new ones: o ≤ r, o + n ≤ r + s.
    let worst = (0..=r + s)
        .map(|new| (r + s - new).min(r) * u64::from(a.per_pod) + new * u64::from(b.per_pod))
        .max()
        .unwrap_or(0);
    Some(worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn web(replicas: u32, max_replicas: u32, database_pool: u32) -> TierInput {
        TierInput {
            replicas,
            min_replicas: replicas,
            max_replicas,
            surge: 1,
            process: Process::Web { database_pool },
            client_connections: None,
            query_wait_timeout_seconds: POOLER_QUERY_WAIT_TIMEOUT_SECONDS,
        }
    }

    fn worker(replicas: u32, max_replicas: u32, concurrency: u32, listen: bool) -> TierInput {
        TierInput {
            replicas,
            min_replicas: replicas,
            max_replicas,
            surge: 1,
            process: Process::Worker { concurrency, listen },
            client_connections: None,
            query_wait_timeout_seconds: POOLER_QUERY_WAIT_TIMEOUT_SECONDS,
        }
    }

    fn input(available_total: u32) -> Input {
        Input {
            max_connections: available_total + 10,
            reserved_connections: 10,
            tiers: vec![web(3, 3, 20), worker(2, 2, 50, false)],
        }
    }

    fn tier(plan: &Plan, tier: Tier) -> &TierPlan {
        plan.tier(tier).expect("the tier is planned")
    }

    fn shares(plan: &Plan) -> (u32, u32) {
        (tier(plan, Tier::Web).share, tier(plan, Tier::Worker).share)
    }

    #[test]
    fn asks_are_met_when_they_fit() {
        // web 4 × 20 + worker 3 × 54 = 242.
        let plan = plan(&input(242)).expect("fits");
        assert!(plan.asks_met);
        assert_eq!(shares(&plan), (20, 54));
        assert_eq!(plan.planned_peak, 242);
        assert_eq!(
            tier(&plan, Tier::Worker).pools,
            AppPools { database_pool: 50, queue_pool: 4, worker_concurrency: 50 }
        );
        assert_eq!(tier(&plan, Tier::Worker).app_pool_per_pod(), 50);
        assert_eq!(tier(&plan, Tier::Web).app_pool_per_pod(), 20);
        assert_eq!(tier(&plan, Tier::Web).pooler.max_db_connections, 20);
        assert_eq!(tier(&plan, Tier::Web).pooler.max_client_conn, 20 + POOLER_SPARE_CLIENTS);
    }

    #[test]
    fn water_filling_cuts_the_largest_asks_first() {
        // 90 available: web 4 pods, worker 3 pods. At level 12: 4 × 12 + 3 × 12 = 84; at 13: 91.
        let plan = plan(&input(90)).expect("fits");
        assert!(!plan.asks_met);
        assert_eq!(shares(&plan), (12, 12));
        assert_eq!(plan.planned_peak, 84);
        assert_eq!(tier(&plan, Tier::Worker).pools.worker_concurrency, 8);
        // A small web ask is met in full while the worker is cut.
        let mut small_web = input(90);
        small_web.tiers[0] = web(3, 3, 5);
        assert_eq!(shares(&super::plan(&small_web).expect("fits")), (5, 23));
    }

    #[test]
    fn tiers_are_planned_in_the_inputs_order_whatever_it_is() {
        let mut reversed = input(90);
        reversed.tiers.reverse();
        let (plan, reversed) = (plan(&input(90)).expect("fits"), super::plan(&reversed).expect("fits"));
        assert_eq!(reversed.tiers.iter().map(|t| t.tier).collect::<Vec<_>>(), [Tier::Worker, Tier::Web]);
        assert_eq!(shares(&plan), shares(&reversed));
        assert_eq!(plan.planned_peak, reversed.planned_peak);
    }

    #[test]
    fn one_tier_alone_gets_the_budget_and_none_plans_nothing() {
        let alone = Input { tiers: vec![web(2, 2, 50)], ..input(60) };
        let plan = plan(&alone).expect("fits");
        assert_eq!((plan.tiers.len(), tier(&plan, Tier::Web).share, plan.planned_peak), (1, 20, 60));
        assert_eq!(plan.tier(Tier::Worker), None);
        let none = super::plan(&Input { tiers: vec![], ..input(60) }).expect("nothing to fit");
        assert_eq!((none.planned_peak, none.asks_met), (0, true));
    }

    #[test]
    fn refusal_names_the_numbers() {
        // Floors: web 4 × 1 + worker 3 × 5 = 19.
        let err = plan(&input(18)).expect_err("floors do not fit");
        let message = err.to_string();
        assert!(message.contains("web 4 pods × (1) + worker 3 pods × (5) = 19 connections"), "{message}");
        assert!(
            message.contains("only 18 are available (maxConnections 28 − reservedConnections 10)"),
            "{message}"
        );
        assert!(plan(&input(19)).is_ok());
    }

    #[test]
    fn listen_costs_one_connection_per_worker_pod() {
        let mut with_listen = input(1000);
        with_listen.tiers[1] = worker(2, 2, 50, true);
        let plan = plan(&with_listen).expect("fits");
        assert_eq!(tier(&plan, Tier::Worker).per_pod(), 55);
        assert_eq!(plan.planned_peak, 4 * 20 + 3 * 55);
    }

    #[test]
    fn a_tier_without_pods_costs_nothing() {
        let mut no_worker = input(80);
        no_worker.tiers[1] = worker(0, 0, 50, true);
        let plan = plan(&no_worker).expect("fits");
        assert_eq!(tier(&plan, Tier::Worker).pods_at_once, 0);
        assert_eq!(plan.planned_peak, 80);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut bad = input(100);
        bad.reserved_connections = bad.max_connections;
        assert!(matches!(plan(&bad), Err(PlanError::NothingAvailable { .. })));
        let refusal =
            |tiers: Vec<TierInput>| plan(&Input { tiers, ..input(100) }).expect_err("refused").to_string();
        let mut min_above_max = web(3, 3, 20);
        min_above_max.min_replicas = 5;
        assert_eq!(refusal(vec![min_above_max]), "web: minReplicas (5) is above maxReplicas (3)");
        assert_eq!(
            refusal(vec![TierInput { min_replicas: 1, ..web(4, 3, 20) }]),
            "web: replicas (4) must be within [1, 3]"
        );
        let mut outside = worker(1, 3, 5, false);
        outside.min_replicas = 2;
        assert_eq!(refusal(vec![outside]), "worker: replicas (1) must be within [2, 3]");
        assert_eq!(refusal(vec![web(1, 1, 0)]), "web: databasePool must be at least 1");
        assert_eq!(refusal(vec![worker(1, 1, 0, false)]), "worker: concurrency must be at least 1");
        assert_eq!(
            refusal(vec![web(1, 1, 5), worker(1, 1, 5, false), web(1, 1, 5)]),
            "web: is declared twice"
        );
    }

    #[test]
    fn a_share_that_shrinks_rolls_before_replicas_grow() {
        // Web goes from 3 pods of 20 to 7 pods of 10 on 90 available.
        let old = Input { tiers: vec![web(3, 3, 20), worker(0, 0, 1, false)], ..input(90) };
        let new = Input { tiers: vec![web(7, 7, 10), worker(0, 0, 1, false)], ..old.clone() };
        let (from, to) = (plan(&old).expect("fits"), plan(&new).expect("fits"));
        let steps = transition(&Step::at(&from), &to, |tier| tier == Tier::Web);
        let web: Vec<_> = steps
            .iter()
            .filter_map(|s| s.tier(Tier::Web))
            .map(|s| (s.replicas, s.template, s.per_pod))
            .collect();
        assert_eq!(web, [(3, Template::Old, 20), (3, Template::New, 10), (7, Template::New, 10)]);
    }

    #[test]
    fn a_tier_new_to_the_children_starts_from_no_pods() {
        let only_web = plan(&Input { tiers: vec![web(3, 3, 20)], ..input(242) }).expect("fits");
        let both = plan(&input(242)).expect("fits");
        let steps = transition(&Step::at(&only_web), &both, |_| false);
        let worker: Vec<_> =
            steps.iter().map(|s| s.tier(Tier::Worker).map(|w| (w.replicas, w.template))).collect();
        assert_eq!(worker.first(), Some(&Some((0, Template::Old))));
        assert_eq!(steps.last(), Some(&Step::at(&both)));
        // A tier the new plan lacks is not the planner's any more (its
        // Deployment is swept): no step names it.
        let back = transition(&Step::at(&both), &only_web, |_| false);
        assert!(back.iter().all(|s| s.tier(Tier::Worker).is_none()), "{back:?}");
    }

    /// An application's worker asks one connection per job and nothing of
    /// its own; the clients it may open beyond its share are PgBouncer's to
    /// hold, for the tier's wait.
    #[test]
    fn an_applications_worker_asks_its_concurrency_and_its_clients_wait_in_pgbouncer() {
        let celery = TierInput {
            process: Process::ForeignWorker { concurrency: 50 },
            client_connections: Some(500),
            query_wait_timeout_seconds: 10,
            ..worker(2, 2, 50, false)
        };
        let roomy = plan(&Input { max_connections: 1000, reserved_connections: 10, tiers: vec![celery] })
            .expect("fits");
        let tier = &roomy.tiers[0];
        assert_eq!((tier.ask, tier.floor, tier.share, tier.listen), (50, 1, 50, 0));
        assert_eq!(tier.pools, AppPools { database_pool: 50, queue_pool: 0, worker_concurrency: 50 });
        assert_eq!(tier.pooler.max_client_conn, 500 + POOLER_SPARE_CLIENTS);
        assert_eq!(tier.pooler.query_wait_timeout_seconds, 10);
        // Short of budget: (2 + 1 surge) pods share 30; each runs 10 jobs.
        let short = plan(&Input { max_connections: 40, reserved_connections: 10, tiers: vec![celery] })
            .expect("fits");
        assert_eq!((short.tiers[0].share, short.tiers[0].app_pool_per_pod()), (10, 10));
        assert_eq!(short.tiers[0].pooler.max_client_conn, 500 + POOLER_SPARE_CLIENTS);
    }

    #[test]
    fn tiers_are_named_by_their_kind() {
        for tier in Tier::ALL {
            assert_eq!(Tier::named(tier.name()), Some(tier));
        }
        assert_eq!(Tier::named("web-1"), None);
    }

    fn arb_input() -> impl Strategy<Value = Input> {
        (
            1u32..400,
            0u32..40,
            0u32..4,
            (0u32..6, 0u32..6, 1u32..60),
            (0u32..6, 0u32..6, 1u32..120, 0u8..3),
            any::<bool>(),
        )
            .prop_map(
                |(available, reserved, surge, (web_r, web_extra, pool), (wr, wr_extra, conc, kind), flip)| {
                    // Tidepool's worker without and with LISTEN, or an
                    // application's that opens three clients per job.
                    let (listen, foreign) = (kind == 1, kind == 2);
                    let web = TierInput { surge, ..web(web_r, web_r + web_extra, pool) };
                    let worker = TierInput {
                        surge,
                        min_replicas: wr.min(1),
                        ..worker(wr, wr + wr_extra, conc, listen)
                    };
                    let worker = if foreign {
                        TierInput {
                            process: Process::ForeignWorker { concurrency: conc },
                            client_connections: Some(conc * 3),
                            ..worker
                        }
                    } else {
                        worker
                    };
                    Input {
                        max_connections: available + reserved,
                        reserved_connections: reserved,
                        tiers: if flip { vec![worker, web] } else { vec![web, worker] },
                    }
                },
            )
    }

    /// `rolls` of a change: where the share changes, or where the test says so.
    fn rolls<'a>(
        from: &'a Plan,
        to: &'a Plan,
        roll_web: bool,
        roll_worker: bool,
    ) -> impl Fn(Tier) -> bool + 'a {
        move |t: Tier| {
            let share_changes = from.tier(t).map(TierPlan::per_pod) != to.tier(t).map(TierPlan::per_pod);
            share_changes || if t == Tier::Web { roll_web } else { roll_worker }
        }
    }

    /// The most the pods of every tier hold going from `a` to `b`, or
    /// `None` where a tier changes both replicas and template.
    fn worst_of(a: &Step, b: &Step) -> Option<u64> {
        a.tiers.iter().map(|(tier, a)| b.tier(*tier).and_then(|b| worst_mix(a, b))).sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// At the most pods every tier may have, the invariant holds, and no
        /// pod is below its floor or above its ask.
        #[test]
        fn the_invariant_holds_at_every_tiers_maximum(input in arb_input()) {
            match plan(&input) {
                Ok(plan) => {
                    let sum: u64 = plan.tiers.iter().map(|t| u64::from(t.pods_at_once) * u64::from(t.share + t.listen)).sum();
                    prop_assert!(sum <= u64::from(plan.available));
                    prop_assert_eq!(sum, u64::from(plan.planned_peak));
                    prop_assert_eq!(plan.tiers.len(), input.tiers.len());
                    for (t, asked) in plan.tiers.iter().zip(&input.tiers) {
                        prop_assert_eq!(t.tier, asked.process.tier());
                        prop_assert!(t.floor <= t.share && t.share <= t.ask, "{:?}", t);
                        prop_assert_eq!(t.pools.database_pool + t.pools.queue_pool, t.share);
                        prop_assert_eq!(t.pooler.max_db_connections, t.share);
                        prop_assert!(t.pods_at_once == 0 || t.pods_at_once == t.max_replicas + asked.surge);
                    }
                }
                Err(PlanError::FloorsDoNotFit { need, available, .. }) => prop_assert!(need > u64::from(available)),
                Err(e) => prop_assert!(false, "unexpected refusal: {e}"),
            }
        }

        /// Refused exactly when the floors do not fit.
        #[test]
        fn refused_iff_the_floors_do_not_fit(input in arb_input()) {
            let floors: u64 = input.tiers.iter().map(|t| {
                let pods = u64::from(if t.max_replicas == 0 { 0 } else { t.max_replicas + t.surge });
                pods * u64::from(match t.process {
                    Process::Web { .. } | Process::Clock { .. } => 1,
                    Process::Worker { listen, .. } => WORKER_QUEUE_CONNECTIONS + 1 + u32::from(listen),
                    Process::ForeignWorker { .. } => 1,
                })
            }).sum();
            let available = u64::from(input.max_connections - input.reserved_connections);
            prop_assert_eq!(plan(&input).is_err(), floors > available);
        }

        /// Deterministic, and more `available` never gives a tier less; the
        /// surge never depends on the budget.
        #[test]
        fn more_budget_never_gives_less(input in arb_input(), extra in 0u32..200) {
            let first = plan(&input);
            prop_assert_eq!(&first, &plan(&input));
            let mut richer = input.clone();
            richer.max_connections += extra;
            match (first, plan(&richer)) {
                (Ok(poor), Ok(rich)) => {
                    for (poor, rich) in poor.tiers.iter().zip(&rich.tiers) {
                        prop_assert!(rich.share >= poor.share);
                        prop_assert_eq!(rich.surge, poor.surge);
                        prop_assert_eq!(rich.pods_at_once, poor.pods_at_once);
                    }
                }
                (Ok(_), Err(e)) => prop_assert!(false, "more budget refused: {e}"),
                _ => {}
            }
        }

        /// For a change between two valid specs of one database, every mix
        /// of old and new pods that any step allows stays within the budget,
        /// and the last step is the new plan.
        #[test]
        fn every_step_of_a_change_stays_within_the_budget(
            a in arb_input(), b in arb_input(), roll_web in any::<bool>(), roll_worker in any::<bool>()
        ) {
            // One database: the change is to the tiers, not to the server.
            let mut b = b;
            b.max_connections = a.max_connections;
            b.reserved_connections = a.reserved_connections;
            let (Ok(from), Ok(to)) = (plan(&a), plan(&b)) else { return Ok(()) };
            let steps = transition(&Step::at(&from), &to, rolls(&from, &to, roll_web, roll_worker));
            let last = steps.last().map(|s| s.tiers.iter().map(|(&t, s)| (t, s.replicas, s.per_pod)).collect::<Vec<_>>());
            let planned = to.tiers.iter().map(|t| (t.tier, t.replicas, t.per_pod())).collect::<BTreeSet<_>>();
            prop_assert_eq!(last.map(BTreeSet::from_iter), Some(planned));
            for pair in steps.windows(2) {
                let worst = worst_of(&pair[0], &pair[1]);
                prop_assert!(worst.is_some(), "a step changes both replicas and template: {:?}", pair);
                let total = worst.unwrap_or(0);
                prop_assert!(total <= u64::from(from.available), "{} > {} in {:?}", total, from.available, pair);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// The controller's walk: from the children of one plan, each
        /// [`next_step`] applied and settled in turn reaches the other plan
        /// in at most four steps, each within the budget.
        #[test]
        fn the_controllers_walk_reaches_the_new_plan_within_the_budget(
            a in arb_input(), b in arb_input(), roll_web in any::<bool>(), roll_worker in any::<bool>()
        ) {
            let mut b = b;
            b.max_connections = a.max_connections;
            b.reserved_connections = a.reserved_connections;
            let (Ok(from), Ok(to)) = (plan(&a), plan(&b)) else { return Ok(()) };
            let wants_roll = |tier: Tier| if tier == Tier::Web { roll_web } else { roll_worker };
            let mut live = Step::at(&from);
            let mut rolled = BTreeSet::new();
            for _ in 0..4 {
                let next = next_step(&live, &to, |tier| wants_roll(tier) && !rolled.contains(&tier), true, false);
                // A change that keeps every cost goes at once: the plan covers it.
                let changes_cost = to.tiers.iter().any(|t| live.tier(t.tier).map(|s| s.per_pod) != Some(t.per_pod()));
                if changes_cost {
                    let worst = worst_of(&live, &next);
                    prop_assert!(worst.is_some(), "a step changes both replicas and template: {:?} → {:?}", live, next);
                    let total = worst.unwrap_or(0);
                    prop_assert!(total <= u64::from(from.available), "{} > {}: {:?} → {:?}", total, from.available, live, next);
                }
                for (tier, step) in &next.tiers {
                    if step.template == Template::New {
                        rolled.insert(*tier);
                    }
                }
                live = Step {
                    tiers: next.tiers.iter().map(|(&t, s)| (t, TierStep { template: Template::Old, ..*s })).collect(),
                };
            }
            prop_assert_eq!(&live, &Step::at(&to));
            // Unsettled Deployments hold a change of cost where it is, also
            // when only pods of the last step still have another cost.
            let unsettled = next_step(&Step::at(&from), &to, |_| true, false, false);
            if to.tiers.iter().any(|t| from.tier(t.tier).map(TierPlan::per_pod) != Some(t.per_pod())) {
                prop_assert_eq!(unsettled, Step::at(&from));
            }
            prop_assert_eq!(next_step(&Step::at(&to), &to, |_| true, false, true), Step::at(&to));
        }
    }
}
