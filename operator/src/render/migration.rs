//! The migration Job, once per migration (its image, command and what its
//! pod template depends on), before the Deployments roll out: the
//! controller holds them until it has succeeded. Named after a hash of its
//! template, so a new image or command gets a Job of its own.
//!
//! It connects to PostgreSQL directly, not through PgBouncer: its one
//! connection is in `reservedConnections`. `tidepool migrate` (the default)
//! reads the password from the mounted Secret; an application's command
//! (`python manage.py migrate`) gets libpq's variables and a password file
//! (0600: libpq ignores a group-readable one, and the Secret's files are
//! 0440) that an init container from Tidepool's image writes into a memory
//! volume, and never mounts the Secret itself.

use std::hash::{Hash, Hasher};

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tidepool_contract::env as pod;
use tidepool_contract::env::composed::{DB_HOST, DB_NAME, DB_PORT, DB_USER};

use super::deployment::{
    direct_database_url, env, env_from_secret, hardened, memory_volume, mount, node_selector, non_empty,
    pod_security, resources, tmp_mount, tolerations, user_env, volumes, DATABASE_DIR, DATABASE_VOLUME,
    TMP_VOLUME,
};
use super::{labels, tls};
use crate::crd::{DatabaseTls, MigrationSpec};
use crate::validate::Validated;

pub const COMPONENT: &str = "migrate";
/// The memory volume with the application's password file.
const PASSFILE_VOLUME: &str = "pgpass";
const PASSFILE_DIR: &str = "/run/tidepool";
const PASSFILE: &str = "/run/tidepool/pgpass";
/// An application's migration: its last lines of output, when it fails,
/// are its termination message.
const FOREIGN_TERMINATION_MESSAGE: &str = "FallbackToLogsOnError";

/// The spec's migration, or the default one (`tidepool migrate`).
fn migration(validated: &Validated) -> MigrationSpec {
    validated.spec.migration.clone().unwrap_or_default()
}

/// `<tidepool>-migrate-<8 hex digits>` of what the Job's pod template
/// depends on (the images, pull policy, command, its environment, the
/// Secret, where it may be scheduled): a Job's template cannot change, so a
/// change makes a new Job.
pub fn job_name(validated: &Validated) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for byte in bytes {
                self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut hasher = Fnv(0xcbf2_9ce4_8422_2325);
    let spec = &validated.spec;
    let migration = migration(validated).run;
    (
        migration.image.as_ref().unwrap_or(&spec.image),
        &spec.image_pull_policy,
        &spec.database.secret_ref.name,
    )
        .hash(&mut hasher);
    // Hashed only when set, so the default migration's Job keeps its name.
    if migration.is_foreign() || !migration.env.is_empty() {
        serde_json::to_string(&(
            &migration.command,
            &migration.args,
            &migration.env,
            &spec.tidepool_image,
            FOREIGN_TERMINATION_MESSAGE,
        ))
        .unwrap_or_default()
        .hash(&mut hasher);
    }
    if spec.database.tls != DatabaseTls::default() {
        serde_json::to_string(&spec.database.tls).unwrap_or_default().hash(&mut hasher);
    }
    if !spec.node_selector.is_empty() || !spec.tolerations.is_empty() {
        serde_json::to_string(&(&spec.node_selector, &spec.tolerations))
            .unwrap_or_default()
            .hash(&mut hasher);
    }
    format!("{}-migrate-{:08x}", validated.owner.name, hasher.finish() as u32)
}

/// The Job, or none when the spec's migration is disabled.
pub fn job(validated: &Validated) -> Option<Job> {
    let spec = &validated.spec;
    let MigrationSpec { enabled, run: migration } = migration(validated);
    if !enabled {
        return None;
    }
    let secret = &spec.database.secret_ref.name;
    let owner = &validated.owner;
    let from_secret = [
        env_from_secret(DB_USER, secret, "username"),
        env_from_secret(DB_HOST, secret, "host"),
        env_from_secret(DB_PORT, secret, "port"),
        env_from_secret(DB_NAME, secret, "dbname"),
    ];
    // A Job's template cannot change: `tidepool migrate`'s stays as it was.
    let foreign = migration.is_foreign();
    let mut volumes: Vec<_> = volumes(validated)
        .into_iter()
        .filter(|v| v.name == DATABASE_VOLUME || (foreign && v.name == TMP_VOLUME))
        .chain(tls::volumes(&spec.database.tls))
        .collect();
    let mut init_containers = Vec::new();
    let mut container = if foreign {
        volumes.push(memory_volume(PASSFILE_VOLUME, "1Mi"));
        init_containers.push(Container {
            name: "pgpass".to_owned(),
            image: Some(spec.tidepool_image.clone()),
            image_pull_policy: Some(spec.image_pull_policy.clone()),
            args: Some(vec![
                "pgpass".to_owned(),
                format!("--from-dir={DATABASE_DIR}"),
                format!("--out={PASSFILE}"),
            ]),
            volume_mounts: Some(vec![
                mount(DATABASE_VOLUME, DATABASE_DIR),
                VolumeMount { read_only: None, ..mount(PASSFILE_VOLUME, PASSFILE_DIR) },
            ]),
            security_context: Some(hardened()),
            resources: Some(resources("10m", "16Mi", "64Mi")),
            ..Container::default()
        });
        let mut environment: Vec<EnvVar> = from_secret.into();
        environment.extend([
            env(pod::DATABASE_URL, format!("postgres://$({DB_USER})@$({DB_HOST}):$({DB_PORT})/$({DB_NAME})")),
            env(pod::plan::HOST, format!("$({DB_HOST})")),
            env(pod::plan::PORT, format!("$({DB_PORT})")),
            env(pod::plan::DATABASE, format!("$({DB_NAME})")),
            env(pod::plan::USER, format!("$({DB_USER})")),
            env(pod::plan::PASSFILE, PASSFILE),
        ]);
        environment.extend(tls::libpq_env(&spec.database.tls));
        let mut volume_mounts = vec![mount(PASSFILE_VOLUME, PASSFILE_DIR), tmp_mount()];
        volume_mounts.extend(tls::mounts(&spec.database.tls));
        Container {
            command: non_empty(&migration.command),
            args: non_empty(&migration.args),
            env: Some(environment),
            volume_mounts: Some(volume_mounts),
            ..Container::default()
        }
    } else {
        let mut environment: Vec<EnvVar> = from_secret.into();
        environment.extend([
            direct_database_url(validated),
            env(pod::DB_PASSWORD_FILE, format!("{DATABASE_DIR}/password")),
            env(pod::LOG_FORMAT, "json"),
        ]);
        let mut volume_mounts = vec![mount(DATABASE_VOLUME, DATABASE_DIR)];
        volume_mounts.extend(tls::mounts(&spec.database.tls));
        Container {
            args: Some(vec!["migrate".to_owned()]),
            env: Some(environment),
            volume_mounts: Some(volume_mounts),
            ..Container::default()
        }
    };
    if let Some(environment) = container.env.as_mut() {
        environment.extend(user_env(&migration.env));
    }
    container.name = COMPONENT.to_owned();
    container.image = Some(migration.image.clone().unwrap_or_else(|| spec.image.clone()));
    container.image_pull_policy = Some(spec.image_pull_policy.clone());
    container.security_context = Some(hardened());
    // The operator quotes a failed migration's termination message in
    // status (a certificate that does not verify names the host and the
    // reason there): `tidepool migrate` writes its error there itself; an
    // application's command gets its last lines of output.
    if foreign {
        container.termination_message_policy = Some(FOREIGN_TERMINATION_MESSAGE.to_owned());
    }
    container.resources =
        Some(if foreign { resources("50m", "64Mi", "256Mi") } else { resources("50m", "32Mi", "128Mi") });
    Some(Job {
        metadata: labels::component_metadata(owner, job_name(validated), COMPONENT),
        spec: Some(JobSpec {
            backoff_limit: Some(3),
            active_deadline_seconds: Some(600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels::component_labels(owner, COMPONENT)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security()),
                    node_selector: node_selector(validated),
                    tolerations: tolerations(validated),
                    volumes: Some(volumes),
                    init_containers: Some(init_containers).filter(|c| !c.is_empty()),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Tidepool;

    fn validated(image: &str, replicas: i32) -> Validated {
        let tidepool: Tidepool = serde_json::from_value(serde_json::json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "metadata": {"name": "shop", "namespace": "prod"},
            "spec": {"image": image, "database": {"secretRef": {"name": "db"}, "maxConnections": 300}, "web": {"replicas": replicas}},
        }))
        .expect("a Tidepool");
        crate::validate::validate(&tidepool, "default").expect("valid")
    }

    #[test]
    fn a_new_image_gets_a_new_job_and_nothing_else_does() {
        let first = job_name(&validated("app:1", 2));
        assert!(first.starts_with("shop-migrate-") && first.len() == "shop-migrate-".len() + 8, "{first}");
        assert_eq!(first, job_name(&validated("app:1", 5)), "replicas do not migrate");
        assert_ne!(first, job_name(&validated("app:2", 2)));
    }

    #[test]
    fn the_job_migrates_on_a_direct_connection_with_the_password_from_a_file() {
        let job = serde_json::to_value(job(&validated("app:1", 2)).expect("a Job")).expect("serializes");
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        let env = pod["containers"][0]["env"].as_array().cloned().unwrap_or_default();
        let value = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
        assert_eq!(value("TIDEPOOL_DB_PASSWORD_FILE"), Some("/etc/tidepool/database/password".into()));
        let url = value("TIDEPOOL_DIRECT_DATABASE_URL").unwrap_or_default();
        assert!(url.as_str().is_some_and(|u| u.contains("$(TIDEPOOL_DB_HOST):$(TIDEPOOL_DB_PORT)")), "{url}");
        assert!(env.iter().all(|e| e["valueFrom"]["secretKeyRef"]["key"] != "password"));
    }
}
