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
//! hold (`max_db_connections = c`). The app's pools add up to `c`, so clients
//! never queue inside PgBouncer: web has one pool of `c`; a worker has a task
//! pool of `c − q` and its own queue pool of `q` ([`WORKER_QUEUE_CONNECTIONS`]).
//! A worker's optional LISTEN session bypasses PgBouncer and costs one more
//! connection per pod: a pod's **cost** is `c + listen`.
//!
//! Each tier **asks** `a` per pod (web: its database pool; worker:
//! concurrency + `q`) and has a **floor** `f`, the least that works (web 1;
//! worker `q + 1`, below which it starves its own heartbeats).
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

use std::fmt;

/// The worker's own connections, outside its task pool: claims, outcomes,
/// heartbeats and maintenance (the pod contract's
/// [`tidepool_contract::QUEUE_POOL_SIZE`], which the runtime opens).
pub const WORKER_QUEUE_CONNECTIONS: u32 = tidepool_contract::QUEUE_POOL_SIZE as u32;
/// Client connections a pod's PgBouncer accepts beyond the app's pools: the
/// readiness check's own connection, the metrics collector on the admin
/// console, and room for an operator's `psql`.
pub const POOLER_SPARE_CLIENTS: u32 = 16;
/// How long a query may wait inside PgBouncer for a server connection. The
/// app's pools equal the share, so this is a backstop, not a queue.
pub const POOLER_QUERY_WAIT_TIMEOUT_SECONDS: u32 = 30;

/// What the planner needs to know, in the spec's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// Connections kept out of every pod's reach.
    pub reserved_connections: u32,
    /// Extra pods a rolling update may add per tier (`maxSurge`).
    pub surge: u32,
    pub web: WebInput,
    pub worker: WorkerInput,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebInput {
    /// Replicas wanted now, within `[min_replicas, max_replicas]`.
    pub replicas: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Connections the web process asks for: its pool to PgBouncer.
    pub database_pool: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInput {
    pub replicas: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Jobs one worker runs at once, each of which may use a connection.
    pub concurrency: u32,
    /// Whether each worker holds a LISTEN session outside PgBouncer.
    pub listen: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Web,
    Worker,
}

impl Tier {
    pub const ALL: [Tier; 2] = [Tier::Web, Tier::Worker];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Web => "web",
            Tier::Worker => "worker",
        }
    }
}

/// One value for each tier, indexed by [`Tier`]: the one way the code keeps
/// something per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerTier<T> {
    pub web: T,
    pub worker: T,
}

impl<T> PerTier<T> {
    /// A value for each tier from `value`.
    pub fn from_fn(mut value: impl FnMut(Tier) -> T) -> Self {
        PerTier { web: value(Tier::Web), worker: value(Tier::Worker) }
    }

    /// Each value changed by `change`, which also gets its tier.
    pub fn map<U>(self, mut change: impl FnMut(Tier, T) -> U) -> PerTier<U> {
        PerTier { web: change(Tier::Web, self.web), worker: change(Tier::Worker, self.worker) }
    }
}

impl<T> std::ops::Index<Tier> for PerTier<T> {
    type Output = T;
    fn index(&self, tier: Tier) -> &T {
        match tier {
            Tier::Web => &self.web,
            Tier::Worker => &self.worker,
        }
    }
}

impl<T> std::ops::IndexMut<Tier> for PerTier<T> {
    fn index_mut(&mut self, tier: Tier) -> &mut T {
        match tier {
            Tier::Web => &mut self.web,
            Tier::Worker => &mut self.worker,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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
    pub web: TierPlan,
    pub worker: TierPlan,
}

impl Plan {
    pub fn tier(&self, tier: Tier) -> &TierPlan {
        match tier {
            Tier::Web => &self.web,
            Tier::Worker => &self.worker,
        }
    }

    pub fn tier_mut(&mut self, tier: Tier) -> &mut TierPlan {
        match tier {
            Tier::Web => &mut self.web,
            Tier::Worker => &mut self.worker,
        }
    }

    pub fn tiers(&self) -> [&TierPlan; 2] {
        [&self.web, &self.worker]
    }
}

/// One tier's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPlan {
    pub tier: Tier,
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
    tier: Tier,
    replicas: u32,
    min_replicas: u32,
    max_replicas: u32,
    surge: u32,
    ask: u32,
    floor: u32,
    listen: u32,
}

impl Demand {
    fn pods_at_once(&self) -> u32 {
        if self.max_replicas == 0 {
            0
        } else {
            self.max_replicas.saturating_add(self.surge)
        }
    }

    /// `P × (clamp(level, f, a) + listen)`, without overflow.
    fn cost_at(&self, level: u32) -> u64 {
        u64::from(self.pods_at_once()) * u64::from(level.clamp(self.floor, self.ask) + self.listen)
    }
}

fn check_replicas(tier: Tier, replicas: u32, min: u32, max: u32) -> Result<(), PlanError> {
    let invalid = |message: String| Err(PlanError::Invalid { tier, message });
    if min > max {
        return invalid(format!("minReplicas ({min}) is above maxReplicas ({max})"));
    }
    if !(min..=max).contains(&replicas) {
        return invalid(format!("replicas ({replicas}) must be within [{min}, {max}]"));
    }
    Ok(())
}

fn demands(input: &Input) -> Result<[Demand; 2], PlanError> {
    let web = &input.web;
    let worker = &input.worker;
    check_replicas(Tier::Web, web.replicas, web.min_replicas, web.max_replicas)?;
    check_replicas(Tier::Worker, worker.replicas, worker.min_replicas, worker.max_replicas)?;
    if web.database_pool == 0 {
        return Err(PlanError::Invalid {
            tier: Tier::Web,
            message: "databasePool must be at least 1".into(),
        });
    }
    if worker.concurrency == 0 {
        return Err(PlanError::Invalid {
            tier: Tier::Worker,
            message: "concurrency must be at least 1".into(),
        });
    }
    Ok([
        Demand {
            tier: Tier::Web,
            replicas: web.replicas,
            min_replicas: web.min_replicas,
            max_replicas: web.max_replicas,
            surge: input.surge,
            ask: web.database_pool,
            floor: 1,
            listen: 0,
        },
        Demand {
            tier: Tier::Worker,
            replicas: worker.replicas,
            min_replicas: worker.min_replicas,
            max_replicas: worker.max_replicas,
            surge: input.surge,
            ask: worker.concurrency.saturating_add(WORKER_QUEUE_CONNECTIONS),
            floor: WORKER_QUEUE_CONNECTIONS + 1,
            listen: u32::from(worker.listen),
        },
    ])
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
                format!("{} {} pods × ({}{listen})", d.tier, d.pods_at_once(), d.floor)
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

    let [web, worker] = demands.map(|d| tier_plan(&d, d.ask.min(level.max(d.floor))));
    let planned_peak = web.peak() + worker.peak();
    let asks_met = !web.limited() && !worker.limited();
    Ok(Plan {
        max_connections: max,
        reserved_connections: reserved,
        available,
        planned_peak,
        asks_met,
        web,
        worker,
    })
}

fn tier_plan(demand: &Demand, share: u32) -> TierPlan {
    let pools = match demand.tier {
        Tier::Web => AppPools { database_pool: share, queue_pool: 0, worker_concurrency: 0 },
        Tier::Worker => {
            let tasks = share - WORKER_QUEUE_CONNECTIONS;
            AppPools { database_pool: tasks, queue_pool: WORKER_QUEUE_CONNECTIONS, worker_concurrency: tasks }
        }
    };
    TierPlan {
        tier: demand.tier,
        replicas: demand.replicas,
        min_replicas: demand.min_replicas,
        max_replicas: demand.max_replicas,
        surge: demand.surge,
        pods_at_once: demand.pods_at_once(),
        ask: demand.ask,
        floor: demand.floor,
        share,
        listen: demand.listen,
        pools,
        pooler: PoolerSizing {
            max_db_connections: share,
            default_pool_size: share,
            min_pool_size: share,
            max_client_conn: share + POOLER_SPARE_CLIENTS,
            query_wait_timeout_seconds: POOLER_QUERY_WAIT_TIMEOUT_SECONDS,
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

/// The state both tiers are brought to by one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub web: TierStep,
    pub worker: TierStep,
}

impl Step {
    pub fn tier(&self, tier: Tier) -> &TierStep {
        match tier {
            Tier::Web => &self.web,
            Tier::Worker => &self.worker,
        }
    }

    pub fn tier_mut(&mut self, tier: Tier) -> &mut TierStep {
        match tier {
            Tier::Web => &mut self.web,
            Tier::Worker => &mut self.worker,
        }
    }
}

impl Step {
    /// The state a plan's children are in once rolled out.
    pub fn at(plan: &Plan) -> Step {
        let at = |t: &TierPlan| TierStep {
            replicas: t.replicas,
            template: Template::Old,
            per_pod: t.per_pod(),
            surge: t.surge,
        };
        Step { web: at(&plan.web), worker: at(&plan.worker) }
    }
}

/// The steps from the children as they are (`from`, every tier with its
/// old template) to those of `to`, starting with `from`. `rolls(tier)` says
/// whether that tier's pod template changes at all (a new image or setting
/// rolls the pods even when the share stays). Each step changes a tier's
/// replicas or its template, not both; see the module's "Changes".
pub fn transition(from: Step, to: &Plan, rolls: impl Fn(Tier) -> bool) -> Vec<Step> {
    // A new share is a new pod annotation and PgBouncer setting: a roll.
    let rolls = |tier: Tier| rolls(tier) || from.tier(tier).per_pod != to.tier(tier).per_pod();
    let mut steps = vec![from];
    // 1. Fewer replicas first, with the old pods.
    push_step(&mut steps, |tier, step| step.replicas = step.replicas.min(to.tier(tier).replicas));
    // 2. Shares that shrink, with the smaller surge of the two.
    push_step(&mut steps, |tier, step| {
        let (old, new) = (from.tier(tier), to.tier(tier));
        if rolls(tier) && new.per_pod() < old.per_pod {
            *step = TierStep {
                template: Template::New,
                per_pod: new.per_pod(),
                surge: old.surge.min(new.surge),
                ..*step
            };
        }
    });
    // 3. Every other template change, and the new surge.
    push_step(&mut steps, |tier, step| {
        let new = to.tier(tier);
        if rolls(tier) && step.template == Template::Old {
            *step = TierStep { template: Template::New, per_pod: new.per_pod(), ..*step };
        }
        step.surge = new.surge;
    });
    // 4. More replicas last, with the new pods.
    push_step(&mut steps, |tier, step| step.replicas = to.tier(tier).replicas);
    steps
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
    live: Step,
    to: &Plan,
    rolls: impl Fn(Tier) -> bool,
    settled: bool,
    pods_at_other_costs: bool,
) -> Step {
    let steps = transition(live, to, rolls);
    let last = steps.last().copied().unwrap_or(live);
    let cost_changes = pods_at_other_costs
        || Tier::ALL.iter().any(|&tier| live.tier(tier).per_pod != to.tier(tier).per_pod());
    match (cost_changes, settled) {
        (false, _) => last,
        (true, false) => live,
        (true, true) => steps.get(1).copied().unwrap_or(last),
    }
}

/// Appends the last step changed by `change`, unless nothing changed.
fn push_step(steps: &mut Vec<Step>, change: impl Fn(Tier, &mut TierStep)) {
    let Some(&last) = steps.last() else {
        return;
    };
    let mut next = last;
    for tier in Tier::ALL {
        change(tier, next.tier_mut(tier));
    }
    if next != last {
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

    fn input(available_total: u32) -> Input {
        Input {
            max_connections: available_total + 10,
            reserved_connections: 10,
            surge: 1,
            web: WebInput { replicas: 3, min_replicas: 3, max_replicas: 3, database_pool: 20 },
            worker: WorkerInput {
                replicas: 2,
                min_replicas: 2,
                max_replicas: 2,
                concurrency: 50,
                listen: false,
            },
        }
    }

    #[test]
    fn asks_are_met_when_they_fit() {
        // web 4 × 20 + worker 3 × 54 = 242.
        let plan = plan(&input(242)).expect("fits");
        assert!(plan.asks_met);
        assert_eq!((plan.web.share, plan.worker.share), (20, 54));
        assert_eq!(plan.planned_peak, 242);
        assert_eq!(plan.worker.pools, AppPools { database_pool: 50, queue_pool: 4, worker_concurrency: 50 });
        assert_eq!(plan.web.pooler.max_db_connections, 20);
        assert_eq!(plan.web.pooler.max_client_conn, 20 + POOLER_SPARE_CLIENTS);
    }

    #[test]
    fn water_filling_cuts_the_largest_asks_first() {
        // 90 available: web 4 pods, worker 3 pods. At level 12: 4 × 12 + 3 × 12 = 84; at 13: 91.
        let plan = plan(&input(90)).expect("fits");
        assert!(!plan.asks_met);
        assert_eq!((plan.web.share, plan.worker.share), (12, 12));
        assert_eq!(plan.planned_peak, 84);
        assert_eq!(plan.worker.pools.worker_concurrency, 8);
        // A small web ask is met in full while the worker is cut.
        let mut small_web = input(90);
        small_web.web.database_pool = 5;
        let plan = super::plan(&small_web).expect("fits");
        assert_eq!((plan.web.share, plan.worker.share), (5, 23));
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
        with_listen.worker.listen = true;
        let plan = plan(&with_listen).expect("fits");
        assert_eq!(plan.worker.per_pod(), 55);
        assert_eq!(plan.planned_peak, 4 * 20 + 3 * 55);
    }

    #[test]
    fn a_tier_without_pods_costs_nothing() {
        let mut no_worker = input(80);
        no_worker.worker =
            WorkerInput { replicas: 0, min_replicas: 0, max_replicas: 0, concurrency: 50, listen: true };
        let plan = plan(&no_worker).expect("fits");
        assert_eq!(plan.worker.pods_at_once, 0);
        assert_eq!(plan.planned_peak, 80);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut bad = input(100);
        bad.reserved_connections = bad.max_connections;
        assert!(matches!(plan(&bad), Err(PlanError::NothingAvailable { .. })));
        let mut bad = input(100);
        bad.web.min_replicas = 5;
        assert!(plan(&bad)
            .expect_err("min > max")
            .to_string()
            .contains("minReplicas (5) is above maxReplicas (3)"));
    }

    #[test]
    fn a_share_that_shrinks_rolls_before_replicas_grow() {
        // Web goes from 3 pods of 20 to 7 pods of 10 on 90 available.
        let mut old = input(90);
        old.web = WebInput { replicas: 3, min_replicas: 3, max_replicas: 3, database_pool: 20 };
        old.worker =
            WorkerInput { replicas: 0, min_replicas: 0, max_replicas: 0, concurrency: 1, listen: false };
        let mut new = old.clone();
        new.web = WebInput { replicas: 7, min_replicas: 7, max_replicas: 7, database_pool: 10 };
        let (from, to) = (plan(&old).expect("fits"), plan(&new).expect("fits"));
        let steps = transition(Step::at(&from), &to, |tier| tier == Tier::Web);
        let web: Vec<_> = steps.iter().map(|s| (s.web.replicas, s.web.template, s.web.per_pod)).collect();
        assert_eq!(web, [(3, Template::Old, 20), (3, Template::New, 10), (7, Template::New, 10)]);
    }

    fn arb_input() -> impl Strategy<Value = Input> {
        (
            1u32..400,
            0u32..40,
            0u32..4,
            (0u32..6, 0u32..6, 1u32..60),
            (0u32..6, 0u32..6, 1u32..120, any::<bool>()),
        )
            .prop_map(
                |(available, reserved, surge, (web_r, web_extra, pool), (wr, wr_extra, conc, listen))| {
                    Input {
                        max_connections: available + reserved,
                        reserved_connections: reserved,
                        surge,
                        web: WebInput {
                            replicas: web_r,
                            min_replicas: web_r,
                            max_replicas: web_r + web_extra,
                            database_pool: pool,
                        },
                        worker: WorkerInput {
                            replicas: wr,
                            min_replicas: wr.min(1),
                            max_replicas: wr + wr_extra,
                            concurrency: conc,
                            listen,
                        },
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// At the most pods every tier may have, the invariant holds, and no
        /// pod is below its floor or above its ask.
        #[test]
        fn the_invariant_holds_at_every_tiers_maximum(input in arb_input()) {
            match plan(&input) {
                Ok(plan) => {
                    let sum: u64 = plan.tiers().iter().map(|t| u64::from(t.pods_at_once) * u64::from(t.share + t.listen)).sum();
                    prop_assert!(sum <= u64::from(plan.available));
                    prop_assert_eq!(sum, u64::from(plan.planned_peak));
                    for t in plan.tiers() {
                        prop_assert!(t.floor <= t.share && t.share <= t.ask, "{:?}", t);
                        prop_assert_eq!(t.pools.database_pool + t.pools.queue_pool, t.share);
                        prop_assert_eq!(t.pooler.max_db_connections, t.share);
                        prop_assert!(t.pods_at_once == 0 || t.pods_at_once == t.max_replicas + input.surge);
                    }
                }
                Err(PlanError::FloorsDoNotFit { need, available, .. }) => prop_assert!(need > u64::from(available)),
                Err(e) => prop_assert!(false, "unexpected refusal: {e}"),
            }
        }

        /// Refused exactly when the floors do not fit.
        #[test]
        fn refused_iff_the_floors_do_not_fit(input in arb_input()) {
            let floors = u64::from(if input.web.max_replicas == 0 { 0 } else { input.web.max_replicas + input.surge })
                + u64::from(if input.worker.max_replicas == 0 { 0 } else { input.worker.max_replicas + input.surge })
                    * u64::from(WORKER_QUEUE_CONNECTIONS + 1 + u32::from(input.worker.listen));
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
                    prop_assert!(rich.web.share >= poor.web.share);
                    prop_assert!(rich.worker.share >= poor.worker.share);
                    prop_assert_eq!(rich.web.surge, poor.web.surge);
                    prop_assert_eq!(rich.worker.pods_at_once, poor.worker.pods_at_once);
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
            let rolls = |tier: Tier| {
                let share_changes = from.tier(tier).per_pod() != to.tier(tier).per_pod();
                share_changes || match tier { Tier::Web => roll_web, Tier::Worker => roll_worker }
            };
            let steps = transition(Step::at(&from), &to, rolls);
            let last = steps.last().expect("at least the start");
            for tier in Tier::ALL {
                prop_assert_eq!(last.tier(tier).replicas, to.tier(tier).replicas);
                prop_assert_eq!(last.tier(tier).per_pod, to.tier(tier).per_pod());
            }
            for pair in steps.windows(2) {
                let mut total = 0u64;
                for tier in Tier::ALL {
                    let worst = worst_mix(pair[0].tier(tier), pair[1].tier(tier));
                    prop_assert!(worst.is_some(), "a step changes both replicas and template: {:?}", pair);
                    total += worst.unwrap_or(0);
                }
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
            let wants_roll = |tier: Tier| match tier { Tier::Web => roll_web, Tier::Worker => roll_worker };
            let mut live = Step::at(&from);
            let mut rolled = PerTier::<bool>::default();
            for _ in 0..4 {
                let next = next_step(live, &to, |tier| wants_roll(tier) && !rolled[tier], true, false);
                // A change that keeps every cost goes at once: the plan covers it.
                let changes_cost = Tier::ALL.iter().any(|&t| live.tier(t).per_pod != to.tier(t).per_pod());
                let mut total = 0u64;
                for tier in Tier::ALL {
                    if changes_cost {
                        let worst = worst_mix(live.tier(tier), next.tier(tier));
                        prop_assert!(worst.is_some(), "a step changes both replicas and template: {:?} → {:?}", live, next);
                        total += worst.unwrap_or(0);
                    }
                    if next.tier(tier).template == Template::New {
                        rolled[tier] = true;
                    }
                }
                prop_assert!(total <= u64::from(from.available), "{} > {}: {:?} → {:?}", total, from.available, live, next);
                live = Step {
                    web: TierStep { template: Template::Old, ..next.web },
                    worker: TierStep { template: Template::Old, ..next.worker },
                };
            }
            prop_assert_eq!(live, Step::at(&to));
            // Unsettled Deployments hold a change of cost where it is, also
            // when only pods of the last step still have another cost.
            let unsettled = next_step(Step::at(&from), &to, |_| true, false, false);
            if Tier::ALL.iter().any(|&t| from.tier(t).per_pod() != to.tier(t).per_pod()) {
                prop_assert_eq!(unsettled, Step::at(&from));
            }
            prop_assert_eq!(next_step(Step::at(&to), &to, |_| true, false, true), Step::at(&to));
        }
    }
}
