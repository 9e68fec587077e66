//! The migration Job: `tidepool migrate` on a direct connection (not through
//! PgBouncer; its one connection is in `reservedConnections`), once per
//! image, before that image's pods roll out. Named after the image, so a new
//! image gets a Job of its own and the controller holds the Deployments
//! until it has succeeded.

use std::hash::{Hash, Hasher};

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tidepool_contract::env as pod;

use super::deployment::{
    direct_database_url, env, env_from_secret, hardened, mount, node_selector, pod_security, resources,
    tolerations, volumes, DATABASE_DIR, DATABASE_VOLUME, DB_HOST, DB_NAME, DB_PORT, DB_USER,
};
use super::labels;
use crate::validate::Validated;

pub const COMPONENT: &str = "migrate";

/// `<tidepool>-migrate-<8 hex digits>` of what the Job's pod template
/// depends on (the image, its pull policy, the Secret, where it may be
/// scheduled): a Job's template cannot change, so a change makes a new Job.
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
    (&validated.spec.image, &validated.spec.image_pull_policy, &validated.spec.database.secret_ref.name)
        .hash(&mut hasher);
    let spec = &validated.spec;
    if !spec.node_selector.is_empty() || !spec.tolerations.is_empty() {
        serde_json::to_string(&(&spec.node_selector, &spec.tolerations))
            .unwrap_or_default()
            .hash(&mut hasher);
    }
    format!("{}-migrate-{:08x}", validated.owner.name, hasher.finish() as u32)
}

pub fn job(validated: &Validated) -> Job {
    let spec = &validated.spec;
    let secret = &spec.database.secret_ref.name;
    let owner = &validated.owner;
    let container = Container {
        name: COMPONENT.to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.clone()),
        args: Some(vec!["migrate".to_owned()]),
        env: Some(vec![
            env_from_secret(DB_USER, secret, "username"),
            env_from_secret(DB_HOST, secret, "host"),
            env_from_secret(DB_PORT, secret, "port"),
            env_from_secret(DB_NAME, secret, "dbname"),
            direct_database_url(),
            env(pod::DB_PASSWORD_FILE, format!("{DATABASE_DIR}/password")),
            env(pod::LOG_FORMAT, "json"),
        ]),
        volume_mounts: Some(vec![mount(DATABASE_VOLUME, DATABASE_DIR)]),
        security_context: Some(hardened()),
        resources: Some(resources("50m", "32Mi", "128Mi")),
        ..Container::default()
    };
    Job {
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
                    volumes: Some(
                        volumes(validated).into_iter().filter(|v| v.name == DATABASE_VOLUME).collect(),
                    ),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
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
        let job = serde_json::to_value(job(&validated("app:1", 2))).expect("serializes");
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
