//! `database.tls` on the real node, against a PostgreSQL that takes TLS
//! connections only (`hostssl` lines only), with a CA and a certificate for
//! the veth's host end made for the test: `verify-full` goes Ready with
//! every backend of the app's role encrypted (the pods' PgBouncer, the
//! worker's LISTEN session, the operator's queue scaler); a CA that did not
//! issue the server's certificate fails the migration with the host and
//! the reason in status and an Event.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::condition;
use common::shop::{Database, Setup, Shop};
use serde_json::json;
use tidepool_testenv::node::{PrivatePostgres, TestCertificates};
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
