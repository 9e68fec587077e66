//! `tidepool-loadgen`: the clients of Tidepool's demo and benchmarks, for
//! what ab and wrk cannot do.
//!
//! - `burst`: opens N connections first, then starts all N requests at the
//!   same instant, and reports when the last one finished. Debian's ab 2.3
//!   opens one connection, waits for its response and only then opens the
//!   rest, so against a 5 s endpoint its total is about 10 s whatever the
//!   server does; `burst` measures the server instead.
//! - `idle`: opens N keep-alive connections, makes one request on each, then
//!   holds them open, so the server's memory per idle connection can be read.
//! - `steady`: N clients, each sending one request (a GET, or a JSON POST
//!   with `--json-body`) after another on a
//!   keep-alive connection (a new one after `Connection: close` or an
//!   error) until a stop file appears, counting every failure: the load
//!   a rolling update or a fault must not disturb. Like a browser, it
//!   sends a request again, once, on a new connection when the server
//!   closed the kept-alive one before answering it (counted as `retried`).
//! - `rate`: requests at a fixed total rate over N keep-alive connections
//!   for a fixed time (wrk only saturates; Debian has no wrk2), so two
//!   servers' CPU time per request is compared at the same load rather
//!   than at whatever load each one reaches.
//! - `queue-loop`: the limit a worker is measured against: the queue's own
//!   claim and completion statements ([`tidepool::queue::sql`]), back to
//!   back on one connection per loop, with nothing around them.
//!
//! - `periodic`: the periodic tasks' benchmarks ([`periodic`]): the delay
//!   from an occurrence to its job's start, what schedule checks cost
//!   PostgreSQL, and no-op jobs/s beside schedules.
//!
//! All talk to loopback only, or to the test cluster's own private ranges
//! named with `--cluster-cidr` (its pods and Services, reached from inside
//! the real node's network namespace); they are bounded in count and time,
//! and print one JSON object on standard output.

mod inprocess;
mod periodic;
mod workflow;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tidepool::queue::sql;
use tokio::net::TcpStream;
use tokio::sync::Barrier;

/// Upper bound of connections or requests one run may open.
const MAX_CONNECTIONS: usize = 20_000;
/// Largest body `steady --json-body` sends.
const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Parser)]
#[command(name = "tidepool-loadgen", about = "Loopback load generator for Tidepool's demo and benchmarks")]
struct Cli {
    /// A private range of the test cluster (pods, Services, the node's
    /// veth) that may be targeted besides loopback; repeatable.
    #[arg(long = "cluster-cidr", global = true, value_parser = Cidr::parse)]
    cluster_cidrs: Vec<Cidr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect N clients, then start all N requests at once.
    Burst {
        /// Target, e.g. http://127.0.0.1:8000/slow-query/?seconds=1 (loopback only).
        #[arg(long)]
        url: String,
        /// Number of requests, each on its own connection.
        #[arg(long, default_value_t = 10)]
        requests: usize,
        /// Longest the whole run may take.
        #[arg(long, default_value = "300s", value_parser = parse_duration)]
        timeout: Duration,
        /// Also write each request's completion time (seconds after the
        /// start) and status, one per line, to this file.
        #[arg(long)]
        timeline: Option<PathBuf>,
    },
    /// N clients sending requests back to back until the stop file appears.
    Steady {
        /// Target, e.g. http://127.0.0.1:8000/row/ (loopback or --cluster-cidr).
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 20)]
        clients: usize,
        /// The run ends when this file exists (or after --timeout).
        #[arg(long)]
        stop_file: PathBuf,
        /// Longest the whole run may take.
        #[arg(long, default_value = "600s", value_parser = parse_duration)]
        timeout: Duration,
        /// A request not answered within this counts as failed.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        request_timeout: Duration,
        /// Also write each request's completion time (seconds after the
        /// start), latency and status, one per line, to this file.
        #[arg(long)]
        timeline: Option<PathBuf>,
        /// POST this JSON with every request instead of a GET (at most 1 MiB).
        #[arg(long)]
        json_body: Option<String>,
    },
    /// Requests at a fixed rate over N keep-alive connections for a fixed time.
    Rate {
        /// Target, e.g. http://127.0.0.1:8000/row/ (loopback or --cluster-cidr).
        #[arg(long)]
        url: String,
        /// Requests per second, all connections together.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200_000))]
        rate: u32,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// How long to send (at most an hour).
        #[arg(long, value_parser = parse_duration)]
        duration: Duration,
        /// A request not answered within this counts as failed.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        request_timeout: Duration,
    },
    /// Claim and complete every due job with the queue's own SQL and nothing else.
    QueueLoop {
        /// The pooler (or database), loopback only. Never printed.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, default_value = "default")]
        queue: String,
        /// Connections, each looping claim then complete.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        loops: u32,
        /// Jobs per claim (and per completion).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch_size: i64,
        /// Longest the whole run may take.
        #[arg(long, default_value = "600s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The periodic tasks' benchmarks: workers of the runtime in this
    /// process with schedules (docs/benchmarks.md, section 21).
    Periodic(periodic::Args),
    /// The benchmarks of rate limits, workflows and the worker's plain
    /// path (docs/benchmarks.md, section 22).
    Workflow(workflow::Args),
    /// Open N keep-alive connections, one request each, then hold them.
    Idle {
        /// Target, e.g. http://127.0.0.1:8000/healthz (loopback only).
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// How long to hold the connections once all are open.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        hold: Duration,
        /// Written (with the number of open connections) once all are open.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Longest to open all connections.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        connect_timeout: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

/// An IPv4 range in private address space (RFC 1918) that load may be
/// sent to besides loopback.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

/// RFC 1918's private address space.
const PRIVATE_RANGES: [(Ipv4Addr, u8); 3] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
];

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) =
            text.split_once('/').ok_or_else(|| format!("{text:?}: expected a.b.c.d/n"))?;
        let address: Ipv4Addr = address.parse().map_err(|e| format!("{text:?}: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|e| format!("{text:?}: {e}"))?;
        if prefix > 32 {
            return Err(format!("{text:?}: the prefix length is at most 32"));
        }
        let cidr = Cidr { network: Ipv4Addr::from(u32::from(address) & Self::mask(prefix)), prefix };
        let private = PRIVATE_RANGES.iter().any(|(net, len)| {
            prefix >= *len && u32::from(cidr.network) & Self::mask(*len) == u32::from(*net)
        });
        if !private {
            return Err(format!("{text:?} is not inside a private range (10/8, 172.16/12, 192.168/16)"));
        }
        Ok(cidr)
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(v4) if u32::from(v4) & Self::mask(self.prefix) == u32::from(self.network))
    }
}

/// A parsed URL of a loopback or test-cluster address.
struct Target {
    addr: SocketAddr,
    path_and_query: String,
    host: String,
    /// Each request's body (then sent as a JSON `POST`); none for a `GET`.
    body: Option<Bytes>,
}

impl Target {
    fn parse(url: &str, cluster: &[Cidr]) -> Result<Self> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("only http:// URLs are supported");
        }
        let host = uri.host().context("the URL has no host")?;
        let ip: IpAddr = match host {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            other => other
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .context("the host must be an IP address or localhost")?,
        };
        if !ip.is_loopback() && !cluster.iter().any(|c| c.contains(ip)) {
            bail!("refusing to send load to {ip}: only loopback addresses and --cluster-cidr ranges are allowed");
        }
        let port = uri.port_u16().unwrap_or(80);
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            path_and_query: uri.path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned()),
            host: format!("{host}:{port}"),
            body: None,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let stream =
            TcpStream::connect(self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    async fn get(&self, sender: &mut SendRequest<Full<Bytes>>) -> Result<u16> {
        Ok(self.get_keep_alive(sender).await?.0)
    }

    /// The status, and whether the server keeps the connection open.
    async fn get_keep_alive(&self, sender: &mut SendRequest<Full<Bytes>>) -> Result<(u16, bool)> {
        sender.ready().await?;
        let request = match &self.body {
            None => {
                Request::get(self.path_and_query.as_str()).header("host", &self.host).body(Full::default())?
            }
            Some(body) => Request::post(self.path_and_query.as_str())
                .header("host", &self.host)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))?,
        };
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let close = response
            .headers()
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        response.into_body().collect().await?;
        Ok((status, !close))
    }
}

#[derive(Serialize)]
struct BurstReport {
    requests: usize,
    succeeded: usize,
    failed: usize,
    statuses: BTreeMap<String, usize>,
    connect_seconds: f64,
    total_seconds: f64,
    latency_p50_seconds: f64,
    latency_p99_seconds: f64,
    latency_max_seconds: f64,
}

async fn burst(target: Target, requests: usize, timeline: Option<PathBuf>) -> Result<BurstReport> {
    let target = Arc::new(target);
    let connect_started = Instant::now();
    let mut senders = Vec::with_capacity(requests);
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..requests {
        let target = target.clone();
        connecting.spawn(async move { target.connect().await });
    }
    while let Some(joined) = connecting.join_next().await {
        senders.push(joined??);
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();

    let barrier = Arc::new(Barrier::new(requests + 1));
    let mut running = tokio::task::JoinSet::new();
    for mut sender in senders {
        let (target, barrier) = (target.clone(), barrier.clone());
        running.spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let status = target.get(&mut sender).await;
            (started, status)
        });
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut outcomes = Vec::with_capacity(requests);
    while let Some(joined) = running.join_next().await {
        let (started, status) = joined?;
        outcomes.push((started.duration_since(start), started.elapsed(), status));
    }
    let total_seconds = start.elapsed().as_secs_f64();

    let mut statuses = BTreeMap::new();
    let mut latencies: Vec<f64> = Vec::with_capacity(requests);
    let mut lines = String::new();
    for (began, latency, status) in &outcomes {
        let label = match status {
            Ok(code) => code.to_string(),
            Err(e) => format!("error: {e}"),
        };
        latencies.push(latency.as_secs_f64());
        lines.push_str(&format!(
            "{:.4} {}\n",
            (*began + *latency).as_secs_f64(),
            label.split(':').next().unwrap_or("error")
        ));
        *statuses.entry(label).or_insert(0) += 1;
    }
    if let Some(path) = timeline {
        std::fs::write(&path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    latencies.sort_by(f64::total_cmp);
    let succeeded =
        outcomes.iter().filter(|(_, _, s)| matches!(s, Ok(code) if (200..300).contains(code))).count();
    Ok(BurstReport {
        requests,
        succeeded,
        failed: requests - succeeded,
        statuses,
        connect_seconds,
        total_seconds,
        latency_p50_seconds: percentile(&latencies, 0.50),
        latency_p99_seconds: percentile(&latencies, 0.99),
        latency_max_seconds: latencies.last().copied().unwrap_or(0.0),
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Serialize)]
struct IdleReport {
    connections: usize,
    open: usize,
    failed: usize,
    first_error: Option<String>,
    open_seconds: f64,
    held_seconds: f64,
}

async fn idle(
    target: Target,
    connections: usize,
    hold: Duration,
    ready_file: Option<PathBuf>,
    connect_timeout: Duration,
) -> Result<IdleReport> {
    let target = Arc::new(target);
    let started = Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    // Open in waves so the server's accept backlog is never overrun.
    let wave = tokio::sync::Semaphore::new(512);
    let wave = Arc::new(wave);
    for _ in 0..connections {
        let (target, wave) = (target.clone(), wave.clone());
        opening.spawn(async move {
            let _permit = wave.acquire().await?;
            let mut sender = target.connect().await?;
            let status = target.get(&mut sender).await?;
            if status != 200 {
                bail!("status {status}");
            }
            Ok(sender)
        });
    }
    let mut held = Vec::with_capacity(connections);
    let mut first_error = None;
    let deadline = tokio::time::sleep(connect_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = opening.join_next() => match joined {
                None => break,
                Some(Ok(Ok(sender))) => held.push(sender),
                Some(Ok(Err(e))) => { first_error.get_or_insert_with(|| format!("{e:#}")); }
                Some(Err(e)) => { first_error.get_or_insert_with(|| e.to_string()); }
            },
            () = &mut deadline => {
                opening.abort_all();
                first_error.get_or_insert_with(|| "connect timeout".to_owned());
                break;
            }
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    if let Some(path) = ready_file {
        std::fs::write(&path, format!("{}\n", held.len()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let holding = Instant::now();
    tokio::select! {
        () = tokio::time::sleep(hold) => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    let open = held.iter().filter(|s| !s.is_closed()).count();
    Ok(IdleReport {
        connections,
        open,
        failed: connections - held.len(),
        first_error,
        open_seconds,
        held_seconds: holding.elapsed().as_secs_f64(),
    })
}

#[derive(Serialize)]
struct SteadyReport {
    clients: usize,
    connections_opened: usize,
    /// Requests sent again on a new connection because the server closed
    /// their kept-alive one before answering (as browsers do).
    retried: usize,
    #[serde(flatten)]
    answers: Answers,
}

/// What a run's requests got, over its `seconds`.
#[derive(Serialize)]
struct Answers {
    requests: usize,
    succeeded: usize,
    failed: usize,
    /// Status codes, and errors by their message.
    statuses: BTreeMap<String, usize>,
    seconds: f64,
    requests_per_second: f64,
    latency_p50_seconds: f64,
    latency_p99_seconds: f64,
    latency_max_seconds: f64,
}

impl Answers {
    fn of(outcomes: &[Outcome], seconds: f64) -> Answers {
        let latencies = sorted_latencies(outcomes);
        let succeeded = succeeded(outcomes);
        Answers {
            requests: outcomes.len(),
            succeeded,
            failed: outcomes.len() - succeeded,
            statuses: statuses(outcomes),
            seconds,
            requests_per_second: outcomes.len() as f64 / seconds,
            latency_p50_seconds: percentile(&latencies, 0.50),
            latency_p99_seconds: percentile(&latencies, 0.99),
            latency_max_seconds: latencies.last().copied().unwrap_or(0.0),
        }
    }
}

/// One answered (or failed) request: when it finished, how long it took,
/// its status or error.
struct Outcome {
    finished: Duration,
    latency: Duration,
    status: Result<u16, String>,
}

/// One client's keep-alive connection, opened again after `Connection:
/// close` or an error.
struct Client {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
    opened: usize,
    /// Requests sent again, as a browser does, because the server closed
    /// the kept-alive connection they were sent on before answering.
    retried: usize,
}

/// Whether `error` says the connection was closed before any answer came:
/// what a server that closes an idle keep-alive connection (a draining
/// gunicorn, say) does to a request that crossed the close.
fn closed_before_answer(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_incomplete_message() || e.is_canceled() || e.is_closed())
            || cause.downcast_ref::<std::io::Error>().is_some_and(|e| {
                matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
            })
    })
}

impl Client {
    fn new(target: Arc<Target>) -> Self {
        Self { target, sender: None, opened: 0, retried: 0 }
    }

    /// One request, its outcome timed from `start`. A request sent on a
    /// kept-alive connection that the server closed before answering is
    /// sent once more on a new connection, as browsers do (it cannot have
    /// been processed); any other failure counts.
    async fn request(&mut self, start: Instant, timeout: Duration) -> Outcome {
        let began = Instant::now();
        let attempt = async {
            let reused = self.sender.is_some();
            if !reused {
                self.opened += 1;
                self.sender = Some(self.target.connect().await?);
            }
            let first = match self.sender.as_mut() {
                Some(s) => self.target.get_keep_alive(s).await,
                None => bail!("no connection"),
            };
            match first {
                Err(e) if reused && closed_before_answer(&e) => {
                    self.retried += 1;
                    self.opened += 1;
                    let mut sender = self.target.connect().await?;
                    let answer = self.target.get_keep_alive(&mut sender).await;
                    self.sender = Some(sender);
                    answer
                }
                other => other,
            }
        };
        let status = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok((code, keep_alive))) => {
                if !keep_alive {
                    self.sender = None;
                }
                Ok(code)
            }
            Ok(Err(e)) => {
                self.sender = None;
                Err(format!("{e:#}"))
            }
            Err(_) => {
                self.sender = None;
                Err(format!("no answer within {timeout:?}"))
            }
        };
        Outcome { finished: start.elapsed(), latency: began.elapsed(), status }
    }
}

/// Status codes, and errors by their message.
fn statuses(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut statuses = BTreeMap::new();
    for outcome in outcomes {
        let label = match &outcome.status {
            Ok(code) => code.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *statuses.entry(label).or_insert(0) += 1;
    }
    statuses
}

fn succeeded(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| matches!(o.status, Ok(code) if (200..300).contains(&code))).count()
}

fn sorted_latencies(outcomes: &[Outcome]) -> Vec<f64> {
    let mut latencies: Vec<f64> = outcomes.iter().map(|o| o.latency.as_secs_f64()).collect();
    latencies.sort_by(f64::total_cmp);
    latencies
}

async fn steady(
    target: Target,
    clients: usize,
    stop_file: PathBuf,
    request_timeout: Duration,
    timeline: Option<PathBuf>,
) -> Result<SteadyReport> {
    let target = Arc::new(target);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (target, mut stopped) = (target.clone(), stopped.clone());
        running.spawn(async move {
            let mut client = Client::new(target);
            let mut outcomes = Vec::new();
            while !*stopped.borrow_and_update() {
                outcomes.push(client.request(start, request_timeout).await);
            }
            (outcomes, client.opened, client.retried)
        });
    }
    // The stop file is polled: the test or script that started this run
    // creates it when the rollout or fault it watches is over.
    while !stop_file.exists() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send_replace(true);
    let (mut outcomes, mut connections_opened, mut retried) = (Vec::new(), 0, 0);
    while let Some(joined) = running.join_next().await {
        let (mut client_outcomes, opened, client_retried) = joined?;
        outcomes.append(&mut client_outcomes);
        connections_opened += opened;
        retried += client_retried;
    }
    let seconds = start.elapsed().as_secs_f64();
    outcomes.sort_by_key(|o| o.finished);
    let mut lines = String::new();
    for outcome in &outcomes {
        let short = match &outcome.status {
            Ok(code) => code.to_string(),
            Err(_) => "error".to_owned(),
        };
        lines.push_str(&format!(
            "{:.4} {:.4} {short}\n",
            outcome.finished.as_secs_f64(),
            outcome.latency.as_secs_f64()
        ));
    }
    if let Some(path) = timeline {
        std::fs::write(&path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(SteadyReport { clients, connections_opened, retried, answers: Answers::of(&outcomes, seconds) })
}

#[derive(Serialize)]
struct RateReport {
    rate: u32,
    connections: usize,
    /// Requests not sent because their connection was still waiting for
    /// an earlier answer: the server did not keep up with the rate.
    missed: usize,
    /// Requests sent again on a new connection (see `steady`).
    retried: usize,
    #[serde(flatten)]
    answers: Answers,
}

/// Longest `rate` may send.
const MAX_RATE_DURATION: Duration = Duration::from_secs(3600);

/// Sends `rate` requests per second, spread evenly over `connections`
/// keep-alive connections, for `duration`. A connection whose previous
/// answer is late skips the requests it missed (counted) rather than
/// sending them in a burst.
async fn rate(
    target: Target,
    rate: u32,
    connections: usize,
    duration: Duration,
    request_timeout: Duration,
) -> Result<RateReport> {
    let target = Arc::new(target);
    let period = Duration::from_secs_f64(connections as f64 / f64::from(rate));
    let start = Instant::now();
    let end = tokio::time::Instant::from_std(start + duration);
    let mut running = tokio::task::JoinSet::new();
    for i in 0..connections {
        let mut client = Client::new(target.clone());
        // Each connection starts a fraction of a period after the one
        // before, so the requests arrive evenly rather than in waves.
        let first = tokio::time::Instant::from_std(start) + period.mul_f64(i as f64 / connections as f64);
        running.spawn(async move {
            let mut ticks = tokio::time::interval_at(first, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut outcomes = Vec::new();
            while ticks.tick().await < end {
                outcomes.push(client.request(start, request_timeout).await);
            }
            (outcomes, client.retried)
        });
    }
    let (mut outcomes, mut retried) = (Vec::new(), 0);
    while let Some(joined) = running.join_next().await {
        let (mut connection_outcomes, connection_retried) = joined?;
        outcomes.append(&mut connection_outcomes);
        retried += connection_retried;
    }
    let seconds = start.elapsed().as_secs_f64();
    let scheduled = (duration.as_secs_f64() * f64::from(rate)).round() as usize;
    let missed = scheduled.saturating_sub(outcomes.len());
    Ok(RateReport { rate, connections, missed, retried, answers: Answers::of(&outcomes, seconds) })
}

#[derive(Serialize)]
pub(crate) struct QueueLoopReport {
    pub(crate) jobs: u64,
    loops: usize,
    batch_size: i64,
    seconds: f64,
    jobs_per_second: f64,
}

/// The PostgreSQL URL `url` (of flag `flag`), refused unless every host
/// is loopback.
pub(crate) fn loopback_database(url: &str, flag: &str) -> Result<tokio_postgres::Config> {
    let config: tokio_postgres::Config = url.parse().with_context(|| format!("{flag} is not a valid URL"))?;
    for host in config.get_hosts() {
        let loopback = match host {
            tokio_postgres::config::Host::Tcp(name) => {
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            tokio_postgres::config::Host::Unix(_) => true,
        };
        if !loopback {
            bail!("{flag} must point at loopback");
        }
    }
    Ok(config)
}

/// Claims and completes every due job of `queue` with `loops` connections,
/// each claiming `batch_size` at a time and completing them at once.
pub(crate) async fn queue_loop(
    database_url: &str,
    queue: &str,
    loops: usize,
    batch_size: i64,
) -> Result<QueueLoopReport> {
    let config = loopback_database(database_url, "--database-url")?;
    let mut clients = Vec::with_capacity(loops);
    for _ in 0..loops {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        clients.push(client);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let queue = queue.to_owned();
        tasks.spawn(async move {
            let mut done = 0u64;
            loop {
                let jobs =
                    sql::claim(&client, &queue, batch_size, "bare-loop", Duration::from_secs(600)).await?;
                if jobs.is_empty() {
                    return Ok::<u64, anyhow::Error>(done);
                }
                let finished: Vec<_> =
                    jobs.iter().map(|j| (sql::Lease { id: j.id, attempt: j.attempt }, None)).collect();
                done += sql::complete(&client, &finished).await?.len() as u64;
            }
        });
    }
    let mut jobs = 0;
    while let Some(done) = tasks.join_next().await {
        jobs += done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(QueueLoopReport { jobs, loops, batch_size, seconds, jobs_per_second: jobs as f64 / seconds })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let cluster = cli.cluster_cidrs;
    match cli.command {
        Command::Burst { url, requests, timeout, timeline } => {
            if requests == 0 || requests > MAX_CONNECTIONS {
                bail!("--requests must be from 1 to {MAX_CONNECTIONS}");
            }
            let target = Target::parse(&url, &cluster)?;
            let report = tokio::time::timeout(timeout, burst(target, requests, timeline))
                .await
                .with_context(|| format!("the burst did not finish within {timeout:?}"))??;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Idle { url, connections, hold, ready_file, connect_timeout } => {
            if connections == 0 || connections > MAX_CONNECTIONS {
                bail!("--connections must be from 1 to {MAX_CONNECTIONS}");
            }
            let target = Target::parse(&url, &cluster)?;
            let report = idle(target, connections, hold, ready_file, connect_timeout).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Steady { url, clients, stop_file, timeout, request_timeout, timeline, json_body } => {
            if clients == 0 || clients > MAX_CONNECTIONS {
                bail!("--clients must be from 1 to {MAX_CONNECTIONS}");
            }
            let mut target = Target::parse(&url, &cluster)?;
            if let Some(body) = json_body {
                if body.len() > MAX_BODY_BYTES {
                    bail!("--json-body is at most {MAX_BODY_BYTES} bytes");
                }
                serde_json::from_str::<serde_json::Value>(&body).context("--json-body is not JSON")?;
                target.body = Some(Bytes::from(body));
            }
            let report =
                tokio::time::timeout(timeout, steady(target, clients, stop_file, request_timeout, timeline))
                    .await
                    .with_context(|| format!("the steady run did not stop within {timeout:?}"))??;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Rate { url, rate: per_second, connections, duration, request_timeout } => {
            if connections == 0 || connections > MAX_CONNECTIONS {
                bail!("--connections must be from 1 to {MAX_CONNECTIONS}");
            }
            if duration.is_zero() || duration > MAX_RATE_DURATION {
                bail!("--duration must be more than 0 and at most {MAX_RATE_DURATION:?}");
            }
            let target = Target::parse(&url, &cluster)?;
            let bound = duration + request_timeout + Duration::from_secs(5);
            let report =
                tokio::time::timeout(bound, rate(target, per_second, connections, duration, request_timeout))
                    .await
                    .with_context(|| format!("the rate run did not stop within {bound:?}"))??;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Periodic(args) => {
            let timeout = args.timeout;
            let report = tokio::time::timeout(timeout, periodic::run(args))
                .await
                .with_context(|| format!("the periodic benchmark did not finish within {timeout:?}"))??;
            println!("{report}");
        }
        Command::Workflow(args) => {
            let timeout = args.timeout;
            let report = tokio::time::timeout(timeout, workflow::run(args))
                .await
                .with_context(|| format!("the workflow benchmark did not finish within {timeout:?}"))??;
            println!("{report}");
        }
        Command::QueueLoop { database_url, queue, loops, batch_size, timeout } => {
            let report =
                tokio::time::timeout(timeout, queue_loop(&database_url, &queue, loops as usize, batch_size))
                    .await
                    .with_context(|| format!("the queue loop did not finish within {timeout:?}"))??;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        assert!(Target::parse("http://127.0.0.1:8000/slow-query/", &[]).is_ok());
        assert!(Target::parse("http://localhost:8000/", &[]).is_ok());
        assert!(Target::parse("http://[::1]:8000/", &[]).is_ok());
        assert!(Target::parse("http://10.0.0.1:8000/", &[]).is_err());
        assert!(Target::parse("https://127.0.0.1/", &[]).is_err());
    }

    #[test]
    fn cluster_ranges_widen_the_targets_and_must_be_private() -> Result<(), String> {
        let services = Cidr::parse("10.0.0.0/16")?;
        let pods = Cidr::parse("10.244.0.7/24")?;
        assert_eq!(pods, Cidr { network: Ipv4Addr::new(10, 244, 0, 0), prefix: 24 });
        let cluster = [services, pods];
        assert!(Target::parse("http://10.0.12.1/row/", &cluster).is_ok());
        assert!(Target::parse("http://10.244.0.9:8000/", &cluster).is_ok());
        assert!(Target::parse("http://10.245.0.9:8000/", &cluster).is_err());
        assert!(Target::parse("http://192.168.1.1/", &cluster).is_err());
        for refused in ["8.8.8.0/24", "10.0.0.0/7", "172.32.0.0/16", "10.0.0.0", "10.0.0.0/33", "x/8"] {
            assert!(Cidr::parse(refused).is_err(), "{refused}");
        }
        assert!(Cidr::parse("192.168.0.0/16").is_ok() && Cidr::parse("172.20.1.0/24").is_ok());
        Ok(())
    }

    /// A loopback server answering 200 to everything; its address, and how
    /// many requests it served.
    async fn counting_server() -> Result<(SocketAddr, Arc<std::sync::atomic::AtomicUsize>)> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                let service = hyper::service::service_fn(move |_: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::<Bytes>::default()))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Ok((addr, served))
    }

    #[tokio::test]
    async fn rate_sends_no_more_than_its_schedule_and_counts_every_answer() -> Result<()> {
        let (addr, served) = counting_server().await?;
        let target = Target::parse(&format!("http://{addr}/row/"), &[])?;
        let (per_second, connections, duration) = (200, 4, Duration::from_millis(500));
        let report = rate(target, per_second, connections, duration, Duration::from_secs(10)).await?;
        let (missed, report) = (report.missed, report.answers);
        // 100 scheduled; each connection's last tick may fall on either side of the end.
        assert!(report.requests > 0 && report.requests <= 100 + connections, "{} requests", report.requests);
        assert_eq!(report.succeeded, report.requests);
        assert_eq!(report.statuses.get("200"), Some(&report.requests));
        assert_eq!(served.load(std::sync::atomic::Ordering::Relaxed), report.requests);
        assert_eq!(missed, 100_usize.saturating_sub(report.requests));
        Ok(())
    }

    /// A loopback server that answers the first request of each connection
    /// (keeping it open) and closes the connection when the next request
    /// arrives, answering nothing: a server closing an idle kept-alive
    /// connection just as a request crosses it. With `answer_first` false it
    /// answers nothing at all.
    async fn closing_server(answer_first: bool) -> Result<SocketAddr> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 4096];
                    if answer_first {
                        let mut read = Vec::new();
                        while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&buffer[..n]),
                            }
                        }
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                    }
                    // The next request's bytes, then the close.
                    let _ = stream.read(&mut buffer).await;
                });
            }
        });
        Ok(addr)
    }

    #[tokio::test]
    async fn a_request_the_server_closed_its_kept_alive_connection_on_is_sent_again_once() -> Result<()> {
        let addr = closing_server(true).await?;
        let mut client = Client::new(Arc::new(Target::parse(&format!("http://{addr}/"), &[])?));
        let start = Instant::now();
        let first = client.request(start, Duration::from_secs(10)).await;
        let second = client.request(start, Duration::from_secs(10)).await;
        assert_eq!(first.status, Ok(200));
        assert_eq!(second.status, Ok(200), "sent again on a new connection");
        assert_eq!((client.retried, client.opened), (1, 2));

        // On a new connection a close is a failure: nothing is sent again.
        let addr = closing_server(false).await?;
        let mut client = Client::new(Arc::new(Target::parse(&format!("http://{addr}/"), &[])?));
        let outcome = client.request(start, Duration::from_secs(10)).await;
        assert!(outcome.status.is_err(), "{:?}", outcome.status);
        assert_eq!((client.retried, client.opened), (0, 1));
        Ok(())
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.99), 4.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
