//! A real Prometheus (Debian's package, `make deps`) for the tests that
//! check dashboards and alerts against scraped data: started on a loopback
//! port of its own with the test's scrape configuration, its data in a
//! folder of its own, stopped and removed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::wait_for;

pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` (YAML, the list under that
    /// key) at a 1 s scrape and evaluation interval, and waits until it is
    /// ready.
    pub fn start(scrape_configs: &str) -> Result<Prometheus> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("tidepool-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\nscrape_configs:\n{scrape_configs}"
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("prometheus (Debian's prometheus package; run make deps)")?;
        let mut prometheus = Prometheus { child, dir, port };
        wait_for("Prometheus to be ready", Duration::from_secs(30), || {
            if let Some(status) = prometheus.child.try_wait()? {
                bail!("Prometheus exited ({status}): {}", prometheus.log());
            }
            Ok(prometheus.get("/-/ready").ok().filter(|(code, _)| *code == 200).map(drop))
        })
        .with_context(|| prometheus.log())?;
        Ok(prometheus)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The result (`data.result`) of the instant query `expr`.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        self.api(&format!("/api/v1/query?query={}", encode(expr)))
    }

    /// The result of the range query `expr` over the last `seconds`, a point
    /// a second.
    pub fn query_range(&self, expr: &str, seconds: u64) -> Result<Vec<Value>> {
        let end = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let start = end.saturating_sub(seconds);
        self.api(&format!("/api/v1/query_range?query={}&start={start}&end={end}&step=1", encode(expr)))
    }

    /// The active targets' health, by scrape URL.
    pub fn targets(&self) -> Result<Vec<(String, String)>> {
        let (code, body) = self.get("/api/v1/targets?state=active")?;
        if code != 200 {
            bail!("targets: {code} {body}");
        }
        let value: Value = serde_json::from_str(&body)?;
        Ok(value["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let text = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
                (text("scrapeUrl"), text("health"))
            })
            .collect())
    }

    fn api(&self, path: &str) -> Result<Vec<Value>> {
        let (code, body) = self.get(path)?;
        let value: Value = serde_json::from_str(&body).with_context(|| format!("{code}: {body}"))?;
        if value["status"] != "success" {
            bail!("{path}: {body}");
        }
        Ok(value["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// `GET path` on loopback: status code and body.
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).context("a status line")?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((code, body))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(super::encode(r#"sum(x{a="b c"})"#), "sum%28x%7Ba%3D%22b%20c%22%7D%29");
    }
}
