//! The worker scaler's I/O shell: one task per Tidepool whose worker tier
//! autoscales, on the leader only (it runs inside the controller).
//!
//! Every `pollingIntervalSeconds` a task reads its signal with one
//! statement over its own single connection to PostgreSQL (opened with the
//! credentials of `worker.autoscaling.secretRef`, else the database Secret;
//! kept open between readings, also past a statement that failed, and
//! opened again once it closed or gave no answer in time): the served
//! queues ([`tidepool::queue::sql::queue_stats`]), or the user's `query`
//! ([`crate::signal::read`]: read-only, under its statement timeout). It
//! turns the reading into a recommendation ([`scaler::recommend`],
//! [`scaler::recommend_value`]), hands it to the pure [`Scaler`], and when
//! it decides on other replicas: an Event on
//! the Tidepool, then `spec.worker.replicas` set with the field manager
//! [`SCALER_MANAGER`] (guarded by the resourceVersion it read). The
//! reconcile that change starts applies it to the Deployment, paced like
//! any other change, within the plan: pools are planned for `maxReplicas`
//! plus the surge.
//!
//! A reading that fails (the database away, a bad Secret, a slow answer)
//! holds the replicas where they are; the reconcile it asks for shows why in
//! the `WorkerAutoscaling` condition. The task reports to the reconcile
//! through a [`Report`]; a new spec's settings restart it, and a change of
//! the credentials' Secret (a rotated password) closes its connection, so
//! the next reading logs in with what the Secret holds now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tidepool_contract::secret::{DatabaseSecret, SecretError};
use tokio::sync::{mpsc, watch};

use crate::crd::{DatabaseTls, Tidepool};
use crate::metrics::Metrics;
use crate::plan::{Plan, Tier};
use crate::render::tls::{CA_KEY, CLIENT_CERT_KEY, CLIENT_KEY_KEY};
use crate::scaler::{
    self, Change, Policy, QueueSignal, QueueState, QueueTarget, Recommendation, Scaler, ValueSignal,
};
use crate::signal::SignalError;

/// The field manager of the replicas the scaler sets.
pub const SCALER_MANAGER: &str = "tidepool-operator/scaler";
/// The longest a connection attempt or a reading of the queues may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than its statement timeout a query's reading may take
/// before the operator gives up on the server (its cancel lost, the
/// network away).
const QUERY_GRACE: Duration = Duration::from_secs(2);

/// What a task needs to know: it restarts when any of it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub policy: Policy,
    pub signal: Signal,
    pub interval: Duration,
    /// The Secret with the credentials.
    pub secret: String,
    /// The TLS of every connection to the database (`database.tls`).
    pub tls: DatabaseTls,
}

/// What the worker tier scales on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Tidepool's queues.
    Queues {
        /// Every queue the workers serve.
        queues: Vec<String>,
        targets: QueueSignal,
    },
    /// The number a user's statement returns.
    Query { sql: String, statement_timeout: Duration, target: ValueSignal },
}

/// The settings of `tidepool`'s worker scaler, if its worker tier
/// autoscales; `plan` gives the jobs one worker pod runs at once.
pub fn settings(tidepool: &Tidepool, plan: &Plan) -> Option<Settings> {
    let worker = &tidepool.spec.worker;
    let autoscaling = worker.autoscaling.as_ref()?;
    let seconds = |s: i32| Duration::from_secs(u64::try_from(s).unwrap_or(0));
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    let policy = Policy {
        min_replicas: count(autoscaling.min_replicas),
        max_replicas: count(autoscaling.max_replicas),
        up_window: seconds(autoscaling.scale_up_stabilization_seconds),
        down_window: seconds(autoscaling.scale_down_stabilization_seconds),
    };
    let signal = match &autoscaling.query {
        Some(query) => Signal::Query {
            sql: query.sql.clone(),
            statement_timeout: seconds(query.statement_timeout_seconds).max(Duration::from_secs(1)),
            target: ValueSignal {
                per_replica: u64::try_from(query.target_value_per_replica).unwrap_or(1).max(1),
                activation: u64::try_from(query.activation_value).unwrap_or(0),
            },
        },
        None => queue_signal(tidepool, plan),
    };
    Some(Settings {
        policy,
        signal,
        interval: seconds(autoscaling.polling_interval_seconds).max(Duration::from_secs(1)),
        secret: autoscaling.secret_ref.as_ref().unwrap_or(&tidepool.spec.database.secret_ref).name.clone(),
        tls: tidepool.spec.database.tls.clone(),
    })
}

/// The served queues' targets: each queue's entry, else
/// `worker.concurrency` available jobs per replica.
fn queue_signal(tidepool: &Tidepool, plan: &Plan) -> Signal {
    let worker = &tidepool.spec.worker;
    let entries = worker.autoscaling.as_ref().map(|a| a.queues.as_slice()).unwrap_or_default();
    let seconds = |s: i32| Duration::from_secs(u64::try_from(s).unwrap_or(0));
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    let jobs_per_pod = plan.tier(Tier::Worker).map_or(1, |t| t.pools.worker_concurrency.max(1));
    let targets = worker
        .queues
        .iter()
        .map(|queue| match entries.iter().find(|q| &q.name == queue) {
            Some(q) => QueueTarget {
                queue: queue.clone(),
                available_jobs_per_replica: q.target_available_jobs_per_replica.map(count),
                max_oldest_job_age: q.max_oldest_job_age_seconds.map(seconds),
            },
            None => QueueTarget {
                queue: queue.clone(),
                available_jobs_per_replica: Some(count(worker.concurrency).max(1)),
                max_oldest_job_age: None,
            },
        })
        .collect();
    Signal::Queues { queues: worker.queues.clone(), targets: QueueSignal { jobs_per_pod, targets } }
}

/// What a scaler task tells the reconcile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The last reading's failure (none once one succeeds), and since when
    /// readings fail.
    pub failure: Option<(String, Time)>,
    /// Whether any reading has been made.
    pub read: bool,
    /// The last change the scaler made.
    pub last_change: Option<Change>,
}

/// Why a reading failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("the Secret {0} does not exist")]
    SecretMissing(String),
    #[error("the Secret {secret} is not a database Secret: {source}")]
    Secret { secret: String, source: SecretError },
    #[error("could not read the Secret {secret}: {source}")]
    Kube { secret: String, source: kube::Error },
    #[error("the Secret {secret} has no key {key} (database.tls)")]
    TlsKeyMissing { secret: String, key: &'static str },
    #[error("database.tls cannot be used: {0}")]
    Tls(#[from] tidepool::tls::TlsError),
    #[error(transparent)]
    Database(#[from] tidepool::db::DbError),
    #[error("the queues could not be read: {0}")]
    Queues(String),
    #[error("the queues were not read within {} s", READ_TIMEOUT.as_secs())]
    Timeout,
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error("the query did not answer within {} s", .0.as_secs())]
    QueryTimeout(Duration),
}

/// What every task shares.
pub struct Shared {
    pub client: Client,
    pub recorder: Recorder,
    pub store: Store<Tidepool>,
    pub metrics: Metrics,
    /// Where to ask for a Tidepool's reconcile (its status shows the report).
    pub retrigger: mpsc::Sender<ObjectRef<Tidepool>>,
}

struct Running {
    settings: Settings,
    /// The version of the Secret with the credentials, as the reconcile
    /// last read it.
    secret_version: watch::Sender<String>,
    task: tokio::task::JoinHandle<()>,
    report: Arc<Mutex<Report>>,
}

/// The running scaler tasks, by Tidepool. Dropping it stops them all.
pub struct Autoscalers {
    shared: Arc<Shared>,
    running: Mutex<HashMap<ObjectRef<Tidepool>, Running>>,
}

impl Autoscalers {
    pub fn new(shared: Shared) -> Self {
        Self { shared: Arc::new(shared), running: Mutex::default() }
    }

    /// Runs `tidepool`'s scaler with `settings` (restarted if they changed),
    /// or stops it when there are none; returns its report. A new
    /// `secret_version` (the credentials' Secret changed: a rotated
    /// password) makes the running task connect again, its state kept.
    pub fn ensure(
        &self,
        tidepool: &Tidepool,
        settings: Option<Settings>,
        secret_version: String,
    ) -> Option<Report> {
        let key = ObjectRef::from_obj(tidepool);
        let mut running = self.running.lock().ok()?;
        let Some(settings) = settings else {
            if let Some(gone) = running.remove(&key) {
                gone.task.abort();
            }
            return None;
        };
        if let Some(current) = running.get(&key) {
            if current.settings == settings && !current.task.is_finished() {
                current.secret_version.send_if_modified(|version| {
                    let changed = *version != secret_version;
                    *version = secret_version;
                    changed
                });
                return current.report.lock().ok().map(|r| r.clone());
            }
        }
        let report = Arc::new(Mutex::new(Report::default()));
        let (version, secret_changes) = watch::channel(secret_version);
        let task = tokio::spawn(run(
            self.shared.clone(),
            key.clone(),
            settings.clone(),
            secret_changes,
            report.clone(),
        ));
        if let Some(replaced) =
            running.insert(key, Running { settings, secret_version: version, task, report })
        {
            replaced.task.abort();
        }
        Some(Report::default())
    }

    /// Stops the scaler of the Tidepool `key`, if any.
    pub fn stop(&self, key: &ObjectRef<Tidepool>) {
        if let Some(gone) = self.running.lock().ok().and_then(|mut running| running.remove(key)) {
            gone.task.abort();
        }
    }
}

impl Drop for Autoscalers {
    fn drop(&mut self) {
        if let Ok(running) = self.running.lock() {
            for task in running.values() {
                task.task.abort();
            }
        }
    }
}

fn worker_replicas(tidepool: &Tidepool) -> u32 {
    u32::try_from(tidepool.spec.worker.replicas).unwrap_or(0)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// One Tidepool's scaler, until it is aborted or its Tidepool is gone.
async fn run(
    shared: Arc<Shared>,
    key: ObjectRef<Tidepool>,
    settings: Settings,
    mut secret_changes: watch::Receiver<String>,
    report: Arc<Mutex<Report>>,
) {
    let Some(tidepool) = shared.store.get(&key) else { return };
    let started = Instant::now();
    let mut scaler = Scaler::new(settings.policy.clone(), Duration::ZERO, worker_replicas(&tidepool));
    let mut connection: Option<tokio_postgres::Client> = None;
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let namespace = key.namespace.clone().unwrap_or_default();
    loop {
        ticker.tick().await;
        let Some(tidepool) = shared.store.get(&key) else { return };
        // PostgreSQL keeps a session that logged in with a password since
        // changed: the new one is used only by a new connection.
        if secret_changes.has_changed().unwrap_or(false) {
            secret_changes.mark_unchanged();
            if connection.take().is_some() {
                tracing::info!(tidepool = %key, secret = %settings.secret, "the credentials' Secret changed: the scaler connects again");
            }
        }
        let current = worker_replicas(&tidepool);
        let reading_started = Instant::now();
        let reading = read(&shared, &namespace, &settings, &mut connection, current).await;
        shared
            .metrics
            .database_query(if reading.is_ok() { "ok" } else { "error" }, reading_started.elapsed());
        let (recommendation, failure) = match reading {
            Ok(recommendation) => (Some(recommendation), None),
            Err(e) => {
                tracing::warn!(tidepool = %key, error = %e, replicas = current, "could not read the scaling signal; the worker replicas hold");
                (None, Some(e.to_string()))
            }
        };
        let decision = scaler.decide(started.elapsed(), recommendation, current);
        let mut changed = false;
        if let Some(change) = &decision.change {
            changed = scale(&shared, &tidepool, change).await;
        }
        let notify = report.lock().is_ok_and(|mut report| {
            let was_failing = report.failure.is_some();
            report.failure = failure.map(|message| {
                let since = report.failure.as_ref().map_or_else(now, |(_, since)| since.clone());
                (message, since)
            });
            let first = !report.read;
            report.read = true;
            if changed {
                report.last_change = decision.change.clone();
            }
            first || changed || was_failing != report.failure.is_some()
        });
        if notify && shared.retrigger.try_send(key.clone()).is_err() {
            tracing::debug!(tidepool = %key, "reconcile queue full; the status follows at the next one");
        }
    }
}

/// Reads the signal over `connection`, opening it first if needed; what
/// it recommends with `current` replicas.
async fn read(
    shared: &Shared,
    namespace: &str,
    settings: &Settings,
    connection: &mut Option<tokio_postgres::Client>,
    current: u32,
) -> Result<Recommendation, ReadError> {
    let mut client = match connection.take() {
        Some(client) if !client.is_closed() => client,
        _ => {
            let mut config = database_config(shared, namespace, &settings.secret).await?;
            let connector = tls_material(shared, namespace, &settings.tls).await?.connector(&mut config)?;
            let client = tidepool::db::connect_with(config, connector, READ_TIMEOUT).await?;
            shared.metrics.database_connects.inc();
            client
        }
    };
    let result = match &settings.signal {
        Signal::Queues { queues, targets } => read_queues(&client, queues)
            .await
            .map(|states| scaler::recommend(&settings.policy, targets, &states, current)),
        Signal::Query { sql, statement_timeout, target } => {
            let limit = *statement_timeout + QUERY_GRACE;
            tokio::time::timeout(limit, crate::signal::read(&mut client, sql, *statement_timeout))
                .await
                .map_err(|_| ReadError::QueryTimeout(limit))
                .and_then(|value| Ok(value?))
                .map(|value| scaler::recommend_value(&settings.policy, *target, value))
        }
    };
    // A statement that failed (a denied table, a server-side timeout, an
    // answer of the wrong shape) leaves its connection usable; one without
    // an answer in time (a stuck server, the network away) may not.
    let stuck = matches!(result, Err(ReadError::Timeout | ReadError::QueryTimeout(_)));
    if !stuck && !client.is_closed() {
        *connection = Some(client);
    }
    result
}

/// The served queues' states, in one statement.
async fn read_queues(
    client: &tokio_postgres::Client,
    queues: &[String],
) -> Result<Vec<QueueState>, ReadError> {
    let stats =
        match tokio::time::timeout(READ_TIMEOUT, tidepool::queue::sql::queue_stats(client, queues)).await {
            Ok(Ok(stats)) => stats,
            Ok(Err(e)) => return Err(ReadError::Queues(tidepool::error_chain(&e))),
            Err(_) => return Err(ReadError::Timeout),
        };
    Ok(stats
        .into_iter()
        .map(|s| QueueState {
            queue: s.queue,
            available: u64::try_from(s.available).unwrap_or(0),
            oldest_age: Duration::from_secs_f64(s.oldest_available_age.clamp(0.0, 1e9)),
            running: u64::try_from(s.running).unwrap_or(0),
        })
        .collect())
}

/// The Secret `name`'s data (its values stay in memory).
async fn secret_data(
    shared: &Shared,
    namespace: &str,
    name: &str,
) -> Result<std::collections::BTreeMap<String, k8s_openapi::ByteString>, ReadError> {
    let secret = Api::<Secret>::namespaced(shared.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| ReadError::Kube { secret: name.to_owned(), source })?
        .ok_or_else(|| ReadError::SecretMissing(name.to_owned()))?;
    Ok(secret.data.unwrap_or_default())
}

/// `database.tls` with its certificates read from their Secrets, as the
/// pods mount them (`ca.crt`; `tls.crt` and `tls.key`).
async fn tls_material(
    shared: &Shared,
    namespace: &str,
    tls: &DatabaseTls,
) -> Result<tidepool::tls::TlsMaterial, ReadError> {
    use tidepool::tls::Pem;
    let read = |name: String, keys: &'static [&'static str]| async move {
        let mut data = secret_data(shared, namespace, &name).await?;
        keys.iter()
            .map(|key| {
                data.remove(*key)
                    .map(|bytes| Pem { origin: format!("the Secret {name}, key {key}"), bytes: bytes.0 })
                    .ok_or(ReadError::TlsKeyMissing { secret: name.clone(), key })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let roots = match &tls.ca_secret_ref {
        Some(ca) => read(ca.name.clone(), &[CA_KEY]).await?.pop(),
        None => None,
    };
    let client_cert = match &tls.client_certificate_secret_ref {
        Some(client) => {
            let mut pems = read(client.name.clone(), &[CLIENT_CERT_KEY, CLIENT_KEY_KEY]).await?.into_iter();
            pems.next().zip(pems.next())
        }
        None => None,
    };
    Ok(tidepool::tls::TlsMaterial { mode: tls.mode.ssl_mode(), roots, client_cert })
}

/// The connection settings in the Secret `name` (its values stay in memory).
async fn database_config(
    shared: &Shared,
    namespace: &str,
    name: &str,
) -> Result<tokio_postgres::Config, ReadError> {
    let data = secret_data(shared, namespace, name).await?;
    let secret = DatabaseSecret::parse(|key| data.get(key).map(|bytes| bytes.0.as_slice()))
        .map_err(|source| ReadError::Secret { secret: name.to_owned(), source })?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&secret.host)
        .port(secret.port)
        .dbname(&secret.dbname)
        .user(&secret.username)
        .password(&secret.password)
        .application_name("tidepool-operator")
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    Ok(config)
}

/// Publishes the decision and sets the worker replicas; whether they were
/// set (a Tidepool changed meanwhile is read again at the next reading).
async fn scale(shared: &Shared, tidepool: &Tidepool, change: &Change) -> bool {
    let direction = change.direction();
    let event = Event {
        type_: EventType::Normal,
        reason: direction.event_reason().into(),
        note: Some(
            format!(
                "worker replicas {} → {} ({}): {}",
                change.from, change.to, change.because.reason, change.because.message
            )
            .chars()
            .take(1000)
            .collect(),
        ),
        // Events with the same action and reason are one series (its note
        // is the first's): the replicas tell decisions apart.
        action: format!("ScaleWorkerFrom{}To{}", change.from, change.to),
        secondary: None,
    };
    if let Err(e) = shared.recorder.publish(&event, &tidepool.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
    let namespace = tidepool.namespace().unwrap_or_default();
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": tidepool.resource_version()},
        "spec": {"worker": {"replicas": change.to}},
    });
    let params = PatchParams { field_manager: Some(SCALER_MANAGER.into()), ..PatchParams::default() };
    shared.metrics.writes("Tidepool").inc();
    match Api::<Tidepool>::namespaced(shared.client.clone(), &namespace)
        .patch(&tidepool.name_any(), &params, &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            shared.metrics.scaling_decision(Tier::Worker, direction);
            tracing::info!(tidepool = %tidepool.name_any(), %namespace, from = change.from, to = change.to,
                reason = change.because.reason, "scaled the worker tier");
            true
        }
        Err(e) => {
            tracing::warn!(tidepool = %tidepool.name_any(), error = %e, "could not set the worker replicas; the next reading decides again");
            false
        }
    }
}
