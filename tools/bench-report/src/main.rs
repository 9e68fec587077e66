//! `tidepool-bench-report`: the benchmark scripts' figures and report
//! sections (see the library's documentation). Each section command reads
//! its script's work folder and puts the section into the report given with
//! `--report` (or prints it); the other commands print one figure, or a
//! line of them, for the script to use.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tidepool_bench_report::sections::{self, Provenance, Section};
use tidepool_bench_report::{parse, read, report, stats, ReportError};

#[derive(Parser)]
#[command(name = "tidepool-bench-report", about = "The benchmark scripts' figures and report sections")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Section 14: the router layer (scripts/bench-router.sh).
    Router {
        #[command(flatten)]
        out: Out,
        #[arg(long)]
        base: String,
        #[arg(long)]
        rounds: u32,
        #[arg(long)]
        seconds: u32,
        #[arg(long)]
        rate: u32,
    },
    /// Section 9: the operator at scale (scripts/bench-operator.sh); --work
    /// holds the scale benchmark's `result.json`.
    Operator {
        #[command(flatten)]
        out: Out,
        /// The whole run's seconds.
        #[arg(long)]
        elapsed: u64,
        /// Pods on the control plane at the end.
        #[arg(long)]
        pods: u64,
        #[arg(long)]
        cores: u64,
    },
    /// Section 10: the real node (scripts/bench-node.sh); --work holds
    /// `steps`, `sizes` and `applies`.
    Node {
        #[command(flatten)]
        out: Out,
    },
    /// Section 11: end to end on the real node (scripts/bench-e2e.sh);
    /// --work holds `figures.jsonl` and `local.txt`.
    E2e {
        #[command(flatten)]
        out: Out,
    },
    /// Section 13: scaling (scripts/bench-autoscaling.sh); --work holds
    /// `scaling.jsonl` and `e2e.jsonl`.
    Autoscaling {
        #[command(flatten)]
        out: Out,
        #[arg(long)]
        trials: u32,
        #[arg(long)]
        steady_seconds: u32,
        #[arg(long)]
        repeats: u32,
    },
    /// One server's round of section 14, as its file keeps it.
    RouterRound {
        /// wrk's report.
        #[arg(long)]
        wrk: PathBuf,
        /// The web process's CPU time over wrk's run, µs.
        #[arg(long)]
        cpu_us: f64,
        /// `tidepool-loadgen rate`'s report.
        #[arg(long)]
        at_rate: PathBuf,
        /// The web process's CPU time over the fixed-rate run, µs.
        #[arg(long)]
        rate_cpu_us: f64,
    },
    /// Section 16: the shop (scripts/bench-shop.sh).
    Shop {
        #[command(flatten)]
        out: Out,
        #[arg(long)]
        rounds: u32,
        #[arg(long)]
        seconds: u32,
    },
    /// Section 17: the Django + Celery example (scripts/bench-django.sh);
    /// --work holds `figures.jsonl`.
    Django {
        #[command(flatten)]
        out: Out,
    },
    /// Puts the section in FILE (starting with --start, ending with --end)
    /// into the report, in place of its last run.
    Splice {
        #[arg(long)]
        report: PathBuf,
        #[arg(long)]
        start: String,
        #[arg(long)]
        end: String,
        file: PathBuf,
    },
    /// A `wrk --latency` report's "requests/s p50_ms p99_ms".
    Wrk { file: PathBuf },
    /// pgbench's per-transaction log on standard input: "p50_ms p99_ms".
    PgbenchLatency,
    /// `kubectl get jobs,pods -o json` on standard input: "job_seconds pods_seconds".
    RolloutPhases,
    /// Field FIELD (a dotted path: `burst.total_seconds`) of the JSON
    /// object in FILE, as it is (a string without its quotes).
    Json { file: PathBuf, field: String },
    /// Prometheus's `/api/v1/targets` on standard input: how many are up.
    PrometheusTargetsUp,
    /// Prometheus's answer to an instant query on standard input: its
    /// first series' value (nothing when it has none).
    PrometheusValue,
    /// The median of the numbers.
    Median {
        #[command(flatten)]
        format: Format,
        #[arg(allow_negative_numbers = true)]
        values: Vec<f64>,
    },
    /// The numbers, as a list.
    Runs {
        #[command(flatten)]
        format: Format,
        #[arg(allow_negative_numbers = true)]
        values: Vec<f64>,
    },
}

/// Where a section comes from and goes.
#[derive(Args)]
struct Out {
    /// The script's work folder, with what it measured.
    #[arg(long)]
    work: PathBuf,
    /// When it ran, as the section's first line says.
    #[arg(long)]
    date: String,
    /// The commit it measured.
    #[arg(long)]
    commit: String,
    /// The report to put the section into; without it, printed.
    #[arg(long)]
    report: Option<PathBuf>,
}

impl Out {
    fn provenance(&self) -> Provenance {
        Provenance { date: self.date.clone(), commit: self.commit.clone() }
    }

    fn write(&self, section: Section<'_>, text: &str) -> Result<(), ReportError> {
        match &self.report {
            Some(path) => report::splice_file(path, &section, text),
            None => {
                print!("{text}");
                Ok(())
            }
        }
    }
}

#[derive(Args)]
struct Format {
    #[arg(long, default_value_t = 2)]
    decimals: usize,
    /// Commas between each three digits.
    #[arg(long)]
    thousands: bool,
}

fn run(cli: Cli) -> Result<(), ReportError> {
    match cli.command {
        Command::Router { out, base, rounds, seconds, rate } => {
            let setup = sections::router::Setup { provenance: out.provenance(), base, rounds, seconds, rate };
            let runs = sections::router::load(&out.work)?;
            out.write(sections::router::SECTION, &sections::router::render(&setup, &runs))
        }
        Command::Operator { out, elapsed, pods, cores } => {
            use sections::operator;
            let setup =
                operator::Setup { provenance: out.provenance(), elapsed_seconds: elapsed, pods, cores };
            let scale = operator::load(&read(&out.work.join("result.json"))?)?;
            out.write(operator::SECTION, &operator::render(&setup, &scale))
        }
        Command::Node { out } => {
            let runs = sections::node::load(&out.work)?;
            out.write(sections::node::SECTION, &sections::node::render(&out.provenance(), &runs))
        }
        Command::E2e { out } => {
            let runs = sections::e2e::load(&out.work.join("figures.jsonl"), &out.work.join("local.txt"))?;
            out.write(sections::e2e::SECTION, &sections::e2e::render(&out.provenance(), &runs))
        }
        Command::Autoscaling { out, trials, steady_seconds, repeats } => {
            use sections::autoscaling;
            let setup = autoscaling::Setup { provenance: out.provenance(), trials, steady_seconds, repeats };
            let runs = autoscaling::load(&out.work.join("scaling.jsonl"), &out.work.join("e2e.jsonl"))?;
            out.write(autoscaling::SECTION, &autoscaling::render(&setup, &runs))
        }
        Command::RouterRound { wrk, cpu_us, at_rate, rate_cpu_us } => {
            let wrk = parse::wrk(&read(&wrk)?)?;
            let what = at_rate.display().to_string();
            let at_rate = serde_json::from_str(&read(&at_rate)?)
                .map_err(|e| ReportError::invalid(what, e.to_string()))?;
            let round = sections::router::round(&wrk, cpu_us, &at_rate, rate_cpu_us)?;
            println!("{}", sections::router::round_line(&round));
            Ok(())
        }
        Command::Shop { out, rounds, seconds } => {
            let setup = sections::shop::Setup { provenance: out.provenance(), rounds, seconds };
            let runs = sections::shop::load(&out.work)?;
            out.write(sections::shop::SECTION, &sections::shop::render(&setup, &runs))
        }
        Command::Django { out } => {
            let runs = sections::django::load(&out.work.join("figures.jsonl"))?;
            out.write(sections::django::SECTION, &sections::django::render(&out.provenance(), &runs))
        }
        Command::Splice { report, start, end, file } => {
            report::splice_file(&report, &Section { start: &start, end: &end, heading: None }, &read(&file)?)
        }
        Command::Wrk { file } => {
            let wrk = parse::wrk(&read(&file)?)?;
            println!("{} {:.3} {:.3}", wrk.requests_per_second, wrk.p50_ms, wrk.p99_ms);
            Ok(())
        }
        Command::PgbenchLatency => {
            let (p50, p99) = parse::pgbench_log_latency(&stdin()?)?;
            println!("{p50:.3} {p99:.3}");
            Ok(())
        }
        Command::RolloutPhases => {
            let list = stdin_json("kubectl's JSON")?;
            let (job, pods) = parse::rollout_phases(&list)?;
            println!("{job} {pods}");
            Ok(())
        }
        Command::Json { file, field } => {
            let what = file.display().to_string();
            let value: serde_json::Value = serde_json::from_str(&read(&file)?)
                .map_err(|e| ReportError::invalid(&what, e.to_string()))?;
            println!(
                "{}",
                parse::json_field(&value, &field)
                    .ok_or_else(|| ReportError::invalid(what, format!("has no {field}")))?
            );
            Ok(())
        }
        Command::PrometheusTargetsUp => {
            println!("{}", parse::prometheus_targets_up(&stdin_json("Prometheus's targets")?));
            Ok(())
        }
        Command::PrometheusValue => {
            println!("{}", parse::prometheus_value(&stdin_json("Prometheus's answer")?).unwrap_or_default());
            Ok(())
        }
        Command::Median { format, values } => {
            println!("{}", stats::number(stats::median(&values), format.decimals, format.thousands));
            Ok(())
        }
        Command::Runs { format, values } => {
            println!("{}", stats::list(&values, format.decimals, format.thousands));
            Ok(())
        }
    }
}

fn stdin() -> Result<String, ReportError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| ReportError::Read { path: "standard input".into(), source })?;
    Ok(text)
}

fn stdin_json(what: &str) -> Result<serde_json::Value, ReportError> {
    serde_json::from_str(&stdin()?).map_err(|e| ReportError::invalid(what, e.to_string()))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidepool-bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}
