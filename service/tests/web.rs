//! `tidepool web` as a process, through a real PgBouncer in transaction mode
//! to a real PostgreSQL: concurrency, shedding, bad input, shutdown order,
//! and recovery from a pooler or database outage.

mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::{
    env, get, metric, raw, request, wait_for, wait_for_sleeps, wait_for_status, BusyCores, PgBouncer,
    Service, Stack, TestDb, Web,
};
use tidepool_testenv::node::PrivatePostgres;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The seed's web experiment, scaled: 10 concurrent one-second slow queries
/// on one process run together, not one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_queries_run_concurrently() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db, admin } =
        Stack::start(10, &[("TIDEPOOL_DB_POOL_SIZE", "10")]).await?;

    let started = Instant::now();
    let requests: Vec<_> =
        (0..10).map(|_| tokio::spawn(get_owned(web.url("/slow-query/?seconds=1")))).collect();
    wait_for_sleeps(&db, &admin, 10).await?;
    for request in requests {
        let response = request.await??;
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(response.json()?["message"], "Slow query completed");
    }
    let total = started.elapsed();
    // Concurrent, not serial: serial would take 10 s.
    assert!(total < Duration::from_secs(5), "10 concurrent 1 s queries took {total:?}");
    Ok(())
}

async fn get_owned(url: String) -> Result<support::HttpResponse> {
    get(&url).await
}

/// At start the pool's connections open before the process says it is
/// ready: the client connections and, behind them, as many server
/// connections as PgBouncer allows, so the first burst pays for none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_before_ready() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db, admin } =
        Stack::start(10, &[("TIDEPOOL_DB_POOL_SIZE", "10")]).await?;
    assert_eq!(get(&web.url("/readyz")).await?.status, 200);
    assert_eq!(db.server_connections(&admin).await?, 10);
    let metrics = get(&web.url("/metrics")).await?.body;
    for line in ["tidepool_db_pool_connections 10", "tidepool_db_pool_available_connections 10"] {
        ensure!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    ensure!(web.log().contains("open=10 server_connections=10"), "{}", web.log());

    // PgBouncer allows fewer server connections than the pool holds: the
    // hold ends once PgBouncer grants no more, not at the 60 s connect
    // timeout (the harness waits 30 s for the ready line).
    let Stack { web, bouncer: _bouncer, db, admin } =
        Stack::start(3, &[("TIDEPOOL_DB_POOL_SIZE", "12"), ("TIDEPOOL_DB_CONNECT_TIMEOUT", "60s")]).await?;
    ensure!(web.log().contains("open=12 server_connections=3"), "{}", web.log());
    assert_eq!(db.server_connections(&admin).await?, 3);
    assert_eq!(get(&web.url("/row/")).await?.status, 200);
    Ok(())
}

/// A pool smaller than the concurrency: the extra requests wait, then are
/// shed with 503 + Retry-After after the configured wait, while the process
/// keeps answering /healthz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_pool_are_shed_after_the_wait() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db: _db, admin: _admin } =
        Stack::start(2, &[("TIDEPOOL_DB_POOL_SIZE", "2"), ("TIDEPOOL_DB_POOL_WAIT", "500ms")]).await?;

    let requests: Vec<_> =
        (0..6).map(|_| tokio::spawn(get_owned(web.url("/slow-query/?seconds=2")))).collect();
    let mut statuses = Vec::new();
    let mut healthz_checks = 0;
    for request in requests {
        while !request.is_finished() {
            let health = get(&web.url("/healthz")).await?;
            assert_eq!(health.status, 200, "healthz must answer while the pool is exhausted");
            healthz_checks += 1;
        }
        let response = request.await??;
        if response.status == 503 {
            assert_eq!(response.headers["retry-after"], "1");
            assert!(
                response.json()?["error"].as_str().unwrap_or("").contains("no database connection"),
                "{}",
                response.body
            );
        }
        statuses.push(response.status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503, 503, 503, 503]);
    assert!(healthz_checks > 0);

    let metrics = get(&web.url("/metrics")).await?.body;
    assert!(metrics.contains(r#"tidepool_http_requests_shed_total{reason="db_pool_wait"} 4"#), "{metrics}");
    Ok(())
}

/// Past the in-flight limit a request is shed at once; probes are exempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_limit_are_shed_at_once() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db, admin } =
        Stack::start(4, &[("TIDEPOOL_MAX_IN_FLIGHT", "2")]).await?;

    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(get_owned(web.url("/slow-query/?seconds=2")))).collect();
    wait_for_sleeps(&db, &admin, 2).await?;
    let shed = get(&web.url("/row/")).await?;
    assert_eq!(shed.status, 503, "{}", shed.body);
    assert_eq!(shed.headers["retry-after"], "1");
    assert_eq!(get(&web.url("/healthz")).await?.status, 200);
    for request in slow {
        assert_eq!(request.await??.status, 200);
    }
    let metrics = get(&web.url("/metrics")).await?.body;
    assert!(
        metrics.contains(r#"tidepool_http_requests_shed_total{reason="in_flight_limit"} 1"#),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_returns_a_world_row_and_metrics_describe_it() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db: _db, admin: _admin } = Stack::start(2, &[]).await?;

    let row = get(&web.url("/row/")).await?;
    assert_eq!(row.status, 200);
    let row = row.json()?;
    let id = row["id"].as_i64().unwrap_or(0);
    let number = row["randomnumber"].as_i64().unwrap_or(0);
    assert!((1..=10_000).contains(&id), "{row}");
    assert!((1..=10_000).contains(&number), "{row}");

    let metrics = get(&web.url("/metrics")).await?;
    assert_eq!(metrics.status, 200);
    assert!(metrics.headers["content-type"].to_str()?.starts_with("text/plain; version=0.0.4"));
    for name in [
        r#"tidepool_http_requests_total{method="GET",route="/row/",status="200"} 1"#,
        "tidepool_http_request_duration_seconds_bucket",
        "tidepool_http_requests_in_flight 1",
        "tidepool_db_pool_max_size 20",
        // All opened at start, though PgBouncer lends them 2 server connections.
        "tidepool_db_pool_connections 20",
        "tidepool_db_pool_wait_seconds_count 1",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.body.contains(name), "missing {name}:\n{}", metrics.body);
    }
    Ok(())
}

/// Every kind of bad input gets a JSON error with the right status, and the
/// server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db: _db, admin: _admin } =
        Stack::start(2, &[("TIDEPOOL_MAX_BODY_BYTES", "1024")]).await?;

    for seconds in ["abc", "-1", "1000", "NaN", "inf", ""] {
        let response = get(&web.url(&format!("/slow-query/?seconds={seconds}"))).await?;
        assert_eq!(response.status, 400, "seconds={seconds}: {}", response.body);
        let message = response.json()?["error"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains("seconds must be a number from 0 to 60"), "{message}");
    }

    let missing = get(&web.url("/no-such-page")).await?;
    assert_eq!(missing.status, 404);
    assert!(missing.json()?["error"].as_str().unwrap_or_default().contains("/no-such-page"));

    let post = raw(web.addr(), b"POST /row/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").await?;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.to_ascii_lowercase().contains("allow: get"), "{post}");

    let declared_too_big =
        raw(web.addr(), b"GET /row/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n").await?;
    assert!(declared_too_big.starts_with("HTTP/1.1 413"), "{declared_too_big}");

    let mut chunked = b"GET /row/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'x'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed_too_big = raw(web.addr(), &chunked).await?;
    assert!(streamed_too_big.starts_with("HTTP/1.1 413"), "{streamed_too_big}");
    assert!(streamed_too_big.contains("larger than the limit of 1024 bytes"), "{streamed_too_big}");

    let garbage = raw(web.addr(), b"NOT HTTP AT ALL\r\n\r\n").await?;
    assert!(garbage.starts_with("HTTP/1.1 400") || garbage.is_empty(), "{garbage}");

    assert_eq!(get(&web.url("/healthz")).await?.status, 200, "the server must survive bad input");
    assert!(!web.log().contains("panicked"), "{}", web.log());
    Ok(())
}

/// Headers of a `POST /tasks/` declaring `length` bytes of body.
fn post_head(length: u64, extra: &str) -> Vec<u8> {
    format!("POST /tasks/ HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}Content-Length: {length}\r\n\r\n")
        .into_bytes()
}

/// Everything the server sends until it closes, bounded to 30 s.
async fn read_until_closed(stream: &mut TcpStream) -> Result<String> {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .context("the server neither answered nor closed within 30 s")??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A body over the limit is answered with 413, never with a reset: the
/// server drains what the client still sends (a lingering close), within a
/// bound of time and bytes past which the client is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_their_413_not_a_reset() -> Result<()> {
    let linger = Duration::from_secs(2);
    let Stack { web, bouncer: _bouncer, db: _db, admin: _admin } =
        Stack::start(2, &[("TIDEPOOL_LINGERING_CLOSE_TIMEOUT", "2s")]).await?;
    let body = vec![b'x'; 4 * 1024 * 1024];

    // A client that writes the whole 4 MiB body (four times the 1 MiB
    // limit) before it reads anything, while every core is busy.
    {
        let _busy = BusyCores::start();
        for attempt in 1..=200 {
            let mut stream = TcpStream::connect(web.addr()).await?;
            stream.write_all(&post_head(body.len() as u64, "")).await?;
            stream.write_all(&body).await.with_context(|| format!("attempt {attempt}: writing the body"))?;
            let answer = read_until_closed(&mut stream).await?;
            ensure!(answer.starts_with("HTTP/1.1 413"), "attempt {attempt}: {answer:?}");
            ensure!(answer.contains("larger than the limit of 1048576 bytes"), "attempt {attempt}: {answer}");
        }
    }

    // With Expect: 100-continue the 413 comes instead of the 100, and the
    // body is never asked for.
    let mut stream = TcpStream::connect(web.addr()).await?;
    stream.write_all(&post_head(body.len() as u64, "Expect: 100-continue\r\n")).await?;
    let answer = read_until_closed(&mut stream).await?;
    ensure!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    ensure!(!answer.contains("100 Continue"), "{answer:?}");

    // A client that keeps sending is cut off once the cap (16 MiB by
    // default) is drained; what it got through is the cap plus the socket
    // buffers of both ends.
    let mut stream = TcpStream::connect(web.addr()).await?;
    stream.write_all(&post_head(1 << 30, "")).await?;
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0u64;
    let cut_off = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.write_all(&chunk)).await {
            Err(_) => bail!("a write hung for 30 s after {sent} bytes: the server neither read nor closed"),
            Ok(Err(e)) => break e,
            Ok(Ok(())) => sent += chunk.len() as u64,
        }
        ensure!(sent < 1 << 30, "sent the whole 1 GiB body without being cut off");
    };
    ensure!(sent >= 16 << 20, "cut off after {sent} bytes, before the cap: {cut_off}");
    ensure!(sent <= 64 << 20, "cut off only after {sent} bytes: {cut_off}");

    // A client that trickles is cut off once the linger time is up.
    let mut stream = TcpStream::connect(web.addr()).await?;
    stream.write_all(&post_head(body.len() as u64, "")).await?;
    let started = Instant::now();
    let mut trickled = 0;
    while stream.write_all(b"x").await.is_ok() {
        trickled += 1;
        ensure!(trickled < 600, "still connected after 600 bytes, one every 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(started.elapsed() >= linger, "cut off after {:?}, before the linger time", started.elapsed());

    assert_eq!(get(&web.url("/healthz")).await?.status, 200);
    Ok(())
}

/// SIGTERM: /readyz turns 503 first while requests are still served, each
/// answer closing its connection (keep-alive clients move to another pod);
/// the request in flight completes; after the drain delay new connections
/// are refused; the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_order() -> Result<()> {
    let Stack { mut web, bouncer: _bouncer, db, admin } =
        Stack::start(2, &[("TIDEPOOL_DRAIN_DELAY", "1500ms"), ("TIDEPOOL_SHUTDOWN_TIMEOUT", "10s")]).await?;
    let before = get(&web.url("/readyz")).await?;
    assert_eq!(before.status, 200);
    assert!(!before.headers.contains_key(http::header::CONNECTION), "{:?}", before.headers);

    let in_flight = tokio::spawn(get_owned(web.url("/slow-query/?seconds=3")));
    wait_for_sleeps(&db, &admin, 1).await?;
    web.signal(libc::SIGTERM)?;

    let readyz = wait_for_status(&web.url("/readyz"), 503, Duration::from_secs(2)).await?;
    assert_eq!(readyz.json()?["status"], "draining");
    let healthz = get(&web.url("/healthz")).await?;
    assert_eq!(healthz.status, 200, "still serving during the drain delay");
    assert_eq!(healthz.headers.get(http::header::CONNECTION).map(|v| v.as_bytes()), Some(&b"close"[..]));
    assert!(!in_flight.is_finished());

    let port = web.port;
    wait_for("new connections to be refused", Duration::from_secs(5), || async move {
        (!support::port_accepts(port)).then_some(())
    })
    .await?;
    let response = in_flight.await??;
    assert_eq!(response.status, 200, "the request in flight at SIGTERM completes: {}", response.body);
    let status = web.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(0), "{}", web.log());
    Ok(())
}

/// A request still running at the shutdown deadline makes the exit code 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_is_reported_in_the_exit_code() -> Result<()> {
    let Stack { mut web, bouncer: _bouncer, db, admin } =
        Stack::start(2, &[("TIDEPOOL_DRAIN_DELAY", "0s"), ("TIDEPOOL_SHUTDOWN_TIMEOUT", "500ms")]).await?;
    let in_flight = tokio::spawn(get_owned(web.url("/slow-query/?seconds=10")));
    wait_for_sleeps(&db, &admin, 1).await?;
    web.signal(libc::SIGTERM)?;
    let status = web.wait_exit(Duration::from_secs(5)).await?;
    assert_eq!(status.code(), Some(3), "{}", web.log());
    assert!(in_flight.await?.is_err(), "the cut-off request cannot have succeeded");
    Ok(())
}

/// A client that goes away mid-query must not leave its query running on
/// the server, holding one of PgBouncer's few server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_cancel_their_query() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db, admin } = Stack::start(2, &[]).await?;

    let abandoned = support::start_request(web.addr(), "/slow-query/?seconds=30").await?;
    wait_for_sleeps(&db, &admin, 1).await?;
    drop(abandoned);
    wait_for_sleeps(&db, &admin, 0).await?;
    assert_eq!(get(&web.url("/row/")).await?.status, 200);
    Ok(())
}

/// A query that outlives its budget is cancelled and answered with 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_past_their_timeout_get_504() -> Result<()> {
    let Stack { web, bouncer: _bouncer, db, admin } =
        Stack::start(2, &[("TIDEPOOL_QUERY_TIMEOUT", "300ms")]).await?;
    // Take both server connections, so the next query waits in PgBouncer.
    let holders: Vec<_> =
        (0..2).map(|_| tokio::spawn(get_owned(web.url("/slow-query/?seconds=3")))).collect();
    wait_for_sleeps(&db, &admin, 2).await?;
    let late = get(&web.url("/row/")).await?;
    assert_eq!(late.status, 504, "{}", late.body);
    assert!(late.json()?["error"].as_str().unwrap_or_default().contains("did not answer within"));
    assert!(
        holders.iter().all(|h| !h.is_finished()),
        "the 504 must come at the query timeout, while the holders still run"
    );
    for holder in holders {
        assert_eq!(holder.await??.status, 200);
    }
    Ok(())
}

/// /readyz fails while PgBouncer is down and recovers by itself; requests
/// fail fast meanwhile instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_pooler() -> Result<()> {
    let db = TestDb::create().await?;
    let mut bouncer = PgBouncer::start(&db, 2).await?;
    let web = Web::start(
        &bouncer.url(),
        &[("TIDEPOOL_READINESS_TIMEOUT", "1s"), ("TIDEPOOL_DB_CONNECT_TIMEOUT", "1s")],
    )
    .await?;
    assert_eq!(get(&web.url("/readyz")).await?.status, 200);

    bouncer.stop();
    let down = get(&web.url("/readyz")).await?;
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.json()?["status"], "unavailable");
    let row = get(&web.url("/row/")).await?;
    assert_eq!(row.status, 503, "{}", row.body);
    assert!(row.json()?["error"].as_str().unwrap_or_default().contains("unavailable"), "{}", row.body);

    bouncer.restart().await?;
    wait_for_status(&web.url("/readyz"), 200, Duration::from_secs(10)).await?;
    wait_for_status(&web.url("/row/"), 200, Duration::from_secs(10)).await?;
    Ok(())
}

/// A pod whose every connection is busy is busy, not broken: /readyz stays
/// 200 (`busy`) while the pool and PgBouncer's server connections are all
/// taken by queries running longer than the readiness timeout (a probe
/// that queried through PgBouncer would wait behind them and fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_survives_a_saturated_pool() -> Result<()> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, 2).await?;
    let admin = db.admin().await?;
    let web =
        Web::start(&bouncer.url(), &[("TIDEPOOL_DB_POOL_SIZE", "2"), ("TIDEPOOL_READINESS_TIMEOUT", "1s")])
            .await?;
    assert_eq!(get(&web.url("/readyz")).await?.json()?["status"], "ready");

    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(get_owned(web.url("/slow-query/?seconds=4")))).collect();
    wait_for_sleeps(&db, &admin, 2).await?;
    let busy = get(&web.url("/readyz")).await?;
    assert_eq!(busy.status, 200, "{}", busy.body);
    assert_eq!(busy.json()?["status"], "busy");
    for request in slow {
        assert_eq!(request.await??.status, 200);
    }
    assert_eq!(get(&web.url("/readyz")).await?.json()?["status"], "ready");
    Ok(())
}

/// /metrics carries the sidecar's own figures under pgbouncer_exporter's
/// names, read from its admin console as the stats user: with the app's
/// pool of 2 behind a PgBouncer of 1, one slow query runs and the other
/// waits in PgBouncer, and the series say so; with PgBouncer gone,
/// `pgbouncer_up` is 0 and the app's own series are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_pgbouncers_figures() -> Result<()> {
    let db = TestDb::create().await?;
    let mut bouncer = PgBouncer::start_with_stats_user(&db, 1).await?;
    let password_file = bouncer.stats_password_file();
    let password_file = password_file.to_str().context("a UTF-8 path")?;
    let web = Web::start(
        &bouncer.url(),
        &[
            ("TIDEPOOL_DB_POOL_SIZE", "2"),
            ("TIDEPOOL_POOLER_STATS_URL", &bouncer.stats_url()),
            ("TIDEPOOL_POOLER_STATS_PASSWORD_FILE", password_file),
        ],
    )
    .await?;
    let pool = format!("{{database=\"{0}\",user=\"{1}\"}}", db.name, env().app_user);
    let at_rest = get(&web.url("/metrics")).await?.body;
    assert_eq!(metric(&at_rest, "pgbouncer_up"), Some(1.0), "{at_rest}");
    assert_eq!(metric(&at_rest, &format!("pgbouncer_pools_client_waiting_connections{pool}")), Some(0.0));
    assert_eq!(
        metric(&at_rest, &format!("pgbouncer_databases_max_connections{{name=\"{0}\",", db.name)),
        Some(1.0),
        "max_db_connections is the pod's share: {at_rest}"
    );
    assert_eq!(metric(&at_rest, "pgbouncer_config_max_client_connections"), Some(1000.0));
    assert!(at_rest.contains("pgbouncer_version_info{version=\"PgBouncer 1."), "{at_rest}");
    assert!(at_rest.contains("tidepool_db_pool_max_size"), "the app's own series come first: {at_rest}");

    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(get_owned(web.url("/slow-query/?seconds=3")))).collect();
    let busy = wait_for("a client waiting in PgBouncer", Duration::from_secs(10), || async {
        let body = get(&web.url("/metrics")).await.ok()?.body;
        (metric(&body, &format!("pgbouncer_pools_client_waiting_connections{pool}")) == Some(1.0))
            .then_some(body)
    })
    .await?;
    assert_eq!(
        metric(&busy, &format!("pgbouncer_pools_client_active_connections{pool}")),
        Some(1.0),
        "{busy}"
    );
    assert_eq!(
        metric(&busy, &format!("pgbouncer_pools_server_active_connections{pool}")),
        Some(1.0),
        "{busy}"
    );
    for request in slow {
        assert_eq!(request.await??.status, 200);
    }
    let after = get(&web.url("/metrics")).await?.body;
    let waited = metric(
        &after,
        &format!("pgbouncer_stats_totals_client_wait_seconds_total{{database=\"{}\"}}", db.name),
    );
    assert!(waited.is_some_and(|w| w >= 2.0), "the second query waited ~3 s in PgBouncer: {waited:?}");
    let queries =
        metric(&after, &format!("pgbouncer_stats_totals_queries_pooled_total{{database=\"{}\"}}", db.name));
    assert!(queries.is_some_and(|q| q >= 2.0), "{queries:?}");

    bouncer.stop();
    let gone = get(&web.url("/metrics")).await?;
    assert_eq!(gone.status, 200);
    assert_eq!(metric(&gone.body, "pgbouncer_up"), Some(0.0), "{}", gone.body);
    assert!(!gone.body.contains("pgbouncer_pools_"), "{}", gone.body);
    assert!(gone.body.contains("tidepool_db_pool_max_size"), "{}", gone.body);
    Ok(())
}

/// `tidepool pooler-exporter`, the sidecar of a pod whose app is not
/// Tidepool's: the same `pgbouncer_*` series as the app's `/metrics`, and
/// nothing of Tidepool's own; `pgbouncer_up` 0 while PgBouncer is gone; GET
/// only; SIGTERM ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_serves_pgbouncers_figures_alone() -> Result<()> {
    let db = TestDb::create().await?;
    let mut bouncer = PgBouncer::start_with_stats_user(&db, 3).await?;
    let mut exporter = Service::exporter(&bouncer).await?;
    let body = get(&exporter.url("/metrics")).await?.body;
    assert_eq!(metric(&body, "pgbouncer_up"), Some(1.0), "{body}");
    assert_eq!(
        metric(&body, &format!("pgbouncer_databases_max_connections{{name=\"{0}\",", db.name)),
        Some(3.0),
        "{body}"
    );
    assert!(body.contains("pgbouncer_pools_client_active_connections{"), "{body}");
    assert!(!body.contains("tidepool_"), "only PgBouncer's series: {body}");
    let posted = request(http::Method::POST, &exporter.url("/metrics"), "").await?;
    assert_eq!(posted.status, 405);
    assert_eq!(get(&exporter.url("/nothing")).await?.status, 404);

    bouncer.stop();
    let gone = get(&exporter.url("/metrics")).await?;
    assert_eq!((gone.status, metric(&gone.body, "pgbouncer_up")), (200, Some(0.0)), "{}", gone.body);
    exporter.signal(libc::SIGTERM)?;
    let status = exporter.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "{status:?}: {}", exporter.log());
    Ok(())
}

/// /readyz fails while PostgreSQL is down (PgBouncer up) and recovers by
/// itself; no request hangs past its timeout meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() -> Result<()> {
    let postgres = PrivatePostgres::on_loopback("readiness", 100)?;
    let db = TestDb::create_on(postgres.postgres.port).await?;
    // PgBouncer would hold a query for a server far longer than the test
    // client waits (90 s): only Tidepool's own timeouts can answer in time.
    let bouncer = PgBouncer::start_with_query_wait(&db, 2, Duration::from_secs(600)).await?;
    let web =
        Web::start(&bouncer.url(), &[("TIDEPOOL_READINESS_TIMEOUT", "1s"), ("TIDEPOOL_QUERY_TIMEOUT", "2s")])
            .await?;
    assert_eq!(get(&web.url("/readyz")).await?.status, 200);
    assert_eq!(get(&web.url("/row/")).await?.status, 200);

    postgres.stop()?;
    let down = get(&web.url("/readyz")).await?;
    assert_eq!(down.status, 503, "{}", down.body);
    let row = get(&web.url("/row/")).await?;
    ensure!(matches!(row.status, 503 | 504), "expected 503 or 504, got {}: {}", row.status, row.body);

    postgres.start_again()?;
    wait_for_status(&web.url("/readyz"), 200, Duration::from_secs(20)).await?;
    wait_for_status(&web.url("/row/"), 200, Duration::from_secs(20)).await?;
    Ok(())
}

/// `--help` explains the knobs and never echoes a secret from the
/// environment; a bad URL is reported without quoting it.
#[test]
fn help_and_config_errors_never_print_secrets() -> Result<()> {
    let secret_url = "postgres://app:hunter2-secret@127.0.0.1:1/app";
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["web", "--help"])
        .env("DATABASE_URL", secret_url)
        .output()?;
    let help_text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success());
    for knob in [
        "DATABASE_URL",
        "TIDEPOOL_DB_POOL_SIZE",
        "TIDEPOOL_DRAIN_DELAY",
        "TIDEPOOL_MAX_IN_FLIGHT",
        "[default: 5s]",
    ] {
        assert!(help_text.contains(knob), "help should mention {knob}:\n{help_text}");
    }
    assert!(!help_text.contains("hunter2"), "{help_text}");

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("web")
        .env("DATABASE_URL", "postgres://app:hunter2-secret@127.0.0.1:notaport/app")
        .output()?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr.contains("DATABASE_URL is not a valid PostgreSQL connection URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn a_busy_port_is_a_clear_error() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("web")
        .env("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/app")
        .env("TIDEPOOL_LISTEN", format!("127.0.0.1:{port}"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains(&format!("port {port}")), "{stderr}");
    Ok(())
}
