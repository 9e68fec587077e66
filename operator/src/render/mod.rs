//! Rendering: `plan → objects`, pure. A Tidepool's children, in the order
//! they are applied (the migration Job first: the controller applies the
//! rest once it has succeeded; the Service and disruption budgets before
//! the Deployments; the autoscaler last), each a typed k8s-openapi object.
//!
//! A tier that can never have pods (`maxReplicas` 0) has no children.

pub mod deployment;
pub mod hpa;
pub mod labels;
pub mod migration;
pub mod pdb;
pub mod service;
pub mod tls;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::Serialize;

use crate::plan::{Plan, Tier};
use crate::validate::Validated;

/// One child object.
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    Job(Box<Job>),
    Service(Service),
    PodDisruptionBudget(PodDisruptionBudget),
    /// A tier's Deployment.
    Deployment(Tier, Box<Deployment>),
    HorizontalPodAutoscaler(HorizontalPodAutoscaler),
}

impl Child {
    pub fn kind(&self) -> &'static str {
        match self {
            Child::Job(_) => "Job",
            Child::Service(_) => "Service",
            Child::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Child::Deployment(..) => "Deployment",
            Child::HorizontalPodAutoscaler(_) => "HorizontalPodAutoscaler",
        }
    }

    pub fn name(&self) -> &str {
        let metadata = match self {
            Child::Job(o) => &o.metadata,
            Child::Service(o) => &o.metadata,
            Child::PodDisruptionBudget(o) => &o.metadata,
            Child::Deployment(_, o) => &o.metadata,
            Child::HorizontalPodAutoscaler(o) => &o.metadata,
        };
        metadata.name.as_deref().unwrap_or_default()
    }

    /// The object as JSON, with its `apiVersion` and `kind`.
    pub fn to_json(&self) -> serde_json::Value {
        fn typed<T: Serialize + k8s_openapi::Resource>(object: &T) -> serde_json::Value {
            let mut value = serde_json::to_value(object).unwrap_or_default();
            if let Some(map) = value.as_object_mut() {
                map.insert("apiVersion".to_owned(), T::API_VERSION.into());
                map.insert("kind".to_owned(), T::KIND.into());
            }
            value
        }
        match self {
            Child::Job(o) => typed(o.as_ref()),
            Child::Service(o) => typed(o),
            Child::PodDisruptionBudget(o) => typed(o),
            Child::Deployment(_, o) => typed(o.as_ref()),
            Child::HorizontalPodAutoscaler(o) => typed(o),
        }
    }
}

/// Every child of a Tidepool, in apply order: the migration Job, each
/// tier's Service (web) and disruption budget, the Deployments, the HPA.
/// A tier that may have no pods at all has none of its children.
pub fn children(validated: &Validated, plan: &Plan) -> Vec<Child> {
    let owner = &validated.owner;
    let with_pods = || plan.tiers.iter().filter(|t| t.max_replicas > 0);
    let mut children: Vec<Child> =
        migration::job(validated).map(|job| Child::Job(Box::new(job))).into_iter().collect();
    for tier in with_pods() {
        if tier.tier == Tier::Web {
            children.push(Child::Service(service::web_service(owner, deployment::web_port_name(validated))));
        }
        children.push(Child::PodDisruptionBudget(pdb::pdb(owner, tier.tier)));
    }
    for tier in with_pods() {
        children.push(Child::Deployment(tier.tier, Box::new(deployment::deployment(validated, tier))));
    }
    if let (true, Some(autoscaling)) =
        (with_pods().any(|t| t.tier == Tier::Web), &validated.spec.web.autoscaling)
    {
        children.push(Child::HorizontalPodAutoscaler(hpa::web_hpa(owner, autoscaling)));
    }
    children
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Tidepool;
    use crate::validate::validate;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn tidepool(spec: serde_json::Value) -> Tidepool {
        let mut object = serde_json::json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool",
            "metadata": {"name": "shop", "namespace": "prod", "uid": "0e5c6a55-0000-4000-8000-000000000001"},
        });
        object["spec"] = spec;
        serde_json::from_value(object).expect("a Tidepool")
    }

    fn render(spec: serde_json::Value) -> (Plan, Vec<Child>) {
        let validated = validate(&tidepool(spec), "default").expect("valid");
        let plan = crate::plan::plan(&validated.input).expect("fits");
        let children = children(&validated, &plan);
        (plan, children)
    }

    fn pod(children: &[Child], tier: Tier) -> PodSpec {
        children
            .iter()
            .find_map(|c| match c {
                Child::Deployment(t, d) if *t == tier => {
                    d.spec.as_ref().and_then(|s| s.template.spec.clone())
                }
                _ => None,
            })
            .expect("the tier's Deployment")
    }

    fn job_pod(children: &[Child]) -> PodSpec {
        children
            .iter()
            .find_map(|c| match c {
                Child::Job(job) => job.spec.as_ref().and_then(|s| s.template.spec.clone()),
                _ => None,
            })
            .expect("the migration Job")
    }

    /// The container never gets the password as a variable, and mounts the
    /// Secret (its only way to the server's password) only when it `may`.
    fn assert_no_secret_password(container: &Container, may_mount_the_secret: bool) {
        let password_in_env = container.env.iter().flatten().any(|e| {
            e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).is_some_and(|k| k.key == "password")
        });
        assert!(!password_in_env, "{}: the password is never a variable", container.name);
        let mounts_secret =
            container.volume_mounts.iter().flatten().any(|m| m.name == deployment::DATABASE_VOLUME);
        assert_eq!(mounts_secret, may_mount_the_secret, "{}: the Secret's mount", container.name);
    }

    fn env<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
        container.env.as_ref()?.iter().find(|e| e.name == name)?.value.as_deref()
    }

    fn arg<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
        container.args.as_ref()?.iter().find_map(|a| a.strip_prefix(&format!("{flag}=")))
    }

    #[test]
    fn the_sidecar_and_the_app_carry_the_plans_numbers() {
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 300, "reservedConnections": 10},
            "worker": {"listen": true}});
        let (plan, children) = render(spec);
        for plan in &plan.tiers {
            let pod = pod(&children, plan.tier);
            let init = pod.init_containers.as_ref().expect("init containers");
            assert_eq!(
                init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
                ["pooler-config", "pgbouncer"]
            );
            assert_eq!(init[1].restart_policy.as_deref(), Some("Always"), "PgBouncer is a native sidecar");
            assert_eq!(arg(&init[0], "--max-db-connections"), Some(plan.share.to_string().as_str()));
            assert_eq!(arg(&init[0], "--pool-size"), Some(plan.share.to_string().as_str()));
            let app = &pod.containers[0];
            assert_eq!(
                env(app, "TIDEPOOL_DB_POOL_SIZE"),
                Some(plan.pools.database_pool.to_string().as_str())
            );
            assert_eq!(env(app, "TIDEPOOL_DB_PASSWORD_FILE"), Some("/etc/tidepool/db.password"));
            assert_eq!(
                env(app, "DATABASE_URL"),
                Some("postgres://tidepool_app@127.0.0.1:6432/$(TIDEPOOL_DB_NAME)")
            );
            assert_eq!(env(app, "TIDEPOOL_DB_CONNECTIONS"), Some(plan.share.to_string().as_str()));
            assert_eq!(arg(&init[0], "--client-user"), Some("tidepool_app"));
            assert_eq!(init[0].image.as_deref(), Some(crate::crd::DEFAULT_IMAGE), "Tidepool's image");
            assert_no_secret_password(app, plan.listen > 0);
            for container in init.iter().chain(&pod.containers) {
                let security = container.security_context.as_ref().expect("hardened");
                assert_eq!(security.read_only_root_filesystem, Some(true), "{}", container.name);
                assert_eq!(security.allow_privilege_escalation, Some(false), "{}", container.name);
            }
        }
        let worker = pod(&children, Tier::Worker);
        assert_eq!(env(&worker.containers[0], "TIDEPOOL_WORKER_CONCURRENCY"), Some("50"));
        assert!(env(&worker.containers[0], "TIDEPOOL_DIRECT_DATABASE_URL").is_some());
    }

    /// The worker's liveness probe is `/healthz` on its own port, which
    /// fails while its claim loop is stalled (never for a database
    /// outage): the kubelet restarts a wedged worker after three failures.
    #[test]
    fn a_worker_whose_claim_loop_stalls_is_restarted() {
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 300}});
        let (_, children) = render(spec);
        let worker = &pod(&children, Tier::Worker).containers[0];
        let liveness = worker.liveness_probe.as_ref().expect("a liveness probe");
        let get = liveness.http_get.as_ref().expect("over HTTP");
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        let port = worker.ports.iter().flatten().find(|p| p.container_port == deployment::WORKER_PORT);
        assert_eq!(
            get.port,
            IntOrString::String(port.and_then(|p| p.name.clone()).expect("the worker's named port"))
        );
        assert_eq!((liveness.period_seconds, liveness.failure_threshold), (Some(10), Some(3)));
        assert_eq!(worker.args.as_deref(), Some(&["worker".to_owned()][..]));
    }

    /// Every variable of every container (the Job's, each tier's app and
    /// sidecars) is one the runtime reads, from the pod contract, or one
    /// Kubernetes composes the URLs from.
    #[test]
    fn every_variable_rendered_is_the_contracts_or_composes_one() {
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 300},
            "worker": {"listen": true}});
        let (_, children) = render(spec);
        let mut seen = Vec::new();
        for child in &children {
            let pod = match child {
                Child::Deployment(_, d) => d.spec.as_ref().and_then(|s| s.template.spec.clone()),
                Child::Job(j) => j.spec.as_ref().and_then(|s| s.template.spec.clone()),
                _ => None,
            };
            let Some(pod) = pod else { continue };
            for container in pod.init_containers.iter().flatten().chain(&pod.containers) {
                for var in container.env.iter().flatten() {
                    let known = crate::crd::owned_variables().contains(&var.name.as_str());
                    assert!(
                        known,
                        "{} sets {}, which the pod contract does not name",
                        container.name, var.name
                    );
                    seen.push(var.name.clone());
                }
            }
        }
        for name in tidepool_contract::env::ALL.iter().chain(tidepool_contract::env::plan::ALL) {
            assert!(seen.iter().any(|s| s == name), "no container gets {name}");
        }
    }

    #[test]
    fn the_share_annotation_is_pgbouncers_cap() {
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 50}});
        let (plan, children) = render(spec);
        assert!(!plan.asks_met, "a short budget, so the share differs from the ask");
        for child in &children {
            let Child::Deployment(_, deployment) = child else { continue };
            let template = &deployment.spec.as_ref().expect("spec").template;
            let annotation = template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(labels::SHARE_ANNOTATION));
            let pooler_config =
                &template.spec.as_ref().expect("pod").init_containers.as_ref().expect("init")[0];
            assert_eq!(
                annotation.map(String::as_str),
                arg(pooler_config, "--max-db-connections"),
                "{}",
                child.name()
            );
        }
    }

    fn spec_for_kinds() -> serde_json::Value {
        serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 300},
            "web": {"replicas": 2, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}})
    }

    #[test]
    fn children_are_owned_and_an_hpa_scales_the_tidepool() {
        let (_, children) = render(spec_for_kinds());
        let kinds: Vec<_> = children.iter().map(|c| (c.kind(), c.name().to_owned())).collect();
        assert_eq!(
            kinds,
            [
                (
                    "Job",
                    migration::job_name(&validate(&tidepool(spec_for_kinds()), "default").expect("valid"))
                ),
                ("Service", "shop-web".to_owned()),
                ("PodDisruptionBudget", "shop-web".to_owned()),
                ("PodDisruptionBudget", "shop-worker".to_owned()),
                ("Deployment", "shop-web".to_owned()),
                ("Deployment", "shop-worker".to_owned()),
                ("HorizontalPodAutoscaler", "shop-web".to_owned()),
            ]
        );
        for child in &children {
            let json = child.to_json();
            assert_eq!(json["metadata"]["ownerReferences"][0]["kind"], "Tidepool");
            assert_eq!(json["metadata"]["ownerReferences"][0]["controller"], true);
            assert_eq!(json["metadata"]["labels"]["app.kubernetes.io/managed-by"], "tidepool-operator");
        }
        let hpa = children.last().expect("an HPA").to_json();
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Tidepool");
        assert_eq!(hpa["spec"]["maxReplicas"], 5);
    }

    #[test]
    fn pooler_parameters_reach_pooler_config_and_tls_comes_from_database_tls() {
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 100},
            "pooler": {"parameters": {"server_login_retry": "5"}}});
        let (_, children) = render(spec);
        let pod = pod(&children, Tier::Web);
        let init = pod.init_containers.as_ref().expect("the sidecars");
        let args = init[0].args.as_deref().unwrap_or_default();
        assert_eq!(init[0].name, "pooler-config");
        assert!(args.contains(&"--server-tls-sslmode=prefer".to_owned()), "libpq's default: {args:?}");
        assert!(args.contains(&"--set=server_login_retry=5".to_owned()), "{args:?}");
        assert!(!args.iter().any(|a| a.starts_with("--set=server_tls")), "{args:?}");
    }

    /// The credentials' fingerprint is every pod template's (a rotated
    /// password rolls every tier), and not the migration Job's: its name
    /// and template stay.
    #[test]
    fn the_credentials_fingerprint_rolls_the_pods_not_the_migration() {
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 300},
            "clock": {"command": ["python3", "beat.py"]}, "migration": {"command": ["python3", "migrate.py"]}});
        let mut validated = validate(&tidepool(spec), "default").expect("valid");
        let plan = crate::plan::plan(&validated.input).expect("fits");
        let without = children(&validated, &plan);
        validated.credentials = Some("0123456789abcdef0123456789abcdef".into());
        let with = children(&validated, &plan);
        let mut tiers = 0;
        for (before, after) in without.iter().zip(&with) {
            assert_eq!(before.name(), after.name());
            match (before, after) {
                (Child::Deployment(_, before), Child::Deployment(tier, after)) => {
                    tiers += 1;
                    let annotations = |d: &k8s_openapi::api::apps::v1::Deployment| {
                        d.spec.as_ref().and_then(|s| s.template.metadata.clone()).and_then(|m| m.annotations)
                    };
                    let after = annotations(after).unwrap_or_default();
                    assert_eq!(
                        after.get(crate::credentials::ANNOTATION).map(String::as_str),
                        Some("0123456789abcdef0123456789abcdef"),
                        "{tier:?}"
                    );
                    assert!(!annotations(before)
                        .unwrap_or_default()
                        .contains_key(crate::credentials::ANNOTATION));
                }
                (before, after) => assert_eq!(before.to_json(), after.to_json(), "{}", before.name()),
            }
        }
        assert_eq!(tiers, 3, "web, worker and clock");
    }

    /// `database.tls` reaches every connection to PostgreSQL: PgBouncer's
    /// flags and files, the LISTEN session's and `tidepool migrate`'s URL,
    /// an application's migration's libpq variables; and only the CA's
    /// certificate is mounted from its Secret.
    #[test]
    fn database_tls_reaches_every_client_of_postgresql() {
        let tls = serde_json::json!({"mode": "verify-full", "caSecretRef": {"name": "pg-ca"},
            "clientCertificateSecretRef": {"name": "pg-client"}});
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 100, "tls": tls},
            "worker": {"listen": true}});
        let (_, children) = render(spec);
        let mounted = |pod: &k8s_openapi::api::core::v1::PodSpec, container: &str| -> Vec<String> {
            pod.init_containers
                .iter()
                .flatten()
                .chain(&pod.containers)
                .filter(|c| c.name == container)
                .flat_map(|c| c.volume_mounts.iter().flatten().map(|m| m.mount_path.clone()))
                .collect()
        };
        let ca_dir = "/etc/tidepool/database-ca".to_owned();
        for tier in [Tier::Web, Tier::Worker] {
            let pod = pod(&children, tier);
            let args = pod.init_containers.as_ref().expect("sidecars")[0].args.clone().unwrap_or_default();
            for flag in [
                "--server-tls-sslmode=verify-full",
                "--server-tls-ca-file=/etc/tidepool/database-ca/ca.crt",
                "--server-tls-cert-file=/etc/tidepool/database-client/tls.crt",
                "--server-tls-key-file=/etc/tidepool/database-client/tls.key",
            ] {
                assert!(args.iter().any(|a| a == flag), "{tier}: {flag} not in {args:?}");
            }
            assert!(mounted(&pod, "pgbouncer").contains(&ca_dir), "{tier}");
            let ca = pod.volumes.iter().flatten().find(|v| v.name == "database-ca").expect("the CA volume");
            let items = ca.secret.as_ref().and_then(|s| s.items.clone()).unwrap_or_default();
            assert_eq!(items.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), ["ca.crt"]);
        }
        let worker = pod(&children, Tier::Worker);
        let url = worker.containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "TIDEPOOL_DIRECT_DATABASE_URL")
            .and_then(|e| e.value.clone())
            .unwrap_or_default();
        assert!(url.ends_with("?sslmode=verify-full&sslrootcert=/etc/tidepool/database-ca/ca.crt&sslcert=/etc/tidepool/database-client/tls.crt&sslkey=/etc/tidepool/database-client/tls.key"), "{url}");
        assert!(mounted(&worker, "worker").contains(&ca_dir));
        let job = job_pod(&children);
        let env = job.containers[0].env.clone().unwrap_or_default();
        assert!(env.iter().any(|e| e.name == "TIDEPOOL_DIRECT_DATABASE_URL"
            && e.value.as_deref().is_some_and(|v| v.contains("?sslmode=verify-full&sslrootcert="))));
        assert!(mounted(&job, "migrate").contains(&ca_dir));

        let foreign =
            django(serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 200,
            "reservedConnections": 10, "tls": {"mode": "verify-ca", "caSecretRef": {"name": "pg-ca"}}}}));
        let (_, children) = render(foreign);
        let job = job_pod(&children);
        let env = job.containers[0].env.clone().unwrap_or_default();
        let var = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
        assert_eq!(var("PGSSLMODE").as_deref(), Some("verify-ca"));
        assert_eq!(var("PGSSLROOTCERT").as_deref(), Some("/etc/tidepool/database-ca/ca.crt"));
        assert_eq!(var("PGSSLCERT"), None);
        assert!(mounted(&job, "migrate").contains(&ca_dir));
        assert_eq!(job.containers[0].termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
    }

    #[test]
    fn a_tier_that_never_has_pods_has_no_children() {
        let spec = serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 100}, "worker": {"replicas": 0}});
        let (_, children) = render(spec);
        assert!(children.iter().all(|c| !c.name().ends_with("-worker")));
    }

    fn django(extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "image": "localhost/django-shop:1",
            "database": {"secretRef": {"name": "db"}, "maxConnections": 200, "reservedConnections": 10},
            "migration": {"command": ["python3", "manage.py", "migrate"]},
            "web": {"replicas": 2, "concurrency": 500, "databasePool": 10, "port": 8000,
                "command": ["gunicorn"], "args": ["-k", "gevent", "--worker-connections", "$(TIDEPOOL_CONCURRENCY)", "shop.wsgi"],
                "env": [{"name": "DJANGO_SETTINGS_MODULE", "value": "shop.settings"}],
                "readinessProbe": {"httpGet": {"path": "/healthz/", "port": "app"}}},
            "worker": {"replicas": 1, "concurrency": 50, "queryWaitTimeoutSeconds": 10,
                "command": ["celery"], "args": ["-A", "shop", "worker", "-P", "gevent", "-c", "$(TIDEPOOL_CONCURRENCY)"],
                "livenessProbe": {"exec": {"command": ["celery", "-A", "shop", "inspect", "ping"]}}},
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        spec
    }

    /// An application's tiers run their own command with the plan in their
    /// environment, Tidepool's containers keep Tidepool's image, and the
    /// password stays with PgBouncer.
    #[test]
    fn an_applications_tiers_run_their_command_with_the_plan() {
        let (plan, children) = render(django(serde_json::json!({})));
        let web = pod(&children, Tier::Web);
        let app = &web.containers[0];
        assert_eq!(app.image.as_deref(), Some("localhost/django-shop:1"));
        assert_eq!(app.command.as_deref(), Some(&["gunicorn".to_owned()][..]));
        assert_eq!(
            web.init_containers.as_ref().expect("init")[0].image.as_deref(),
            Some(crate::crd::DEFAULT_IMAGE)
        );
        let names: Vec<&str> = app.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let plan_vars = names.iter().position(|n| *n == "TIDEPOOL_CONCURRENCY").expect("the plan");
        let users = names.iter().position(|n| *n == "DJANGO_SETTINGS_MODULE").expect("the spec's");
        assert!(
            plan_vars < users,
            "the plan's variables come first, so $(NAME) can refer to them: {names:?}"
        );
        assert_eq!(env(app, "TIDEPOOL_CONCURRENCY"), Some("500"));
        assert_eq!(env(app, "PGHOST"), Some("127.0.0.1"));
        assert_eq!(env(app, "PGPASSFILE"), Some("/etc/tidepool/pgpass"));
        assert!(
            env(app, "TIDEPOOL_MAX_IN_FLIGHT").is_none(),
            "Tidepool's own variables are for Tidepool's process"
        );
        assert_no_secret_password(app, false);
        let port = &app.ports.as_ref().expect("a port")[0];
        assert_eq!((port.name.as_deref(), port.container_port), (Some("app"), 8000));
        assert!(app.startup_probe.is_none());
        assert_eq!(
            app.volume_mounts.iter().flatten().find(|m| m.mount_path == "/tmp").map(|m| m.read_only),
            Some(None),
            "a writable /tmp"
        );
        let service = children.iter().find(|c| c.kind() == "Service").expect("a Service").to_json();
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "app");
        // It hears SIGTERM after the drain delay, out of the Service by then,
        // and its shutdown fits the grace period after it.
        let sleep = app.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).and_then(|h| h.sleep.as_ref());
        assert_eq!(sleep.map(|s| s.seconds), Some(5));
        assert_eq!(web.termination_grace_period_seconds, Some(30));

        let worker_plan = plan.tier(Tier::Worker).expect("a worker");
        assert_eq!(worker_plan.ask, 50, "a foreign worker asks its concurrency, no queue connections");
        let worker = pod(&children, Tier::Worker);
        assert!(
            worker.containers[0].lifecycle.is_none(),
            "a worker drains on SIGTERM (Celery's warm shutdown)"
        );
        let config = &worker.init_containers.as_ref().expect("init")[0];
        assert_eq!(arg(config, "--query-wait-timeout"), Some("10s"));
        assert_eq!(arg(config, "--max-client-conn"), Some("66"));
        let sidecars: Vec<&str> = worker.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(sidecars, ["pooler-config", "pgbouncer", "pgbouncer-exporter"]);
        let exporter = &worker.init_containers.as_ref().expect("init")[2];
        assert_eq!(exporter.restart_policy.as_deref(), Some("Always"));
        assert_eq!(exporter.image.as_deref(), Some(crate::crd::DEFAULT_IMAGE));
        assert_eq!(exporter.ports.as_ref().map(|p| p[0].container_port), Some(9127));
        assert_no_secret_password(exporter, false);
        let celery = &worker.containers[0];
        assert!(celery.ports.is_none() && celery.readiness_probe.is_none());
        assert!(celery.liveness_probe.as_ref().is_some_and(|p| p.exec.is_some()));
        assert_eq!(env(celery, "TIDEPOOL_CONCURRENCY"), Some("50"));
    }

    /// An application's migration gets libpq's variables and a 0600
    /// password file from an init container of Tidepool's image, never the
    /// Secret's mount or a URL with a password; disabled, no Job at all.
    #[test]
    fn an_applications_migration_reads_a_password_file() {
        let (_, children) = render(django(serde_json::json!({})));
        let Some(Child::Job(job)) = children.first() else { panic!("the Job comes first") };
        let pod = job.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("a pod");
        let init = &pod.init_containers.as_ref().expect("the password file's writer")[0];
        assert_eq!(init.image.as_deref(), Some(crate::crd::DEFAULT_IMAGE));
        assert_eq!(arg(init, "--out"), Some("/run/tidepool/pgpass"));
        let migrate = &pod.containers[0];
        assert_eq!(migrate.image.as_deref(), Some("localhost/django-shop:1"));
        assert_eq!(env(migrate, "PGPASSFILE"), Some("/run/tidepool/pgpass"));
        let url = env(migrate, "DATABASE_URL").unwrap_or_default();
        assert!(url.starts_with("postgres://$(TIDEPOOL_DB_USER)@$(TIDEPOOL_DB_HOST)"), "{url}");
        assert_no_secret_password(migrate, false);

        let (_, none) = render(django(serde_json::json!({"migration": {"enabled": false}})));
        assert!(none.iter().all(|c| c.kind() != "Job"));
    }

    #[test]
    fn the_migrations_name_covers_its_image_and_command() {
        let name = |migration: serde_json::Value| {
            migration::job_name(
                &validate(&tidepool(django(serde_json::json!({"migration": migration}))), "default")
                    .expect("valid"),
            )
        };
        let base = name(serde_json::json!({"command": ["python3", "manage.py", "migrate"]}));
        assert_ne!(
            base,
            name(serde_json::json!({"command": ["python3", "manage.py", "migrate", "--noinput"]}))
        );
        assert_ne!(
            base,
            name(serde_json::json!({"command": ["python3", "manage.py", "migrate"], "image": "other:2"}))
        );
        assert_eq!(base, name(serde_json::json!({"command": ["python3", "manage.py", "migrate"]})));
    }

    /// A clock renders one pod that never surges: its replacement is
    /// created only after the old pod is deleted (maxUnavailable 1), and
    /// admission holds it until that one has gone. It runs the
    /// application's command with the plan, an exporter beside PgBouncer,
    /// and no Service.
    #[test]
    fn a_clock_is_one_pod_that_never_surges() {
        let spec = serde_json::json!({
            "database": {"secretRef": {"name": "db"}, "maxConnections": 100},
            "rollout": {"maxSurge": 2},
            "migration": {"enabled": false},
            "clock": {"command": ["python3", "-m", "celery"], "args": ["beat"], "databasePool": 2},
        });
        let (plan, children) = render(spec);
        let clock = plan.tier(Tier::Clock).expect("a clock tier");
        assert_eq!((clock.replicas, clock.max_replicas, clock.surge, clock.pods_at_once), (1, 1, 0, 1));
        assert_eq!(clock.share, 2);
        let deployment = children
            .iter()
            .find_map(|c| match c {
                Child::Deployment(Tier::Clock, d) => Some(d),
                _ => None,
            })
            .expect("the clock's Deployment");
        let spec = deployment.spec.as_ref().expect("a spec");
        assert_eq!(spec.replicas, Some(1));
        let rolling = spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref()).expect("rolling");
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
        let pod = pod(&children, Tier::Clock);
        let gates = pod.scheduling_gates.as_ref().expect("gates");
        assert_eq!(gates[0].name, crate::admission::GATE);
        let app = &pod.containers[0];
        assert_eq!(app.command.as_deref(), Some(&["python3".to_owned(), "-m".into(), "celery".into()][..]));
        assert_eq!(env(app, "TIDEPOOL_CONCURRENCY"), Some("1"));
        assert_eq!(env(app, "TIDEPOOL_DB_CONNECTIONS"), Some("2"));
        let init: Vec<_> = pod.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(init, ["pooler-config", "pgbouncer", "pgbouncer-exporter"]);
        let services = children.iter().filter(|c| matches!(c, Child::Service(_))).count();
        assert_eq!(services, 1, "the web tier's Service only");
        // Without a clock in the spec there is none.
        let (plan, children) =
            render(serde_json::json!({"database": {"secretRef": {"name": "db"}, "maxConnections": 100}}));
        assert!(plan.tier(Tier::Clock).is_none());
        assert!(!children.iter().any(|c| matches!(c, Child::Deployment(Tier::Clock, _))));
    }
}
