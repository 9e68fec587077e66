//! The README's "Write your own app" works as printed: its files (each
//! fenced block after a `<!-- readme-app: PATH -->` marker) written into
//! `my-shop/`, beside `tidepool/` (this checkout), and built with cargo,
//! offline, at the versions of this workspace's lock file; its Dockerfile
//! puts that binary in the image as its entrypoint, on a base `make images`
//! makes; and its Tidepool, naming the image the README tags, plans and
//! renders as the operator would apply it.

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
    assert_eq!(
        paths,
        ["Cargo.toml", "migrations/0001_orders.sql", "src/main.rs", "Dockerfile", "tidepool.yaml"]
    );
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

#[test]
fn the_readmes_image_and_tidepool_deploy_that_binary() -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(repo.join("README.md"))?;
    let files = readme_files(&readme)?;
    let file = |name: &str| {
        files.iter().find(|(path, _)| path == name).map(|(_, text)| text.as_str()).context(name.to_owned())
    };
    let binary = file("Cargo.toml")?
        .lines()
        .find_map(|line| line.strip_prefix("name = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("the README's Cargo.toml names its package")?;

    // The image: the release binary, as the entrypoint (the operator passes
    // only the subcommand), on a base that scripts/images.sh makes.
    let dockerfile = file("Dockerfile")?;
    let from =
        dockerfile.lines().find_map(|l| l.strip_prefix("FROM ")).context("the Dockerfile has a FROM")?;
    let images = std::fs::read_to_string(repo.join("scripts/images.sh"))?;
    assert!(images.contains(&format!("base_image {from} ")), "scripts/images.sh does not make {from}");
    assert!(
        dockerfile.contains(&format!("COPY target/release/{binary} /usr/local/bin/{binary}\n")),
        "{dockerfile}"
    );
    assert!(dockerfile.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]\n")), "{dockerfile}");

    // The Tidepool names the image the README's build command tags.
    let tag = readme
        .split("buildah bud -t ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("the README tags the image with `buildah bud -t`")?;
    let tidepool = file("tidepool.yaml")?;
    let plan = tidepool_operator::cli::plan(tidepool, "default", tidepool_operator::cli::Format::Table)?;
    assert!(plan.contains("Tidepool default/my-shop: maxConnections 100 "), "{plan}");
    let rendered = tidepool_operator::cli::render(tidepool, "default")?;
    let children: Vec<tidepool::serde_json::Value> = rendered
        .split("---\n")
        .filter(|doc| !doc.trim().is_empty())
        .map(serde_norway::from_str)
        .collect::<Result<_, _>>()?;
    // Every container of the app's pods runs the README's image with one of
    // Tidepool's subcommands, except the PgBouncer sidecar and `pooler-config`,
    // which runs from Tidepool's own image (`spec.tidepoolImage`).
    let mut subcommands = Vec::new();
    for child in &children {
        let spec = match child["kind"].as_str() {
            Some("Deployment") => &child["spec"]["template"]["spec"],
            Some("Job") => &child["spec"]["template"]["spec"],
            _ => continue,
        };
        for list in ["initContainers", "containers"] {
            for container in spec[list].as_array().into_iter().flatten() {
                if container["name"] == "pgbouncer" {
                    continue;
                }
                let image = if container["name"] == "pooler-config" {
                    tidepool_operator::crd::DEFAULT_IMAGE
                } else {
                    tag
                };
                assert_eq!(container["image"], image, "{}", container["name"]);
                assert!(container["command"].is_null(), "the image's entrypoint runs: {}", container["name"]);
                subcommands.push(container["args"][0].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    subcommands.sort();
    subcommands.dedup();
    assert_eq!(subcommands, ["migrate", "pooler-config", "web", "worker"]);
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
