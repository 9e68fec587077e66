//! `tidepool-shop`: the shop as a binary with Tidepool's whole command
//! line (`web`, `worker`, `migrate`, `enqueue`, `pooler-config`).

use std::process::ExitCode;

fn main() -> ExitCode {
    tidepool::run(tidepool_shop::app())
}
