//! The README's "Write your own app" builds exactly as printed: its files
//! (each fenced block after a `<!-- readme-app: PATH -->` marker) written
//! into `my-shop/`, beside `tidepool/` (this checkout), and built with
//! cargo, offline, at the versions of this workspace's lock file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

const MARKER: &str = "<!-- readme-app: ";

/// The README's app: each file's path and text, in order.
fn readme_files(readme: &str) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix(MARKER) else { continue };
        let path = rest.strip_suffix(" -->").context("a marker ends with -->")?.trim().to_owned();
        let fence = lines.next().context("a fenced block follows the marker")?;
        ensure!(fence.starts_with("```"), "{path}: a fenced block must follow its marker, found {fence:?}");
        let mut text = String::new();
        let mut closed = false;
        for line in lines.by_ref() {
            if line == "```" {
                closed = true;
                break;
            }
            text.push_str(line);
            text.push('\n');
        }
        if !closed {
            bail!("{path}: the block is not closed");
        }
        files.push((path, text));
    }
    Ok(files)
}

#[test]
fn the_readmes_own_app_builds_as_printed() -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize()?;
    let readme = std::fs::read_to_string(repo.join("README.md"))?;
    let files = readme_files(&readme)?;
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["Cargo.toml", "migrations/0001_orders.sql", "src/main.rs"]);
    let main = &files[2].1;
    assert!(main.lines().count() <= 80, "the README's main.rs stays short: {} lines", main.lines().count());

    // Outside the checkout (so cargo does not take it for a member of this
    // workspace), at the same place every run, so its build is reused.
    let target = target_dir(&repo)?;
    let home = target.join("home");
    if home.exists() {
        std::fs::remove_dir_all(&home)?;
    }
    let app = home.join("my-shop");
    std::fs::create_dir_all(&app)?;
    std::os::unix::fs::symlink(&repo, home.join("tidepool"))?;
    for (path, text) in &files {
        let file = app.join(path);
        std::fs::create_dir_all(file.parent().context("a file has a folder")?)?;
        std::fs::write(&file, text)?;
    }
    std::fs::copy(repo.join("Cargo.lock"), app.join("Cargo.lock"))?;

    let output = Command::new(env!("CARGO"))
        .args(["build", "--offline", "--quiet"])
        .current_dir(&app)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()?;
    ensure!(
        output.status.success(),
        "the README's app does not build:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let binary = target.join("debug").join("my-shop");
    let help = Command::new(&binary).arg("--help").output()?;
    let usage = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));
    for command in ["web", "worker", "migrate", "enqueue", "pooler-config"] {
        assert!(usage.contains(command), "my-shop --help lists {command}:\n{usage}");
    }
    Ok(())
}

/// A folder of the example's own, outside the checkout (cargo would take
/// a package inside it for a member of this workspace) and the same every
/// run, so its build is reused: beside this build's target folder (which
/// cargo holds while the tests run), or in the temporary folder when that
/// target folder is inside the checkout.
fn target_dir(repo: &Path) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/debug/deps/readme-<hash>
    let target = exe.ancestors().nth(3).context("the test binary lives in <target>/debug/deps")?;
    if target.starts_with(repo) {
        return Ok(std::env::temp_dir().join("tidepool-readme-app"));
    }
    Ok(target.join("readme-app"))
}
