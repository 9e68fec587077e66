//! `tidepool-operator`: the command line.
//!
//! - `crd` prints the CustomResourceDefinition (`manifests/crd.yaml` is this);
//! - `plan -f FILE` prints the connection budget of the Tidepools in a file
//!   and exits 1 with the refusal when one cannot fit;
//! - `render -f FILE` prints every child object, offline, for review and
//!   GitOps.
//!
//! Exit codes: 0 success, 1 a refused or invalid Tidepool or an unreadable
//! file, 2 a bad command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tidepool_operator::cli::{self, Format};

#[derive(Debug, Parser)]
#[command(
    name = "tidepool-operator",
    version,
    about = "Runs Tidepool on Kubernetes within a database's connection budget"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the Tidepool CustomResourceDefinition as YAML.
    Crd,
    /// Print the connection budget of every Tidepool in a file.
    Plan {
        /// A YAML file with one or more Tidepools (other kinds, such as a
        /// Secret, are skipped); `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The namespace of Tidepools that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// `table` for people; `env` prints the local stack's settings as
        /// shell assignments (one process per tier, one PgBouncer for both).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print every child object of every Tidepool in a file, as YAML.
    Render {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Env,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => cli::crd_yaml(),
        Command::Plan { file, namespace, output } => {
            let format = match output {
                Output::Table => Format::Table,
                Output::Env => Format::LocalEnv,
            };
            cli::read(&file).and_then(|text| cli::plan(&text, &namespace, format))
        }
        Command::Render { file, namespace } => {
            cli::read(&file).and_then(|text| cli::render(&text, &namespace))
        }
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tidepool-operator: {e}");
            ExitCode::FAILURE
        }
    }
}
