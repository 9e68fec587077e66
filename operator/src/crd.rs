//! The `Tidepool` custom resource (`tidepool.dev/v1alpha1`).
//!
//! Every field has a description, so `kubectl explain tidepool.spec` teaches
//! the resource. The CEL rules here check what one object can say about
//! itself (ranges, minimum ≤ maximum, reserved < max, allow-listed pooler
//! parameters), each with a message a person can act on; they run in the API
//! server and, through [`Tidepool::validate_cel`], offline in `plan` and
//! `render`. Whether the budget fits is the planner's to say
//! ([`crate::plan`]), never a CEL rule's.
//!
//! `manifests/crd.yaml` is generated from these types (`tidepool-operator
//! crd`); a test fails when it is stale.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVarSource, Probe, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Tidepool's own image, of the operator's version: the application image
/// when the spec names none, and the one `pooler-config` and the PgBouncer
/// exporter run from in every pod (`spec.tidepoolImage`).
pub const DEFAULT_IMAGE: &str = concat!("localhost/tidepool:", env!("CARGO_PKG_VERSION"));
/// The port a tier's container with a command of its own serves on, by
/// name: its probes and (web) the Service name it.
pub const PROCESS_PORT_NAME: &str = "app";
/// The PgBouncer sidecar's image when the spec names none (PgBouncer ≥ 1.23:
/// it waits for its clients on SIGTERM).
pub const DEFAULT_POOLER_IMAGE: &str = "localhost/tidepool-pgbouncer:1.24.1";

/// PgBouncer settings a spec may set in `spec.pooler.parameters`. The
/// sizing ones (pool sizes, `max_db_connections`, `max_client_conn`,
/// `query_wait_timeout`), the pool mode, addresses and authentication are the
/// operator's and are refused.
pub const POOLER_PARAMETERS: &[&str] = &[
    "application_name_add_host",
    "cancel_wait_timeout",
    "client_idle_timeout",
    "client_tls_sslmode",
    "idle_transaction_timeout",
    "log_connections",
    "log_disconnections",
    "log_pooler_errors",
    "log_stats",
    "query_timeout",
    "server_check_delay",
    "server_connect_timeout",
    "server_fast_close",
    "server_idle_timeout",
    "server_lifetime",
    "server_lifetime_jitter",
    "server_login_retry",
    "stats_period",
    "tcp_keepalive",
    "tcp_keepcnt",
    "tcp_keepidle",
    "tcp_keepintvl",
    "verbose",
];

/// A web tier and a background-task tier on PostgreSQL behind per-pod
/// PgBouncer sidecars in transaction mode, sized so that every pod, at every
/// size the tiers may take and through rolling updates, fits the database's
/// connection budget.
// Several `printcolumn(...)` share key names, which clippy takes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "tidepool.dev",
    version = "v1alpha1",
    kind = "Tidepool",
    namespaced,
    shortname = "tp",
    category = "tidepool",
    status = "TidepoolStatus",
    derive = "PartialEq",
    cel,
    doc = "A web tier and a background-task tier on PostgreSQL, sized to the database's connection budget.",
    scale(
        spec_replicas_path = ".spec.web.replicas",
        status_replicas_path = ".status.web.replicas",
        label_selector_path = ".status.web.selector"
    ),
    printcolumn(
        name = "Web",
        type_ = "string",
        json_path = ".status.web.readyOfDesired",
        description = "Ready of desired web pods"
    ),
    printcolumn(
        name = "Worker",
        type_ = "string",
        json_path = ".status.worker.readyOfDesired",
        description = "Ready of desired worker pods"
    ),
    printcolumn(
        name = "Connections",
        type_ = "string",
        json_path = ".status.connections.plannedOfAvailable",
        description = "Planned peak of available database connections"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(MIGRATION_NAMED_RULE).message("spec.migration is required when a tier runs a command of its own: name the application's migration command (python manage.py migrate) or set migration.enabled: false"))]
#[x_kube(validation = Rule::new(secret_reference_rule()).message("an env entry may not read the database Secret (database.secretRef): the password reaches only PgBouncer, and the plan's variables say where the database is"))]
pub struct TidepoolSpec {
    /// The application image: `tidepool` itself, an application built on
    /// its library (it runs `tidepool web`, `tidepool worker` and `tidepool
    /// migrate`), or any other image whose tiers name their `command`
    /// (a Django + Celery app). A tier's `image` overrides it.
    #[serde(default = "default_image")]
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,

    /// Tidepool's own image, for the containers Tidepool adds to every pod
    /// (`pooler-config`, which writes PgBouncer's files): the application
    /// image need not have the `tidepool` binary. Default: the operator's
    /// own version of it.
    #[serde(default = "default_image")]
    #[x_kube(validation = Rule::new("self != ''").message("tidepoolImage must not be empty"))]
    pub tidepool_image: String,

    /// The migration Job, run on a direct connection before the
    /// Deployments. Absent: `tidepool migrate` from `image`. Required when a
    /// tier runs a command of its own: name the application's migration
    /// command, or `enabled: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSpec>,

    /// When the kubelet pulls the images: Always, IfNotPresent or Never.
    #[serde(default = "default_pull_policy")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: String,

    /// The PostgreSQL database and its connection budget.
    pub database: DatabaseSpec,

    /// The web tier: `tidepool web` pods behind a Service.
    #[serde(default)]
    pub web: WebSpec,

    /// The background-task tier: `tidepool worker` pods.
    #[serde(default)]
    pub worker: WorkerSpec,

    /// A process that must never run twice (Celery beat, a scheduler):
    /// at most one pod at any moment, also while a deleted or evicted pod
    /// still terminates. Absent: none.
    #[serde(default, skip_serializing_if = "ClockSpec::is_absent")]
    pub clock: ClockSpec,

    /// How rolling updates proceed.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// The PgBouncer sidecar every pod runs.
    #[serde(default)]
    pub pooler: PoolerSpec,

    /// Node labels every pod of the Tidepool (web, worker, the migration
    /// Job) must match to be scheduled on a node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints every pod of the Tidepool (web, worker, the migration Job)
    /// tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// The database and how many of its connections Tidepool may use.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.reservedConnections < self.maxConnections").message("reservedConnections must be below maxConnections: nothing would be left for the pods"))]
pub struct DatabaseSpec {
    /// The Secret with the database's coordinates, in CloudNativePG's
    /// application Secret shape: the keys `username`, `password`, `host`,
    /// `port` and `dbname` are read (`uri` and others are ignored), so a
    /// CloudNativePG cluster's `<cluster>-app` Secret works as it is. The
    /// password reaches pods only as a mounted file.
    pub secret_ref: SecretRef,

    /// The server's `max_connections` (`SHOW max_connections`).
    #[x_kube(validation = Rule::new("self >= 1").message("maxConnections must be at least 1"))]
    pub max_connections: i32,

    /// Connections kept out of the pods' reach: PostgreSQL's superuser slots
    /// (`superuser_reserved_connections`, 3 by default), administrators, the
    /// migration Job, the operator's own connection and any other client.
    /// The pods share `maxConnections − reservedConnections`.
    #[serde(default = "default_reserved_connections")]
    #[x_kube(validation = Rule::new("self >= 0").message("reservedConnections must not be negative"))]
    pub reserved_connections: i32,

    /// TLS to PostgreSQL, on every connection to it: the pods' PgBouncer,
    /// the worker's LISTEN session, the migration Job and the operator's
    /// queue scaler.
    #[serde(default)]
    pub tls: DatabaseTls,
}

/// TLS on every connection to PostgreSQL, with libpq's modes and meanings.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.mode) || !(self.mode in ['verify-ca', 'verify-full']) || has(self.caSecretRef)").message("database.tls.mode verify-ca and verify-full check the server's certificate: name the Secret with its CA in database.tls.caSecretRef"))]
pub struct DatabaseTls {
    /// libpq's `sslmode`. `prefer` (the default, as libpq's) encrypts when
    /// the server offers TLS and verifies nothing, so a database without
    /// TLS keeps working; the `DatabaseTLSVerified` condition says so. `require`
    /// encrypts or fails (with `caSecretRef` it checks the chain, as libpq
    /// does); `verify-ca` checks the chain; `verify-full` the chain and that
    /// the certificate names the Secret's `host` in its subjectAltName. With
    /// `require` or stricter nothing falls back to plaintext.
    #[serde(default)]
    pub mode: DatabaseTlsMode,

    /// A Secret whose key `ca.crt` holds the roots the server's certificate
    /// must lead to: one or several (a provider's bundle while it rotates
    /// its CA). Only that key is mounted, so CloudNativePG's `<cluster>-ca`,
    /// which also holds the CA's key, works as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretRef>,

    /// A Secret of type `kubernetes.io/tls` (keys `tls.crt` and `tls.key`)
    /// with a client certificate to present, for a server that asks for one
    /// (`hostssl ... cert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_secret_ref: Option<SecretRef>,
}

impl TidepoolSpec {
    /// Every Secret a connection to the database reads: the coordinates',
    /// the CA's, the client certificate's, the queue scaler's.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        let scaler = self.worker.autoscaling.as_ref().and_then(|a| a.secret_ref.as_ref());
        std::iter::once(&self.database.secret_ref)
            .chain(&self.database.tls.ca_secret_ref)
            .chain(&self.database.tls.client_certificate_secret_ref)
            .chain(scaler)
            .map(|r| r.name.as_str())
    }
}

/// libpq's `sslmode` values Tidepool honours (`allow`, plaintext first, is
/// not one).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DatabaseTlsMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, verifying nothing.
    #[default]
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, the chain checked.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl DatabaseTlsMode {
    /// The mode as the runtime knows it.
    pub fn ssl_mode(self) -> tidepool::tls::SslMode {
        use tidepool::tls::SslMode;
        match self {
            DatabaseTlsMode::Disable => SslMode::Disable,
            DatabaseTlsMode::Prefer => SslMode::Prefer,
            DatabaseTlsMode::Require => SslMode::Require,
            DatabaseTlsMode::VerifyCa => SslMode::VerifyCa,
            DatabaseTlsMode::VerifyFull => SslMode::VerifyFull,
        }
    }
}

/// A reference to a Secret in the Tidepool's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self != ''").message("secretRef.name must not be empty"))]
    pub name: String,
}

/// The web tier.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)").message("web.replicas must be within [autoscaling.minReplicas, autoscaling.maxReplicas]"))]
#[x_kube(validation = Rule::new(format!("!({FOREIGN}) || has(self.port)")).message("web.port is required with web.command or web.args: the Service sends requests to it"))]
#[x_kube(validation = Rule::new(format!("({FOREIGN}) || (!has(self.port) && !has(self.readinessProbe) && !has(self.livenessProbe))")).message("web.port, web.readinessProbe and web.livenessProbe apply only with web.command or web.args (tidepool web has its own)"))]
#[x_kube(validation = Rule::new(probe_port_rule("readinessProbe")).message("web.readinessProbe names a port the container does not declare: use web.port or its name 'app'"))]
#[x_kube(validation = Rule::new(probe_port_rule("livenessProbe")).message("web.livenessProbe names a port the container does not declare: use web.port or its name 'app'"))]
#[x_kube(validation = Rule::new(env_names_rule()).message(env_names_message("web").as_str()))]
#[x_kube(validation = Rule::new(references_rule("command")).message(references_message("web.command").as_str()))]
#[x_kube(validation = Rule::new(references_rule("args")).message(references_message("web.args").as_str()))]
#[x_kube(validation = Rule::new(env_references_rule()).message(references_message("web.env").as_str()))]
pub struct WebSpec {
    /// Web pods. With `autoscaling`, the autoscaler sets it through the
    /// Tidepool's scale subresource (`kubectl scale tp/NAME --replicas=N`
    /// works the same way).
    #[serde(default = "default_web_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("web.replicas must not be negative"))]
    pub replicas: i32,

    /// Requests one web pod handles at once (probes excepted); past it a
    /// request is shed at once with 503 and Retry-After.
    #[serde(default = "default_web_concurrency")]
    #[x_kube(validation = Rule::new("self >= 1").message("web.concurrency must be at least 1"))]
    pub concurrency: i32,

    /// Connections one web pod asks for: requests that can query at once.
    /// It gets this many unless the budget is short (then status says what
    /// it gets).
    #[serde(default = "default_web_database_pool")]
    #[x_kube(validation = Rule::new("self >= 1").message("web.databasePool must be at least 1"))]
    pub database_pool: i32,

    /// Scale on CPU between the bounds with a HorizontalPodAutoscaler that
    /// acts on the Tidepool. Pools are planned for `maxReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<WebAutoscaling>,

    /// The web container's resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// What the web container runs; by default `tidepool web`.
    #[serde(flatten)]
    pub process: ProcessSpec,
}

/// Bounds and target of the web tier's autoscaler.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not be above autoscaling.maxReplicas"))]
pub struct WebAutoscaling {
    /// The fewest web pods.
    #[x_kube(validation = Rule::new("self >= 1").message("web.autoscaling.minReplicas must be at least 1"))]
    pub min_replicas: i32,
    /// The most web pods; the pools are sized for this many (plus the surge).
    #[x_kube(validation = Rule::new("self >= 1").message("web.autoscaling.maxReplicas must be at least 1"))]
    pub max_replicas: i32,
    /// Average CPU use, in percent of the request, the autoscaler aims for.
    #[serde(default = "default_target_cpu")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("web.autoscaling.targetCPUUtilizationPercentage must be from 1 to 100"))]
    #[serde(rename = "targetCPUUtilizationPercentage")]
    pub target_cpu_utilization_percentage: i32,
}

/// The background-task tier.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)").message("worker.replicas must be within [autoscaling.minReplicas, autoscaling.maxReplicas]"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || !has(self.autoscaling.queues) || self.autoscaling.queues.all(q, q.name in self.queues)").message("worker.autoscaling.queues may name only queues of worker.queues"))]
#[x_kube(validation = Rule::new(format!("({FOREIGN}) || (!has(self.port) && !has(self.readinessProbe) && !has(self.livenessProbe))")).message("worker.port, worker.readinessProbe and worker.livenessProbe apply only with worker.command or worker.args (tidepool worker has its own)"))]
#[x_kube(validation = Rule::new(format!("!({FOREIGN}) || !self.listen")).message("worker.listen is Tidepool's own worker's LISTEN session: it does not apply with worker.command or worker.args"))]
#[x_kube(validation = Rule::new(format!("!({FOREIGN}) || !has(self.autoscaling) || has(self.autoscaling.query)")).message("worker.autoscaling of worker.command or worker.args needs worker.autoscaling.query: the queues it reads otherwise are Tidepool's own"))]
#[x_kube(validation = Rule::new(probe_port_rule("readinessProbe")).message("worker.readinessProbe names a port the container does not declare: use worker.port or its name 'app'"))]
#[x_kube(validation = Rule::new(probe_port_rule("livenessProbe")).message("worker.livenessProbe names a port the container does not declare: use worker.port or its name 'app'"))]
#[x_kube(validation = Rule::new(env_names_rule()).message(env_names_message("worker").as_str()))]
#[x_kube(validation = Rule::new(references_rule("command")).message(references_message("worker.command").as_str()))]
#[x_kube(validation = Rule::new(references_rule("args")).message(references_message("worker.args").as_str()))]
#[x_kube(validation = Rule::new(env_references_rule()).message(references_message("worker.env").as_str()))]
pub struct WorkerSpec {
    /// Worker pods; 0 runs none. With `autoscaling`, the operator's queue
    /// scaler sets it.
    #[serde(default = "default_worker_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("worker.replicas must not be negative"))]
    pub replicas: i32,

    /// Jobs one worker runs at once (Celery's `--concurrency`). Each may use
    /// a database connection, so a worker asks for this many plus 4 of its
    /// own; if the budget is short, it runs as many jobs as it gets
    /// connections for.
    #[serde(default = "default_worker_concurrency")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("worker.concurrency must be from 1 to 100000"))]
    pub concurrency: i32,

    /// Queues the workers take jobs from, served round-robin.
    #[serde(default = "default_queues")]
    #[schemars(length(max = 32), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("size(self) >= 1 && self.all(q, q.matches('^[A-Za-z0-9_.-]{1,64}$'))").message("worker.queues must name at least one queue, each 1 to 64 of A-Z, a-z, 0-9, '_', '-', '.'"))]
    pub queues: Vec<String>,

    /// Each worker also LISTENs on a direct connection to PostgreSQL, so an
    /// idle worker starts a new job at once instead of at its next poll. It
    /// costs one more connection per worker pod, outside PgBouncer: the
    /// plan counts it.
    #[serde(default)]
    pub listen: bool,

    /// Scale on the queues between the bounds; pools are planned for
    /// `maxReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<WorkerAutoscaling>,

    /// The worker container's resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// What the worker container runs; by default `tidepool worker`.
    #[serde(flatten)]
    pub process: ProcessSpec,
}

/// What a tier's container runs. Without `command` and `args` it is
/// Tidepool's own process (`tidepool web|worker`) from the image; with
/// them, an application's process (gunicorn, Celery, a Node server) that
/// gets the plan in its environment (docs/foreign-apps.md) and connects
/// through the pod's PgBouncer like Tidepool's own.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    /// The container's image, entrypoint, arguments and environment.
    #[serde(flatten)]
    pub run: CommandSpec,

    /// The port the process serves on (named `app`): web, where the
    /// Service sends requests (required with a command); worker, optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("a tier's port must be from 1 to 65535"))]
    pub port: Option<i32>,

    /// When the process is ready for work (HTTP, TCP or exec, as in a
    /// Pod). Default with a port: a TCP check of it; without one, none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,

    /// When the kubelet restarts the process (HTTP, TCP or exec). Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,

    /// How long a client of the pod's PgBouncer may wait for a server
    /// connection before its query fails: for a process that opens more
    /// client connections than its share, this wait is where the bound
    /// lives.
    #[serde(default = "default_query_wait_timeout")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600").message("queryWaitTimeoutSeconds must be from 1 to 3600"))]
    pub query_wait_timeout_seconds: i32,
}

impl Default for ProcessSpec {
    fn default() -> Self {
        Self {
            run: CommandSpec::default(),
            port: None,
            readiness_probe: None,
            liveness_probe: None,
            query_wait_timeout_seconds: default_query_wait_timeout(),
        }
    }
}

/// What a container of the application runs, a tier's or the migration's:
/// without `command` and `args`, Tidepool's own (`tidepool web`, `worker`
/// or `migrate`) from the image.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CommandSpec {
    /// The container's image; default `spec.image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self != ''").message("a tier's or the migration's image must not be empty"))]
    pub image: Option<String>,

    /// The container's entrypoint (`["gunicorn"]`, `["python3", "manage.py",
    /// "migrate"]`), in place of the image's. `$(TIDEPOOL_CONCURRENCY)` and
    /// the plan's other variables are expanded. The migration's connects
    /// to PostgreSQL directly, through libpq's variables and a password
    /// file (docs/foreign-apps.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 512)))]
    pub command: Vec<String>,

    /// The entrypoint's arguments, with the same expansion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 1024)))]
    pub args: Vec<String>,

    /// More environment variables, after the plan's (so `$(NAME)` may
    /// refer to those). They may not set `DATABASE_URL`, `PG*` or a
    /// variable the plan sets, refer to a `$(TIDEPOOL_…)` the plan does not
    /// define, or read the database Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub env: Vec<EnvEntry>,
}

impl CommandSpec {
    /// Whether the container runs an application's command rather than
    /// Tidepool's own.
    pub fn is_foreign(&self) -> bool {
        !self.command.is_empty() || !self.args.is_empty()
    }
}

/// One environment variable of a container, as in a Pod, with its sizes
/// bounded (so the API server can afford the rules over them).
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvEntry {
    /// The variable's name.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Its value; `$(NAME)` refers to a variable defined before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub value: Option<String>,
    /// Where the value comes from instead (a ConfigMap, another Secret, a
    /// field of the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_env_source")]
    pub value_from: Option<EnvVarSource>,
}

/// A Pod's `valueFrom`, with every string bounded (a Secret's or
/// ConfigMap's name, a key, a field path), so the API server can afford the
/// rule that compares it with the database Secret.
fn bounded_env_source(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    /// Gives every string under `object` without a bound the longest name
    /// Kubernetes allows (253, a DNS subdomain).
    fn bound(object: &mut serde_json::Map<String, serde_json::Value>) {
        if object.get("type").and_then(|t| t.as_str()) == Some("string") && !object.contains_key("maxLength")
        {
            object.insert("maxLength".into(), ENV_SOURCE_MAX_LENGTH.into());
        }
        for child in object.values_mut() {
            match child {
                serde_json::Value::Array(items) => {
                    items.iter_mut().filter_map(serde_json::Value::as_object_mut).for_each(bound)
                }
                serde_json::Value::Object(child) => bound(child),
                _ => {}
            }
        }
    }
    let mut schema = <EnvVarSource as schemars::JsonSchema>::json_schema(generator);
    bound(schema.ensure_object());
    schema
}

/// The bound of every string of an env entry's `valueFrom`.
const ENV_SOURCE_MAX_LENGTH: u32 = 253;

/// The migration Job.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(env_names_rule()).message(env_names_message("migration").as_str()))]
#[x_kube(validation = Rule::new(references_rule("command")).message(references_message("migration.command").as_str()))]
#[x_kube(validation = Rule::new(references_rule("args")).message(references_message("migration.args").as_str()))]
#[x_kube(validation = Rule::new(env_references_rule()).message(references_message("migration.env").as_str()))]
pub struct MigrationSpec {
    /// Whether a migration Job runs at all (`false`: the application
    /// migrates otherwise).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// What the Job runs; by default `tidepool migrate`.
    #[serde(flatten)]
    pub run: CommandSpec,
}

impl Default for MigrationSpec {
    /// `tidepool migrate`, from the spec's image.
    fn default() -> Self {
        Self { enabled: true, run: CommandSpec::default() }
    }
}

/// A CEL expression: the tier (`self`) runs a command of its own.
const FOREIGN: &str =
    "(has(self.command) && size(self.command) > 0) || (has(self.args) && size(self.args) > 0)";

/// A tier runs a command of its own (a clock always does): then the spec
/// names its migration.
const MIGRATION_NAMED_RULE: &str = "has(self.migration) || (!has(self.clock) && !((has(self.web) && ((has(self.web.command) && size(self.web.command) > 0) || (has(self.web.args) && size(self.web.args) > 0))) || (has(self.worker) && ((has(self.worker.command) && size(self.worker.command) > 0) || (has(self.worker.args) && size(self.worker.args) > 0)))))";

/// No env entry of a tier or the migration sets a variable the plan sets.
fn env_names_rule() -> String {
    let owned = cel_list(owned_variables(), str::to_owned);
    format!("!has(self.env) || self.env.all(e, !e.name.startsWith('PG') && !(e.name in {owned}))")
}

/// The names an `env` entry may not set: the plan's, the runtime's that the
/// operator sets, and those it composes the URLs from.
pub fn owned_variables() -> Vec<&'static str> {
    use tidepool_contract::env;
    env::ALL.iter().chain(env::plan::ALL).chain(env::direct::ALL).chain(env::composed::ALL).copied().collect()
}

/// The `$(TIDEPOOL_…)` references every container may make: the plan's
/// variables with that prefix, the password file and the database's name.
pub fn referable_variables() -> Vec<&'static str> {
    use tidepool_contract::env;
    env::plan::ALL
        .iter()
        .copied()
        .chain([env::DB_PASSWORD_FILE, env::composed::DB_NAME])
        .filter(|name| name.starts_with("TIDEPOOL_"))
        .collect()
}

fn cel_list<'a>(names: impl IntoIterator<Item = &'a str>, wrap: impl Fn(&str) -> String) -> String {
    let quoted: Vec<String> = names.into_iter().map(|n| format!("'{}'", wrap(n))).collect();
    format!("[{}]", quoted.join(", "))
}

fn env_names_message(what: &str) -> String {
    format!("{what}.env may not set DATABASE_URL, a PG* variable or one the plan sets ({}): the operator sets them", owned_variables().join(", "))
}

/// The regular expression of a `$(TIDEPOOL_…)` reference.
const REFERENCE: &str = "[$][(]TIDEPOOL_[A-Za-z0-9_]*[)]";

/// Every `$(TIDEPOOL_…)` in the list `field` (`command`, `args`) is one the
/// plan defines. One rule per list: each has its own cost budget in the API
/// server.
fn references_rule(field: &str) -> String {
    let allowed = cel_list(referable_variables(), |n| format!("$({n})"));
    format!("!has(self.{field}) || self.{field}.all(c, c.findAll('{REFERENCE}').all(r, r in {allowed}))")
}

/// The same for the `env` values.
fn env_references_rule() -> String {
    let allowed = cel_list(referable_variables(), |n| format!("$({n})"));
    format!("!has(self.env) || self.env.all(e, !has(e.value) || e.value.findAll('{REFERENCE}').all(r, r in {allowed}))")
}

fn references_message(what: &str) -> String {
    format!(
        "{what} refers to a $(TIDEPOOL_...) variable the plan does not define (Kubernetes would leave it as literal text); it defines {}",
        referable_variables().join(", ")
    )
}

/// A tier's probe names no port but the tier's own (by number or name).
fn probe_port_rule(probe: &str) -> String {
    let check = |action: &str| {
        format!(
            "(!has(self.{probe}.{action}) || (has(self.port) && string(self.{probe}.{action}.port) in [string(self.port), '{PROCESS_PORT_NAME}']))"
        )
    };
    format!("!has(self.{probe}) || ({} && {})", check("httpGet"), check("tcpSocket"))
}

/// No env entry of a tier or the migration reads the database Secret.
fn secret_reference_rule() -> String {
    let none_reads = |part: &str| {
        format!("(!has(self.{part}) || !has(self.{part}.env) || self.{part}.env.all(e, !has(e.valueFrom) || !has(e.valueFrom.secretKeyRef) || e.valueFrom.secretKeyRef.name != self.database.secretRef.name))")
    };
    [none_reads("web"), none_reads("worker"), none_reads("clock"), none_reads("migration")].join(" && ")
}

/// The clock tier: an application's process that must never run twice,
/// such as Celery beat, which would send every periodic task once per
/// copy. One pod, never surged: the operator admits a new pod only once
/// the one it replaces has finished or gone (a rollout, a deleted or
/// evicted pod alike), so between the two there is a gap of up to the old
/// pod's shutdown and never an overlap.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(FOREIGN).message("clock.command or clock.args is required: the clock runs an application's process (celery beat), Tidepool has none of its own"))]
#[x_kube(validation = Rule::new(probe_port_rule("readinessProbe")).message("clock.readinessProbe names a port the container does not declare: use clock.port or its name 'app'"))]
#[x_kube(validation = Rule::new(probe_port_rule("livenessProbe")).message("clock.livenessProbe names a port the container does not declare: use clock.port or its name 'app'"))]
#[x_kube(validation = Rule::new(env_names_rule()).message(env_names_message("clock").as_str()))]
#[x_kube(validation = Rule::new(references_rule("command")).message(references_message("clock.command").as_str()))]
#[x_kube(validation = Rule::new(references_rule("args")).message(references_message("clock.args").as_str()))]
#[x_kube(validation = Rule::new(env_references_rule()).message(references_message("clock.env").as_str()))]
pub struct ClockSpec {
    /// Server connections the clock's pod asks for (its PgBouncer's
    /// share): 1 for Celery beat with its file scheduler, more for a
    /// scheduler that keeps its schedule in the database.
    #[serde(default = "default_clock_database_pool")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("clock.databasePool must be from 1 to 1000"))]
    pub database_pool: i32,

    /// The clock container's resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// What the clock container runs: `command` or `args` is required.
    #[serde(flatten)]
    pub process: ProcessSpec,
}

impl Default for ClockSpec {
    /// No clock: the spec has no `clock`.
    fn default() -> Self {
        Self {
            database_pool: default_clock_database_pool(),
            resources: None,
            process: ProcessSpec::default(),
        }
    }
}

impl ClockSpec {
    /// Whether the spec has no clock (a clock always names its command).
    pub fn is_absent(&self) -> bool {
        *self == ClockSpec::default()
    }

    /// Whether the Tidepool runs a clock tier.
    pub fn runs(&self) -> bool {
        self.process.run.is_foreign()
    }
}

/// The worker tier's scaler: every `pollingIntervalSeconds` the operator
/// reads Tidepool's queues from PostgreSQL, or with `query` the number a
/// statement of the user's returns, and sets `worker.replicas` between the
/// bounds.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not be above autoscaling.maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.query) || !has(self.queues)").message("worker.autoscaling.query and worker.autoscaling.queues are two signals: give one"))]
pub struct WorkerAutoscaling {
    /// The fewest worker pods (0 allowed: none while every queue is idle,
    /// one as soon as a job is available).
    #[x_kube(validation = Rule::new("self >= 0").message("worker.autoscaling.minReplicas must not be negative"))]
    pub min_replicas: i32,
    /// The most worker pods; the pools are sized for this many (plus the
    /// surge), so no scaling decision can break the connection budget.
    #[x_kube(validation = Rule::new("self >= 1").message("worker.autoscaling.maxReplicas must be at least 1"))]
    pub max_replicas: i32,

    /// Targets by queue. A served queue without an entry gets a target of
    /// `worker.concurrency` available jobs per replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, a.name == b.name))").message("worker.autoscaling.queues must name each queue once"))]
    pub queues: Vec<QueueScaling>,

    /// Scale on the number one SQL statement returns instead of the queues
    /// (an application that keeps its backlog in a table of its own, such
    /// as a Celery app whose broker is Redis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QueryScaling>,

    /// Seconds between two readings (one statement each).
    #[serde(default = "default_polling_interval")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600").message("worker.autoscaling.pollingIntervalSeconds must be from 1 to 3600"))]
    pub polling_interval_seconds: i32,

    /// The replicas go up only once every reading of this many seconds
    /// asks for more: a burst that the running workers drain sooner
    /// changes nothing.
    #[serde(default = "default_scale_up_stabilization")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("worker.autoscaling.scaleUpStabilizationSeconds must be from 0 to 3600"))]
    pub scale_up_stabilization_seconds: i32,

    /// The replicas go down only once every reading of this many seconds
    /// asks for fewer.
    #[serde(default = "default_scale_down_stabilization")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 86400").message("worker.autoscaling.scaleDownStabilizationSeconds must be from 0 to 86400"))]
    pub scale_down_stabilization_seconds: i32,

    /// The Secret with the credentials the operator reads the queues or runs
    /// `query` with (the same keys as `database.secretRef`; default that
    /// Secret). A role that may only read the table it counts is enough
    /// (docs/operator.md, "Autoscaling").
    /// Its one connection goes to PostgreSQL directly: count it in
    /// `database.reservedConnections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// The shape of KEDA's `postgresql` trigger: one statement that returns
/// one row with one number, and the value one replica takes.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueryScaling {
    /// One SQL statement returning one row with one number (`int2`, `int4`,
    /// `int8`, `float4`, `float8` or `numeric`, not NULL), such as
    /// `SELECT count(*) FROM shop_backlog`. It runs in a read-only
    /// transaction, rolled back, under `statementTimeoutSeconds`.
    #[schemars(length(max = 8192))]
    #[x_kube(validation = Rule::new("self.matches('\\\\S')").message("worker.autoscaling.query.sql must not be empty"))]
    pub sql: String,
    /// The value one replica takes: a value `v` asks for `⌈v / target⌉`
    /// replicas.
    #[x_kube(validation = Rule::new("self >= 1").message("worker.autoscaling.query.targetValuePerReplica must be at least 1"))]
    pub target_value_per_replica: i64,
    /// At or below this value the tier asks for no replica (to
    /// `minReplicas`); above it, for at least one.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("worker.autoscaling.query.activationValue must not be negative"))]
    pub activation_value: i64,
    /// The statement's `statement_timeout`: the server cancels it past
    /// this, and the reading fails (the replicas hold).
    #[serde(default = "default_statement_timeout")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 300").message("worker.autoscaling.query.statementTimeoutSeconds must be from 1 to 300"))]
    pub statement_timeout_seconds: i32,
}

/// One queue's scaling targets; at least one of them.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.targetAvailableJobsPerReplica) || has(self.maxOldestJobAgeSeconds)").message("a worker.autoscaling.queues entry needs targetAvailableJobsPerReplica, maxOldestJobAgeSeconds or both"))]
pub struct QueueScaling {
    /// The queue, one of `worker.queues`.
    #[schemars(length(max = 64))]
    pub name: String,
    /// Available jobs (due, not yet claimed) per worker replica: a backlog
    /// of `n` asks for `⌈n / target⌉` replicas (the queues' asks add up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("targetAvailableJobsPerReplica must be at least 1"))]
    pub target_available_jobs_per_replica: Option<i32>,
    /// Once the oldest available job has waited longer than this, the
    /// tier grows (at least one replica, more the further past it is), even
    /// under the count target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("maxOldestJobAgeSeconds must be from 1 to 86400"))]
    pub max_oldest_job_age_seconds: Option<i32>,
}

/// Rolling updates.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Extra pods per tier while a rolling update runs (pods are never taken
    /// down before their replacement is ready). The budget counts them; 0
    /// makes updates replace pods one at a time with a moment of one pod
    /// fewer.
    #[serde(default = "default_max_surge")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("rollout.maxSurge must be from 0 to 100"))]
    pub max_surge: i32,
}

/// The PgBouncer sidecar.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolerSpec {
    /// PgBouncer's image (PgBouncer 1.23 or later).
    #[serde(default = "default_pooler_image")]
    #[x_kube(validation = Rule::new("self != ''").message("pooler.image must not be empty"))]
    pub image: String,

    /// Extra PgBouncer settings, from an allow-list (timeouts, logging, TCP
    /// keepalive). The sizing settings are the operator's, and PgBouncer's
    /// TLS to PostgreSQL (`server_tls_*`) is `database.tls`'s.
    #[serde(default)]
    #[schemars(schema_with = "pooler_parameters_schema")]
    #[x_kube(validation = Rule::new(pooler_parameters_rule()).message(pooler_parameters_message().as_str()))]
    #[x_kube(validation = Rule::new("self.all(k, self[k].matches('^[A-Za-z0-9_.,:/= -]{0,256}$'))").message("pooler.parameters values must be up to 256 of A-Z, a-z, 0-9, space and _ . , : / = -"))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('server_tls_'))").message("pooler.parameters may not set server_tls_*: PgBouncer's TLS to PostgreSQL is database.tls's, which covers every connection"))]
    pub parameters: BTreeMap<String, String>,

    /// The sidecar's resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Bounded, so the API server can afford the CEL rules over it.
fn pooler_parameters_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": 256},
    })
}

fn pooler_parameters_rule() -> String {
    let allowed = POOLER_PARAMETERS.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", ");
    format!("self.all(k, k in [{allowed}])")
}

fn pooler_parameters_message() -> String {
    format!("pooler.parameters may set only {}", POOLER_PARAMETERS.join(", "))
}

/// What the operator observed and decided.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TidepoolStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, ConnectionBudget, Progressing and Degraded.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<TierStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<TierStatus>,

    /// The clock tier, when the spec has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<TierStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionsStatus>,
}

/// One tier as planned and as running.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TierStatus {
    /// Pods wanted now.
    pub desired_replicas: i32,
    /// Pods that exist (the scale subresource's status replicas).
    pub replicas: i32,
    /// Pods that pass their readiness probe.
    pub ready_replicas: i32,
    /// "ready/desired", for `kubectl get`.
    pub ready_of_desired: String,
    /// The tier's pods' label selector (the scale subresource's).
    pub selector: String,
    /// Server connections each pod's PgBouncer may hold (its share).
    pub server_connections_per_pod: i32,
    /// The app's pool per pod (web: requests that query at once; worker:
    /// jobs that run at once).
    pub app_pool_per_pod: i32,
    /// Whether the budget gave the tier less than it asked for.
    pub limited: bool,
    /// The last change of the tier's desired replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<LastScale>,
}

/// A change of a tier's desired replicas.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastScale {
    /// The desired replicas before.
    pub from: i32,
    /// The desired replicas after.
    pub to: i32,
    /// Why: the queue scaler's reason (`QueueBacklog`, `OldestJobAge`,
    /// `JobsRunning`, `JobsWaiting`, `QueuesIdle`), or `ReplicasChanged`
    /// when the spec's replicas were set otherwise (the web autoscaler,
    /// `kubectl scale`, an edit).
    pub reason: String,
    /// What was seen, in words.
    pub message: String,
    /// When the operator saw the change.
    pub time: Time,
}

/// The connection budget.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsStatus {
    /// `maxConnections − reservedConnections`.
    pub available: i32,
    /// The most connections the pods can hold at once, rolling updates
    /// included.
    pub planned_peak: i32,
    /// The sum of the live pods' shares (running or terminating).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_peak: Option<i32>,
    /// "planned/available", for `kubectl get`.
    pub planned_of_available: String,
}

/// Conditions as a list-map keyed by `type`, so server-side apply merges
/// each condition on its own.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
    schema
}

fn default_image() -> String {
    DEFAULT_IMAGE.into()
}
fn default_pooler_image() -> String {
    DEFAULT_POOLER_IMAGE.into()
}
fn default_pull_policy() -> String {
    "IfNotPresent".into()
}
fn default_reserved_connections() -> i32 {
    10
}
fn default_web_replicas() -> i32 {
    2
}
fn default_web_concurrency() -> i32 {
    1000
}
fn default_web_database_pool() -> i32 {
    20
}
fn default_clock_database_pool() -> i32 {
    1
}
fn default_target_cpu() -> i32 {
    70
}
fn default_statement_timeout() -> i32 {
    5
}
fn default_polling_interval() -> i32 {
    10
}
fn default_scale_up_stabilization() -> i32 {
    15
}
fn default_scale_down_stabilization() -> i32 {
    300
}
fn default_worker_replicas() -> i32 {
    1
}
fn default_worker_concurrency() -> i32 {
    50
}
fn default_queues() -> Vec<String> {
    vec!["default".into()]
}
fn default_max_surge() -> i32 {
    1
}
fn default_query_wait_timeout() -> i32 {
    crate::plan::POOLER_QUERY_WAIT_TIMEOUT_SECONDS as i32
}
fn default_true() -> bool {
    true
}

impl Default for WebSpec {
    fn default() -> Self {
        Self {
            replicas: default_web_replicas(),
            concurrency: default_web_concurrency(),
            database_pool: default_web_database_pool(),
            autoscaling: None,
            resources: None,
            process: ProcessSpec::default(),
        }
    }
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            replicas: default_worker_replicas(),
            concurrency: default_worker_concurrency(),
            queues: default_queues(),
            listen: false,
            autoscaling: None,
            resources: None,
            process: ProcessSpec::default(),
        }
    }
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self { max_surge: default_max_surge() }
    }
}

impl Default for PoolerSpec {
    fn default() -> Self {
        Self { image: default_pooler_image(), parameters: BTreeMap::new(), resources: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::json;

    /// Every string under `value`, by its path, that has no `maxLength`.
    fn unbounded_strings(value: &serde_json::Value, path: &str, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(object) => {
                if object.get("type") == Some(&json!("string")) && !object.contains_key("maxLength") {
                    found.push(path.to_owned());
                }
                for (key, child) in object {
                    unbounded_strings(child, &format!("{path}.{key}"), found);
                }
            }
            serde_json::Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    unbounded_strings(child, &format!("{path}[{index}]"), found);
                }
            }
            _ => {}
        }
    }

    /// The API server prices a rule over a string by its longest length:
    /// every string of each `env[].valueFrom` (the tiers' and the
    /// migration's) is bounded, or the CRD's rules over it cost too much.
    #[test]
    fn every_string_of_an_env_source_is_bounded() {
        let crd = serde_json::to_value(Tidepool::crd()).expect("the CRD as JSON");
        let spec =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for owner in ["web", "worker", "migration"] {
            let source = &spec[owner]["properties"]["env"]["items"]["properties"]["valueFrom"];
            assert!(source.is_object(), "{owner}.env[].valueFrom is in the schema");
            let mut found = Vec::new();
            unbounded_strings(source, &format!("{owner}.env[].valueFrom"), &mut found);
            assert!(found.is_empty(), "unbounded strings: {found:?}");
            let text = source.to_string();
            assert!(text.contains(&format!("\"maxLength\":{ENV_SOURCE_MAX_LENGTH}")), "{text}");
        }
    }

    /// The messages the CRD's rules give for `spec`, evaluated offline.
    fn refusals(spec: serde_json::Value) -> Vec<String> {
        let object = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "metadata": {"name": "t"}, "spec": spec});
        let tidepool: Tidepool = serde_json::from_value(object).expect("well-formed");
        tidepool
            .validate_cel()
            .err()
            .map(|errors| errors.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default()
    }

    fn with(patch: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 100}});
        json_patch(&mut spec, patch);
        spec
    }

    fn json_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
                for (key, value) in patch {
                    json_patch(target.entry(key).or_insert(serde_json::Value::Null), value);
                }
            }
            (target, patch) => *target = patch,
        }
    }

    /// Every property of the schema, at every depth, has a description, so
    /// `kubectl explain` teaches the whole resource.
    #[test]
    fn every_field_is_described() {
        use kube::CustomResourceExt;
        fn undescribed(path: &str, schema: &serde_json::Value, found: &mut Vec<String>) {
            let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else { return };
            for (name, property) in properties {
                let path = format!("{path}.{name}");
                if property.get("description").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
                    found.push(path.clone());
                }
                undescribed(&path, property, found);
                if let Some(items) = property.get("items") {
                    undescribed(&format!("{path}[]"), items, found);
                }
            }
        }
        let crd = serde_json::to_value(Tidepool::crd()).expect("serializes");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut found = Vec::new();
        for part in ["spec", "status"] {
            undescribed(part, &schema["properties"][part], &mut found);
        }
        assert!(found.is_empty(), "fields without a description: {found:?}");
    }

    #[test]
    fn a_valid_spec_passes_every_rule() {
        assert_eq!(refusals(with(json!({}))), Vec::<String>::new());
        assert_eq!(
            refusals(with(
                json!({"pooler": {"parameters": {"server_idle_timeout": "300"}}, "database": {"tls": {"mode": "verify-full", "caSecretRef": {"name": "db-ca"}}}})
            )),
            Vec::<String>::new()
        );
        let django = json!({
            "migration": {"command": ["python3", "manage.py", "migrate"], "env": [{"name": "DJANGO_SETTINGS_MODULE", "value": "shop.settings"}]},
            "web": {"command": ["gunicorn"], "port": 8000,
                "args": ["--worker-connections", "$(TIDEPOOL_CONCURRENCY)"],
                "env": [{"name": "GUNICORN_CMD_ARGS", "value": "--timeout $(TIDEPOOL_DB_CONNECTIONS) $(PGHOST) $(HOME)"},
                        {"name": "BROKER", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}],
                "readinessProbe": {"httpGet": {"path": "/healthz/", "port": "app"}},
                "livenessProbe": {"tcpSocket": {"port": 8000}}},
            "worker": {"command": ["celery"], "args": ["-c", "$(TIDEPOOL_CONCURRENCY)"],
                "readinessProbe": {"exec": {"command": ["celery", "inspect", "ping"]}}},
        });
        assert_eq!(refusals(with(django)), Vec::<String>::new());
    }

    /// Every rule refuses what it is for, with its own message (the cases
    /// are shared with the real API server's test).
    #[test]
    fn each_rule_refuses_with_its_message() {
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../tests/rule_cases.json")).expect("rule_cases.json");
        assert!(cases.len() >= 15);
        for case in cases {
            let (patch, message) = (case["patch"].clone(), case["message"].as_str().unwrap_or_default());
            let found = refusals(with(patch.clone()));
            assert!(
                found.iter().any(|f| f.contains(message)),
                "{patch}: expected {message:?}, got {found:?}"
            );
        }
    }
}
