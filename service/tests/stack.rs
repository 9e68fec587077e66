//! The local stack's script reports a busy port by name, before starting
//! anything.

mod support;

use std::process::Command;

use anyhow::Result;

#[test]
fn a_busy_port_stops_the_stack_with_its_name() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let state = support::scratch_dir("stack")?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack.sh");
    let output = Command::new("bash")
        .args([script, "up", "pooler"])
        .env("TIDEPOOL_STATE_DIR", &state)
        .env("TIDEPOOL_POOLER_PORT", port.to_string())
        .env("TIDEPOOL_BIN", env!("CARGO_BIN_EXE_tidepool"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("port {port} (for PgBouncer) is already in use")), "{stderr}");
    assert!(
        !state.join("pgbouncer").join("pgbouncer.ini").exists(),
        "nothing is started or written for a busy port"
    );
    Ok(())
}
