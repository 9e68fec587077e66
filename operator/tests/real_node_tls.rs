//! `database.tls` on the real node, against a PostgreSQL that takes TLS
//! connections only (`hostssl` lines only), with a CA and a certificate for
//! the veth's host end made for the test: `verify-full` goes Ready with
//! every backend of the app's role encrypted (the pods' PgBouncer, the
//! worker's LISTEN session, the operator's queue scaler); a CA that did not
//! issue the server's certificate fails the migration with the host and
//! the reason in status and an Event.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::condition;
use common::shop::{failures_at, record_figures, Database, Load, Setup, Shop};
use serde_json::json;
use tidepool_testenv::node::{Postgres, PrivatePostgres, TestCertificates};
use tidepool_testenv::wait_for;

/// A Secret with `ca.crt`, and a key beside it that no pod may get (as
/// CloudNativePG's `<cluster>-ca` has).
fn ca_secret(name: &str, ca: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "stringData": {"ca.crt": ca, "ca.key": "not for pods"}})
    .to_string()
}

#[test]
fn verify_full_on_a_tls_only_postgresql_and_a_wrong_ca_named_in_status() -> Result<()> {
    // The pods reach it as `shop-db` (a Service to the host end, as a
    // CloudNativePG Secret names `<cluster>-rw`), the scaler on loopback.
    let server = TestCertificates::issue("server", &["shop-db", "127.0.0.1"])?;
    let stranger = TestCertificates::issue("stranger", &["127.0.0.1"])?;
    let private = PrivatePostgres::tls_only_for_node("tls", 100, &server.dir)?;
    let pg = &private.postgres;
    let beside = format!(
        "{}\n---\n{}",
        ca_secret("pg-ca", &server.ca_pem()?),
        ca_secret("other-ca", &stranger.ca_pem()?)
    );
    let spec = json!({
        "database": {"maxConnections": 100, "reservedConnections": 10,
            "tls": {"mode": "verify-full", "caSecretRef": {"name": "pg-ca"}}},
        "web": {"replicas": 1},
        "worker": {"replicas": 1, "listen": true,
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "pollingIntervalSeconds": 1,
                "secretRef": {"name": "shop-scaler"}}},
    });
    let shop = Shop::deploy_with(
        pg,
        "tls",
        spec,
        Setup { beside: &beside, database: Database::ServiceName, ..Setup::default() },
    )?;
    let (kube, ns) = (shop.kube, shop.ns.name.clone());

    let tidepool = shop.tidepool()?;
    let (status, reason, _) = condition(&tidepool, "DatabaseTLSVerified").context("the TLS condition")?;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "VerifyFull"));
    // The queue scaler reads over its own connection.
    wait_for("the queue scaler's reading", Duration::from_secs(60), || {
        let tidepool = shop.tidepool()?;
        Ok(condition(&tidepool, "WorkerAutoscaling").filter(|(status, _, _)| status == "True"))
    })
    .with_context(|| {
        format!("{:?}", shop.tidepool().ok().and_then(|t| condition(&t, "WorkerAutoscaling")))
    })?;

    // Every backend of the app's roles: PgBouncer's of both pods, the
    // LISTEN session, the scaler's (a role of its own); each over TLS
    // (read as a superuser).
    let backends = |filter: &str| {
        pg.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.usename IN ('{0}', '{0}_scaler') AND {filter}",
                shop.db.name
            ),
        )
        .and_then(|n| n.parse::<u32>().context("a count"))
    };
    let listening = wait_for("the LISTEN session and the scaler", Duration::from_secs(60), || {
        let listen = backends("a.query ILIKE 'LISTEN%'")?;
        let scaler = backends("a.application_name = 'tidepool-operator'")?;
        Ok((listen >= 1 && scaler >= 1).then_some((listen, scaler)))
    })?;
    let (all, encrypted) = (backends("true")?, backends("s.ssl")?);
    assert!(all >= 3, "PgBouncer's, the LISTEN session's and the scaler's backends: {all} ({listening:?})");
    assert_eq!(encrypted, all, "every backend of the role is encrypted");
    let (code, body) = shop.node.curl(&[&shop.web_url("/row/")?])?;
    assert_eq!(code, 200, "{body}");

    // No pod mounts the key that sits beside the CA.
    let pods = kube.get_json(&["-n", &ns, "pods", "-o", "json"])?;
    let volumes: Vec<_> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["spec"]["volumes"].as_array().cloned().unwrap_or_default())
        .filter(|v| v["secret"]["secretName"] == "pg-ca")
        .collect();
    assert!(!volumes.is_empty());
    for volume in &volumes {
        assert_eq!(volume["secret"]["items"], json!([{"key": "ca.crt", "path": "ca.crt"}]), "{volume}");
    }

    rotate_passwords_under_load(&shop, pg)?;

    // A CA that did not issue the server's certificate: the new migration
    // Job fails, and status and an Event say where and why; the pods stay.
    let patch = json!({"spec": {"database": {"tls": {"caSecretRef": {"name": "other-ca"}}}}});
    kube.kubectl(&["patch", "tidepool/shop", "-n", &ns, "--type", "merge", "-p", &patch.to_string()], None)?;
    let message = wait_for("the migration to fail on the certificate", Duration::from_secs(300), || {
        let tidepool = shop.tidepool()?;
        Ok(condition(&tidepool, "Degraded")
            .filter(|(status, reason, _)| status == "True" && reason == "MigrationFailed")
            .map(|(_, _, message)| message))
    })?;
    assert!(message.contains("UnknownIssuer"), "the reason: {message}");
    assert!(message.contains("shop-db"), "the host: {message}");
    let events = kube.get_json(&["-n", &ns, "events", "--field-selector", "reason=MigrationFailed"])?;
    let notes: Vec<String> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["note"].as_str().or(e["message"].as_str()).map(str::to_owned))
        .collect();
    assert!(notes.iter().any(|n| n.contains("UnknownIssuer")), "{notes:?}");
    let tidepool = shop.tidepool()?;
    assert_eq!(tidepool["status"]["web"]["readyReplicas"], 1, "the pods stay as they were");

    // Plaintext: the server refuses it, and status says so in its words.
    let patch = json!({"spec": {"database": {"tls": {"mode": "disable", "caSecretRef": null}}}});
    kube.kubectl(&["patch", "tidepool/shop", "-n", &ns, "--type", "merge", "-p", &patch.to_string()], None)?;
    let message = wait_for("the migration to be refused in plaintext", Duration::from_secs(300), || {
        let tidepool = shop.tidepool()?;
        Ok(condition(&tidepool, "Degraded")
            .filter(|(status, reason, message)| {
                status == "True" && reason == "MigrationFailed" && message.contains("no encryption")
            })
            .map(|(_, _, message)| message))
    })?;
    assert!(message.contains("no pg_hba.conf entry"), "{message}");
    let tidepool = shop.tidepool()?;
    let (status, reason, _) = condition(&tidepool, "DatabaseTLSVerified").context("the TLS condition")?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Plaintext"));
    Ok(())
}

/// Both roles' passwords rotated under 10 clients, as a database's owner
/// does it: PostgreSQL first (`ALTER ROLE`, one password per role), then
/// the Secrets. The operator rolls the pods (their credentials fingerprint
/// changed), each new one Ready once its PgBouncer logged in with the new
/// password, and the queue scaler connects again. Afterwards every backend
/// of both roles logged in after the change; a request may fail only in
/// the window between the change and the roll's end (an old pod's PgBouncer
/// opening a server connection with the old password), and the figures say
/// how many did.
fn rotate_passwords_under_load(shop: &Shop, pg: &Postgres) -> Result<()> {
    let (kube, ns) = (shop.kube, shop.ns.name.as_str());
    let roles = [(shop.db.name.clone(), "shop-app"), (format!("{}_scaler", shop.db.name), "shop-scaler")];
    let fingerprints = |tier: &str| -> Result<Vec<String>> {
        Ok(shop
            .pods(tier)?
            .iter()
            .map(|p| {
                p["metadata"]["annotations"]["tidepool.dev/credentials"].as_str().unwrap_or("").to_owned()
            })
            .collect())
    };
    let before = fingerprints("web")?;
    let generation = shop.tidepool()?["metadata"]["generation"].as_i64().unwrap_or(1);
    let load = Load::steady_timed(&shop.node, &shop.web_url("/row/")?, 10, "10s")?;
    let started = Instant::now();
    wait_for("the load to be answered", Duration::from_secs(30), || {
        let (code, _) = shop.node.curl(&[&shop.web_url("/row/")?])?;
        Ok((code == 200).then_some(()))
    })?;

    let changing = started.elapsed();
    for (role, _) in &roles {
        pg.psql("postgres", &format!("ALTER ROLE {role} PASSWORD '{role}-rotated'"))?;
    }
    // The database's clock, after the change: a backend that started
    // later logged in with the new password.
    let changed_at = pg.psql("postgres", "SELECT now()::text")?;
    for (role, secret) in &roles {
        let patch = json!({"stringData": {"password": format!("{role}-rotated")}});
        kube.kubectl(
            &["patch", "secret", secret, "-n", ns, "--type", "merge", "-p", &patch.to_string()],
            None,
        )?;
    }
    let stale = |filter: &str| -> Result<(u32, u32)> {
        let counts = pg.psql(
            "postgres",
            &format!(
                "SELECT count(*) FILTER (WHERE backend_start < '{changed_at}'), count(*) \
                 FROM pg_stat_activity WHERE usename IN ('{}', '{}') AND {filter}",
                roles[0].0, roles[1].0
            ),
        )?;
        let (old, all) = counts.split_once('|').context("two counts")?;
        Ok((old.parse()?, all.parse()?))
    };
    wait_for("every pod rolled and every backend logged in anew", Duration::from_secs(300), || {
        let rolled = ["web", "worker"].iter().try_fold(true, |all, tier| -> Result<bool> {
            let tier = fingerprints(tier)?;
            Ok(all && !tier.is_empty() && tier.iter().all(|f| f.len() == 32 && !before.contains(f)))
        })?;
        let (old, all) = stale("true")?;
        let scaler = stale("application_name = 'tidepool-operator'")?;
        Ok((rolled && old == 0 && all >= 3 && scaler == (0, 1)).then_some(()))
    })
    .with_context(|| format!("backends: {:?}; {}", stale("true").ok(), shop.describe()))?;
    let rolled = started.elapsed();
    shop.wait_ready(generation)?;
    let report = load.finish()?;

    // A failure is an old pod's, inside the window (give the loadgen's own
    // start and a request's timeout their due).
    let window = changing.as_secs_f64() - 1.0..rolled.as_secs_f64() + 10.0;
    let failures = failures_at(&report);
    assert!(failures.iter().all(|at| window.contains(at)), "failures outside {window:?}: {failures:?}");
    assert!(report["succeeded"].as_i64().unwrap_or(0) > 0, "{report}");
    let first_login = pg.psql(
        "postgres",
        &format!(
            "SELECT extract(epoch FROM min(backend_start) - '{changed_at}'::timestamptz) \
             FROM pg_stat_activity WHERE usename = '{}' AND backend_start >= '{changed_at}'",
            roles[0].0
        ),
    )?;
    record_figures(
        "password_rotation",
        json!({
            "requests": report["requests"], "failed": failures.len(),
            "first_login_seconds": first_login.parse::<f64>().ok(),
            "rolled_seconds": (rolled - changing).as_secs_f64(),
            "server_version": pg.psql("postgres", "SHOW server_version")?,
        }),
    )?;
    Ok(())
}
