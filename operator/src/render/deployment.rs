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
//! 3. the app, whose pools add up to the share, with its password from the
//!    mounted Secret file (never an environment literal); it also reads
//!    PgBouncer's figures for its `/metrics` from the admin console, as the
//!    stats user whose password `pooler-config` wrote (that one file is
//!    mounted).
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
    HTTPGetAction, KeyToPath, PodSchedulingGate, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tidepool_contract::env as pod;
use tidepool_contract::secret::KEYS as SECRET_KEYS;
use tidepool_contract::{HEALTH_PATH, READY_PATH, STATS_PASSWORD_FILE};

use super::labels::{self, DIRECT_ANNOTATION, SHARE_ANNOTATION};
use crate::admission::GATE;
use crate::plan::{Tier, TierPlan};
use crate::to_i32;
use crate::validate::Validated;

/// Where PgBouncer listens in every pod; the app connects here.
pub const POOLER_ADDRESS: &str = "127.0.0.1:6432";
pub const WEB_PORT: i32 = 8000;
pub const WORKER_PORT: i32 = 8001;
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
const POOLER_VOLUME: &str = "pgbouncer";
const POOLER_DIR: &str = "/etc/pgbouncer";
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
    let grace = match tier {
        Tier::Web => DRAIN_DELAY + SHUTDOWN_TIMEOUT + GRACE_MARGIN,
        Tier::Worker => SHUTDOWN_TIMEOUT + GRACE_MARGIN,
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
                    init_containers: Some(vec![pooler_config(validated, tier_plan), pooler(validated)]),
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
    vec![
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
        Volume {
            name: POOLER_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                size_limit: Some(Quantity("1Mi".to_owned())),
            }),
            ..Volume::default()
        },
    ]
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

/// The database Secret's keys as variables, from which Kubernetes composes
/// the connection URLs (`$(TIDEPOOL_DB_USER)`): the operator's own, which
/// the runtime never reads.
pub(super) const DB_USER: &str = "TIDEPOOL_DB_USER";
pub(super) const DB_NAME: &str = "TIDEPOOL_DB_NAME";
pub(super) const DB_HOST: &str = "TIDEPOOL_DB_HOST";
pub(super) const DB_PORT: &str = "TIDEPOOL_DB_PORT";
/// All four, for the test that the operator renders no other variable.
#[cfg(test)]
pub(super) const COMPOSED_FROM: [&str; 4] = [DB_USER, DB_NAME, DB_HOST, DB_PORT];

/// The direct connection URL (to PostgreSQL, not through PgBouncer),
/// composed of the Secret's variables: the worker's LISTEN session and the
/// migration Job.
pub(super) fn direct_database_url() -> EnvVar {
    env(pod::DIRECT_DATABASE_URL, format!("postgres://$({DB_USER})@$({DB_HOST}):$({DB_PORT})/$({DB_NAME})"))
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
    args.extend(validated.spec.pooler.parameters.iter().map(|(key, value)| format!("--set={key}={value}")));
    Container {
        name: "pooler-config".to_owned(),
        image: Some(validated.spec.image.clone()),
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
        volume_mounts: Some(vec![mount(POOLER_VOLUME, POOLER_DIR)]),
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

/// The app container of a tier.
fn app(validated: &Validated, tier: &TierPlan) -> Container {
    let spec = &validated.spec;
    let secret = &spec.database.secret_ref.name;
    let mut environment = vec![
        env_from_secret(DB_USER, secret, "username"),
        env_from_secret(DB_NAME, secret, "dbname"),
        env(pod::DATABASE_URL, format!("postgres://$({DB_USER})@{POOLER_ADDRESS}/$({DB_NAME})")),
        env(pod::DB_PASSWORD_FILE, format!("{DATABASE_DIR}/password")),
        env(pod::POOLER_STATS_URL, format!("postgres://{STATS_USER}@{POOLER_ADDRESS}/pgbouncer")),
        env(pod::POOLER_STATS_PASSWORD_FILE, APP_STATS_PASSWORD),
        env(pod::DB_POOL_SIZE, tier.pools.database_pool.to_string()),
        env(pod::SHUTDOWN_TIMEOUT, seconds(SHUTDOWN_TIMEOUT)),
        env(pod::LOG_FORMAT, "json"),
    ];
    let (args, port_name, port, resources_spec) = match tier.tier {
        Tier::Web => {
            environment.extend([
                env(pod::LISTEN, format!("0.0.0.0:{WEB_PORT}")),
                env(pod::MAX_IN_FLIGHT, spec.web.concurrency.to_string()),
                env(pod::DRAIN_DELAY, seconds(DRAIN_DELAY)),
            ]);
            ("web", "http", WEB_PORT, &spec.web.resources)
        }
        Tier::Worker => {
            environment.extend([
                env(pod::WORKER_LISTEN, format!("0.0.0.0:{WORKER_PORT}")),
                env(pod::WORKER_CONCURRENCY, tier.pools.worker_concurrency.to_string()),
                env(pod::WORKER_QUEUES, spec.worker.queues.join(",")),
            ]);
            if tier.listen > 0 {
                environment.extend([
                    env_from_secret(DB_HOST, secret, "host"),
                    env_from_secret(DB_PORT, secret, "port"),
                    direct_database_url(),
                ]);
            }
            ("worker", "metrics", WORKER_PORT, &spec.worker.resources)
        }
    };
    Container {
        name: tier.tier.name().to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.clone()),
        args: Some(vec![args.to_owned()]),
        env: Some(environment),
        ports: Some(vec![ContainerPort {
            name: Some(port_name.to_owned()),
            container_port: port,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(http_probe(HEALTH_PATH, port_name, 1, 30)),
        liveness_probe: Some(http_probe(HEALTH_PATH, port_name, 10, 3)),
        readiness_probe: Some(http_probe(READY_PATH, port_name, 5, 2)),
        volume_mounts: Some(vec![
            mount(DATABASE_VOLUME, DATABASE_DIR),
            VolumeMount {
                sub_path: Some(STATS_PASSWORD_FILE.to_owned()),
                ..mount(POOLER_VOLUME, APP_STATS_PASSWORD)
            },
        ]),
        security_context: Some(hardened()),
        resources: Some(resources_spec.clone().unwrap_or_else(|| resources("100m", "64Mi", "512Mi"))),
        ..Container::default()
    }
}
