//! The web and worker Deployments: the app container, its PgBouncer as a
//! native sidecar, and the init container that writes PgBouncer's
//! configuration from the database Secret.
//!
//! The pod, in start order:
//! 1. `pooler-config` (init): `tidepool pooler-config` reads the Secret's
//!    keys from its mounted files and writes `pgbouncer.ini` (the plan's
//!    numbers) and the auth file (0600) into an in-memory `emptyDir`;
//! 2. `pgbouncer` (init, `restartPolicy: Always`: a native sidecar, started
//!    before the app and stopped after it), transaction mode on
//!    127.0.0.1:6432, `max_db_connections` = the pod's share;
//! 3. the app: `tidepool web|worker`, whose pools add up to the share, or an
//!    application's process (a tier's `command`), with the plan in its
//!    environment ([`plan_env`]). Either logs in to its PgBouncer as the
//!    pod's own user [`CLIENT_USER`], with a password `pooler-config`
//!    generated at the pod's start (a file and a libpq password file, the
//!    only files of the pooler's folder it mounts); PgBouncer alone logs in
//!    upstream with the Secret's password, so no app container holds it
//!    (except Tidepool's worker with `listen`, whose LISTEN session goes to
//!    PostgreSQL directly). Tidepool's own app also reads PgBouncer's
//!    figures for its `/metrics` from the admin console, as the stats user.
//!    `/tmp` is a small memory volume (gunicorn's heartbeat file, Celery
//!    beat's schedule); the root filesystem stays read-only.
//!
//! The share is also the pod's annotation `tidepool.dev/max-db-connections`,
//! written from the same plan field, and every pod starts behind the
//! scheduling gate `tidepool.dev/connection-budget`, removed by the
//! controller when the budget has room for it ([`crate::admission`]).
//! Probes reach the app on the pod IP (a 127.0.0.1-only listener cannot be
//! probed).
//!
//! Termination: no preStop hook is needed, as the app drains on SIGTERM by
//! itself (web: `/readyz` answers 503 for the drain delay while it serves
//! on, then waits for requests in flight; worker: hands running jobs back at
//! its shutdown deadline). The grace period covers those deadlines plus a
//! margin, and the sidecar, stopped only after the app has exited, serves
//! the app's last queries (PgBouncer ≥ 1.23 waits for its clients).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, PodSchedulingGate, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, SleepAction, TCPSocketAction, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tidepool_contract::env as pod;
use tidepool_contract::env::composed::{DB_HOST, DB_NAME, DB_PORT, DB_USER};
use tidepool_contract::secret::KEYS as SECRET_KEYS;
use tidepool_contract::{
    CLIENT_PASSFILE, CLIENT_PASSWORD_FILE, HEALTH_PATH, READY_PATH, STATS_PASSWORD_FILE,
};

use super::labels::{self, DIRECT_ANNOTATION, SHARE_ANNOTATION};
use super::tls;
use crate::admission::GATE;
use crate::crd::{EnvEntry, ProcessSpec, PROCESS_PORT_NAME};
use crate::plan::{Tier, TierPlan};
use crate::to_i32;
use crate::validate::Validated;

/// Where PgBouncer listens in every pod; the app connects here.
pub const POOLER_ADDRESS: &str = "127.0.0.1:6432";
const POOLER_HOST: &str = "127.0.0.1";
const POOLER_PORT: &str = "6432";
/// The pod's own PgBouncer user, the one the app logs in as: not a role of
/// the server (PgBouncer logs in upstream as the Secret's).
pub const CLIENT_USER: &str = "tidepool_app";
pub const WEB_PORT: i32 = 8000;
pub const WORKER_PORT: i32 = 8001;
/// The exporter of PgBouncer's figures in a pod of an application's
/// process: pgbouncer_exporter's port, and the name the PodMonitor scrapes.
pub const EXPORTER_PORT: i32 = 9127;
pub const EXPORTER_PORT_NAME: &str = "pooler-metrics";
/// The uid and gid every container runs as (no image needs root).
pub const RUN_AS: i64 = 65532;
/// The PgBouncer user that may read `SHOW` statistics on the admin console.
pub const STATS_USER: &str = "tidepool_stats";

/// The app's drain and shutdown deadlines (`TIDEPOOL_DRAIN_DELAY`,
/// `TIDEPOOL_SHUTDOWN_TIMEOUT`), and the margin the kubelet adds before it
/// kills what is left.
const DRAIN_DELAY: Duration = Duration::from_secs(5);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
const GRACE_MARGIN: Duration = Duration::from_secs(5);

pub(super) const DATABASE_VOLUME: &str = "database";
pub(super) const DATABASE_DIR: &str = "/etc/tidepool/database";
pub(super) const POOLER_VOLUME: &str = "pgbouncer";
const POOLER_DIR: &str = "/etc/pgbouncer";
/// `/tmp` of the app containers: writable, in memory, small.
pub(super) const TMP_VOLUME: &str = "tmp";
/// Where the app finds its PgBouncer user's password, as a file and as a
/// libpq password file (from the pooler's folder).
const APP_PASSWORD: &str = "/etc/tidepool/db.password";
const APP_PASSFILE: &str = "/etc/tidepool/pgpass";
/// Where the app finds the stats user's password, the one file
/// ([`STATS_PASSWORD_FILE`]) of the pooler's folder it mounts (it reads
/// PgBouncer's figures for `/metrics`).
const APP_STATS_PASSWORD: &str = "/etc/tidepool/pgbouncer-stats.password";

/// A tier's Deployment.
pub fn deployment(validated: &Validated, tier_plan: &TierPlan) -> Deployment {
    let owner = &validated.owner;
    let tier = tier_plan.tier;
    let mut annotations =
        BTreeMap::from([(SHARE_ANNOTATION.to_owned(), tier_plan.pooler.max_db_connections.to_string())]);
    if tier_plan.listen > 0 {
        annotations.insert(DIRECT_ANNOTATION.to_owned(), tier_plan.listen.to_string());
    }
    if let Some(credentials) = &validated.credentials {
        annotations.insert(crate::credentials::ANNOTATION.to_owned(), credentials.clone());
    }
    let grace = match tier {
        Tier::Web => DRAIN_DELAY + SHUTDOWN_TIMEOUT + GRACE_MARGIN,
        Tier::Worker | Tier::Clock => SHUTDOWN_TIMEOUT + GRACE_MARGIN,
    };
    Deployment {
        metadata: labels::metadata(owner, tier),
        spec: Some(DeploymentSpec {
            replicas: Some(to_i32(tier_plan.replicas)),
            revision_history_limit: Some(5),
            selector: LabelSelector {
                match_labels: Some(labels::selector(owner, tier)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(to_i32(tier_plan.surge))),
                    // With no surge, a pod is replaced in place: the old one
                    // goes first (its replacement is admitted once it is gone).
                    max_unavailable: Some(IntOrString::Int(i32::from(tier_plan.surge == 0))),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels::labels(owner, tier)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // Admitted by the controller when the budget has room
                    // ([`crate::admission`]).
                    scheduling_gates: Some(vec![PodSchedulingGate { name: GATE.to_owned() }]),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(grace.as_secs() as i64),
                    security_context: Some(pod_security()),
                    node_selector: node_selector(validated),
                    tolerations: tolerations(validated),
                    volumes: Some(volumes(validated)),
                    init_containers: Some(sidecars(validated, tier_plan)),
                    containers: vec![app(validated, tier_plan)],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

pub(super) fn volumes(validated: &Validated) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: DATABASE_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(validated.spec.database.secret_ref.name.clone()),
                items: Some(
                    SECRET_KEYS
                        .iter()
                        .map(|key| KeyToPath { key: (*key).to_owned(), path: (*key).to_owned(), mode: None })
                        .collect(),
                ),
                // Readable by the pod's group only.
                default_mode: Some(0o440),
                optional: Some(false),
            }),
            ..Volume::default()
        },
        memory_volume(POOLER_VOLUME, "1Mi"),
        memory_volume(TMP_VOLUME, "64Mi"),
    ];
    volumes.extend(tls::volumes(&validated.spec.database.tls));
    volumes
}

/// An `emptyDir` in memory (it counts against the pod's memory).
pub(super) fn memory_volume(name: &str, size: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_owned()),
            size_limit: Some(Quantity(size.to_owned())),
        }),
        ..Volume::default()
    }
}

/// A writable `/tmp` for a container whose root filesystem is read-only.
pub(super) fn tmp_mount() -> VolumeMount {
    VolumeMount { read_only: None, ..mount(TMP_VOLUME, "/tmp") }
}

/// The spec's node selector, if it has one.
pub(super) fn node_selector(validated: &Validated) -> Option<BTreeMap<String, String>> {
    Some(validated.spec.node_selector.clone()).filter(|selector| !selector.is_empty())
}

/// The spec's tolerations, if it has any.
pub(super) fn tolerations(validated: &Validated) -> Option<Vec<Toleration>> {
    Some(validated.spec.tolerations.clone()).filter(|tolerations| !tolerations.is_empty())
}

/// Non-root, with the Secret's files readable by the pod's group.
pub(super) fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

pub(super) fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

pub(super) fn hardened() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None }),
        ..SecurityContext::default()
    }
}

pub(super) fn resources(cpu: &str, memory: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), Quantity(memory_limit.to_owned()))])),
        ..ResourceRequirements::default()
    }
}

/// The direct connection URL (to PostgreSQL, not through PgBouncer),
/// composed of the Secret's variables, with `database.tls` as libpq's
/// parameters: the worker's LISTEN session and the migration Job.
pub(super) fn direct_database_url(validated: &Validated) -> EnvVar {
    env(
        pod::DIRECT_DATABASE_URL,
        format!(
            "postgres://$({DB_USER})@$({DB_HOST}):$({DB_PORT})/$({DB_NAME}){}",
            tls::url_query(&validated.spec.database.tls)
        ),
    )
}

pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.into()), value_from: None }
}

pub(super) fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

pub(super) fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// The init container that writes PgBouncer's files from the Secret.
fn pooler_config(validated: &Validated, tier: &TierPlan) -> Container {
    let sizing = &tier.pooler;
    let mut args = vec![
        "pooler-config".to_owned(),
        format!("--client-user={CLIENT_USER}"),
        format!("--upstream-from-dir={DATABASE_DIR}"),
        format!("--out-dir={POOLER_DIR}"),
        format!("--listen={POOLER_ADDRESS}"),
        format!("--pool-size={}", sizing.default_pool_size),
        format!("--min-pool-size={}", sizing.min_pool_size),
        format!("--max-db-connections={}", sizing.max_db_connections),
        format!("--max-client-conn={}", sizing.max_client_conn),
        format!("--query-wait-timeout={}s", sizing.query_wait_timeout_seconds),
        format!("--stats-user={STATS_USER}"),
    ];
    // TLS to PostgreSQL is database.tls's (the CRD refuses server_tls_* in
    // the parameters).
    args.extend(tls::pooler_args(&validated.spec.database.tls));
    args.extend(validated.spec.pooler.parameters.iter().map(|(key, value)| format!("--set={key}={value}")));
    Container {
        name: "pooler-config".to_owned(),
        image: Some(validated.spec.tidepool_image.clone()),
        image_pull_policy: Some(validated.spec.image_pull_policy.clone()),
        args: Some(args),
        volume_mounts: Some(vec![
            mount(DATABASE_VOLUME, DATABASE_DIR),
            VolumeMount { read_only: None, ..mount(POOLER_VOLUME, POOLER_DIR) },
        ]),
        security_context: Some(hardened()),
        resources: Some(resources("10m", "16Mi", "64Mi")),
        ..Container::default()
    }
}

/// The init containers, in start order: `pooler-config`, PgBouncer, and
/// for an application's process (which has no `/metrics` of Tidepool's)
/// the exporter of PgBouncer's figures.
fn sidecars(validated: &Validated, tier: &TierPlan) -> Vec<Container> {
    let mut containers = vec![pooler_config(validated, tier), pooler(validated)];
    if tier_spec(validated, tier.tier).0.run.is_foreign() {
        containers.push(exporter(validated));
    }
    containers
}

/// `tidepool pooler-exporter`, as a native sidecar: the `pgbouncer_*`
/// series on pgbouncer_exporter's port, read as the stats user.
fn exporter(validated: &Validated) -> Container {
    Container {
        name: "pgbouncer-exporter".to_owned(),
        image: Some(validated.spec.tidepool_image.clone()),
        image_pull_policy: Some(validated.spec.image_pull_policy.clone()),
        restart_policy: Some("Always".to_owned()),
        args: Some(vec!["pooler-exporter".to_owned(), format!("--listen=0.0.0.0:{EXPORTER_PORT}")]),
        env: Some(vec![
            env(pod::POOLER_STATS_URL, format!("postgres://{STATS_USER}@{POOLER_ADDRESS}/pgbouncer")),
            env(pod::POOLER_STATS_PASSWORD_FILE, APP_STATS_PASSWORD),
            env(pod::LOG_FORMAT, "json"),
        ]),
        ports: Some(vec![container_port(EXPORTER_PORT_NAME, EXPORTER_PORT)]),
        liveness_probe: Some(http_probe(HEALTH_PATH, EXPORTER_PORT_NAME, 10, 3)),
        volume_mounts: Some(vec![VolumeMount {
            sub_path: Some(STATS_PASSWORD_FILE.to_owned()),
            ..mount(POOLER_VOLUME, APP_STATS_PASSWORD)
        }]),
        security_context: Some(hardened()),
        resources: Some(resources("10m", "16Mi", "64Mi")),
        ..Container::default()
    }
}

/// PgBouncer, as a native sidecar.
fn pooler(validated: &Validated) -> Container {
    let port = POOLER_ADDRESS.rsplit(':').next().unwrap_or("6432");
    Container {
        name: "pgbouncer".to_owned(),
        image: Some(validated.spec.pooler.image.clone()),
        image_pull_policy: Some(validated.spec.image_pull_policy.clone()),
        restart_policy: Some("Always".to_owned()),
        command: Some(vec!["pgbouncer".to_owned()]),
        args: Some(vec![format!("{POOLER_DIR}/pgbouncer.ini")]),
        volume_mounts: Some(
            std::iter::once(mount(POOLER_VOLUME, POOLER_DIR))
                .chain(tls::mounts(&validated.spec.database.tls))
                .collect(),
        ),
        // Listening only on 127.0.0.1, so probed from inside: the app
        // starts once PgBouncer accepts connections.
        startup_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "bash".to_owned(),
                    "-c".to_owned(),
                    format!("exec 3<>/dev/tcp/127.0.0.1/{port}"),
                ]),
            }),
            period_seconds: Some(1),
            failure_threshold: Some(30),
            ..Probe::default()
        }),
        security_context: Some(hardened()),
        resources: Some(
            validated.spec.pooler.resources.clone().unwrap_or_else(|| resources("50m", "16Mi", "128Mi")),
        ),
        ..Container::default()
    }
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(port.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The name of the web container's port, which the Service targets.
pub fn web_port_name(validated: &Validated) -> &'static str {
    if validated.spec.web.process.run.is_foreign() {
        PROCESS_PORT_NAME
    } else {
        "http"
    }
}

/// What a tier's container runs, and its resources.
fn tier_spec(validated: &Validated, tier: Tier) -> (&ProcessSpec, &Option<ResourceRequirements>) {
    let spec = &validated.spec;
    match tier {
        Tier::Web => (&spec.web.process, &spec.web.resources),
        Tier::Worker => (&spec.worker.process, &spec.worker.resources),
        Tier::Clock => (&spec.clock.process, &spec.clock.resources),
    }
}

/// The plan as every app container of a tier gets it, Tidepool's own or an
/// application's (`tidepool_contract::env::plan`): where the database is
/// (the pod's PgBouncer, as its own user, with the password in a file and a
/// libpq password file), what one pod does at once, and its share.
pub fn plan_env(validated: &Validated, tier: &TierPlan) -> Vec<EnvVar> {
    let secret = &validated.spec.database.secret_ref.name;
    let concurrency = match tier.tier {
        Tier::Web => validated.spec.web.concurrency.to_string(),
        Tier::Worker => tier.pools.worker_concurrency.to_string(),
        // One process, one thing at a time.
        Tier::Clock => "1".to_owned(),
    };
    vec![
        env_from_secret(DB_NAME, secret, "dbname"),
        env(pod::DATABASE_URL, format!("postgres://{CLIENT_USER}@{POOLER_ADDRESS}/$({DB_NAME})")),
        env(pod::DB_PASSWORD_FILE, APP_PASSWORD),
        env(pod::plan::HOST, POOLER_HOST),
        env(pod::plan::PORT, POOLER_PORT),
        env(pod::plan::DATABASE, format!("$({DB_NAME})")),
        env(pod::plan::USER, CLIENT_USER),
        env(pod::plan::PASSFILE, APP_PASSFILE),
        env(pod::plan::SSLMODE, "disable"),
        env(pod::plan::CONCURRENCY, concurrency),
        env(pod::plan::DB_CONNECTIONS, tier.share.to_string()),
    ]
}

/// The spec's `env` entries, after the plan's.
pub(super) fn user_env(entries: &[EnvEntry]) -> impl Iterator<Item = EnvVar> + '_ {
    entries.iter().map(|entry| EnvVar {
        name: entry.name.clone(),
        value: entry.value.clone(),
        value_from: entry.value_from.clone(),
    })
}

/// `list`, or none when it is empty: a container's command or arguments,
/// the image's own when the spec names none.
pub(super) fn non_empty(list: &[String]) -> Option<Vec<String>> {
    Some(list.to_vec()).filter(|l| !l.is_empty())
}

/// The app container of a tier.
fn app(validated: &Validated, tier: &TierPlan) -> Container {
    let spec = &validated.spec;
    let (process, resources_spec) = tier_spec(validated, tier.tier);
    let mut environment = plan_env(validated, tier);
    let mut volume_mounts = vec![
        VolumeMount { sub_path: Some(CLIENT_PASSWORD_FILE.to_owned()), ..mount(POOLER_VOLUME, APP_PASSWORD) },
        VolumeMount { sub_path: Some(CLIENT_PASSFILE.to_owned()), ..mount(POOLER_VOLUME, APP_PASSFILE) },
        tmp_mount(),
    ];
    let own = if process.run.is_foreign() { None } else { OwnProcess::of(tier.tier) };
    let mut container = if let Some(own) = own {
        environment.extend(tidepool_env(validated, tier, own));
        volume_mounts.push(VolumeMount {
            sub_path: Some(STATS_PASSWORD_FILE.to_owned()),
            ..mount(POOLER_VOLUME, APP_STATS_PASSWORD)
        });
        if tier.listen > 0 {
            // The LISTEN session logs in to PostgreSQL itself.
            volume_mounts.push(mount(DATABASE_VOLUME, DATABASE_DIR));
            volume_mounts.extend(tls::mounts(&spec.database.tls));
        }
        tidepool_process(own)
    } else {
        let mut container = foreign_process(process);
        if tier.tier == Tier::Web {
            container.lifecycle = Some(drain_before_sigterm());
        }
        container
    };
    environment.extend(user_env(&process.run.env));
    container.name = tier.tier.name().to_owned();
    container.image = Some(process.run.image.clone().unwrap_or_else(|| spec.image.clone()));
    container.image_pull_policy = Some(spec.image_pull_policy.clone());
    container.env = Some(environment);
    container.volume_mounts = Some(volume_mounts);
    container.security_context = Some(hardened());
    container.resources = Some(resources_spec.clone().unwrap_or_else(|| resources("100m", "64Mi", "512Mi")));
    container
}

/// The variables `tidepool web|worker` reads beyond the plan's.
/// A process of Tidepool's own, which a tier runs without a command of its
/// own: the clock has none (it always names the application's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnProcess {
    Web,
    Worker,
}

impl OwnProcess {
    fn of(tier: Tier) -> Option<OwnProcess> {
        match tier {
            Tier::Web => Some(OwnProcess::Web),
            Tier::Worker => Some(OwnProcess::Worker),
            Tier::Clock => None,
        }
    }
}

fn tidepool_env(validated: &Validated, tier: &TierPlan, own: OwnProcess) -> Vec<EnvVar> {
    let spec = &validated.spec;
    let secret = &spec.database.secret_ref.name;
    let mut environment = vec![
        env(pod::POOLER_STATS_URL, format!("postgres://{STATS_USER}@{POOLER_ADDRESS}/pgbouncer")),
        env(pod::POOLER_STATS_PASSWORD_FILE, APP_STATS_PASSWORD),
        env(pod::DB_POOL_SIZE, tier.pools.database_pool.to_string()),
        env(pod::SHUTDOWN_TIMEOUT, seconds(SHUTDOWN_TIMEOUT)),
        env(pod::LOG_FORMAT, "json"),
    ];
    match own {
        OwnProcess::Web => environment.extend([
            env(pod::LISTEN, format!("0.0.0.0:{WEB_PORT}")),
            env(pod::MAX_IN_FLIGHT, spec.web.concurrency.to_string()),
            env(pod::DRAIN_DELAY, seconds(DRAIN_DELAY)),
        ]),
        OwnProcess::Worker => {
            environment.extend([
                env(pod::WORKER_LISTEN, format!("0.0.0.0:{WORKER_PORT}")),
                env(pod::WORKER_CONCURRENCY, tier.pools.worker_concurrency.to_string()),
                env(pod::WORKER_QUEUES, spec.worker.queues.join(",")),
            ]);
            if tier.listen > 0 {
                environment.extend([
                    env_from_secret(DB_USER, secret, "username"),
                    env_from_secret(DB_HOST, secret, "host"),
                    env_from_secret(DB_PORT, secret, "port"),
                    direct_database_url(validated),
                    env(pod::DIRECT_DB_PASSWORD_FILE, format!("{DATABASE_DIR}/password")),
                ]);
            }
        }
    }
    environment
}

/// `tidepool web|worker`: its port, and its probes on the paths it serves.
fn tidepool_process(own: OwnProcess) -> Container {
    let (args, port_name, port) = match own {
        OwnProcess::Web => ("web", "http", WEB_PORT),
        OwnProcess::Worker => ("worker", "metrics", WORKER_PORT),
    };
    Container {
        args: Some(vec![args.to_owned()]),
        ports: Some(vec![container_port(port_name, port)]),
        startup_probe: Some(http_probe(HEALTH_PATH, port_name, 1, 30)),
        liveness_probe: Some(http_probe(HEALTH_PATH, port_name, 10, 3)),
        readiness_probe: Some(http_probe(READY_PATH, port_name, 5, 2)),
        ..Container::default()
    }
}

/// An application's process: the spec's command, arguments, port and
/// probes (with a port and no readiness probe, a TCP check of the port).
fn foreign_process(process: &ProcessSpec) -> Container {
    let readiness = process.readiness_probe.clone().or_else(|| {
        process.port.map(|_| Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String(PROCESS_PORT_NAME.to_owned()),
                ..TCPSocketAction::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..Probe::default()
        })
    });
    Container {
        command: non_empty(&process.run.command),
        args: non_empty(&process.run.args),
        ports: process.port.map(|port| vec![container_port(PROCESS_PORT_NAME, port)]),
        readiness_probe: readiness,
        liveness_probe: process.liveness_probe.clone(),
        ..Container::default()
    }
}

/// An application's web process hears SIGTERM only after the drain delay,
/// which a `preStop` sleep spends: meanwhile the pod, terminating, leaves
/// the Service's endpoints and kube-proxy stops sending it new connections,
/// while the process still serves those that arrive (gunicorn, say, closes
/// its listener at SIGTERM). Tidepool's own web spends the delay itself.
fn drain_before_sigterm() -> Lifecycle {
    Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction { seconds: DRAIN_DELAY.as_secs() as i64 }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}
