//! The figures in what the benchmarks' tools print.

use serde_json::Value;

use crate::ReportError;

/// What `wrk --latency` reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wrk {
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The requests it made ("30137 requests in 10.01s").
    pub requests: u64,
}

/// The figures of a `wrk --latency` report.
pub fn wrk(text: &str) -> Result<Wrk, ReportError> {
    let missing = |what: &str| ReportError::invalid("the wrk report", format!("has no {what}"));
    let after = |label: &str| {
        text.lines().find_map(|line| line.trim().strip_prefix(label).map(|rest| rest.trim().to_owned()))
    };
    let requests_per_second =
        after("Requests/sec:").and_then(|v| v.parse().ok()).ok_or_else(|| missing("Requests/sec"))?;
    let percentile = |p: &str| {
        let value = after(&format!("{p}%"))?;
        let split = value.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let (number, unit) = value.split_at(split);
        let scale = match unit {
            "us" => 0.001,
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            _ => return None,
        };
        Some(number.parse::<f64>().ok()? * scale)
    };
    Ok(Wrk {
        requests_per_second,
        p50_ms: percentile("50").ok_or_else(|| missing("50% latency"))?,
        p99_ms: percentile("99").ok_or_else(|| missing("99% latency"))?,
        requests: text
            .lines()
            .find_map(|line| line.trim().split_once(" requests in ").and_then(|(n, _)| n.parse().ok()))
            .ok_or_else(|| missing("request count"))?,
    })
}

/// The field at `path` (dotted: `burst.total_seconds`) of `value`, as a
/// script uses it: a string without its quotes, anything else as JSON.
pub fn json_field(value: &Value, path: &str) -> Option<String> {
    let field = crate::at(value, &path.split('.').collect::<Vec<_>>());
    Some(match field {
        Value::Null => return None,
        Value::String(text) => text.clone(),
        other => other.to_string(),
    })
}

/// How many of Prometheus's active targets are up, from its
/// `/api/v1/targets`.
pub fn prometheus_targets_up(targets: &Value) -> usize {
    targets["data"]["activeTargets"]
        .as_array()
        .map_or(0, |t| t.iter().filter(|t| t["health"] == "up").count())
}

/// The value of an instant query's first series, from Prometheus's
/// `/api/v1/query` (none when the query has no series).
pub fn prometheus_value(answer: &Value) -> Option<String> {
    answer["data"]["result"][0]["value"][1].as_str().map(str::to_owned)
}

/// The p50 and p99 latency (ms) of pgbench's per-transaction log (`-l`:
/// the third field of each line is the transaction's latency in µs), as the
/// element at those ranks of the sorted latencies.
pub fn pgbench_log_latency(log: &str) -> Result<(f64, f64), ReportError> {
    let mut latencies = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            line.split_whitespace().nth(2).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
                ReportError::invalid("the pgbench log", format!("a line without a latency: {line:?}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if latencies.is_empty() {
        return Err(ReportError::invalid("the pgbench log", "no transactions"));
    }
    latencies.sort_unstable();
    let at = |rank: usize| latencies[rank.min(latencies.len() - 1)] as f64 / 1000.0;
    let n = latencies.len();
    Ok((at(n / 2), at(n * 99 / 100)))
}

/// How long the migration Job took (creation to completion) and then the
/// web and worker pods (the first one's creation to the last one's Ready),
/// in whole seconds, from `kubectl get jobs,pods -o json`.
pub fn rollout_phases(list: &Value) -> Result<(i64, i64), ReportError> {
    let invalid = |message: &str| ReportError::invalid("the Job and pods", message);
    let items = list["items"].as_array().ok_or_else(|| invalid("no items"))?;
    let time = |value: &Value| value.as_str().and_then(seconds_of);
    let job = items.iter().find(|i| i["kind"] == "Job").ok_or_else(|| invalid("no Job"))?;
    let job_seconds = time(&job["status"]["completionTime"])
        .zip(time(&job["metadata"]["creationTimestamp"]))
        .map(|(done, created)| done - created)
        .ok_or_else(|| invalid("the Job has not completed"))?;
    let pods: Vec<&Value> = items
        .iter()
        .filter(|i| i["kind"] == "Pod")
        .filter(|i| {
            matches!(i["metadata"]["labels"]["app.kubernetes.io/component"].as_str(), Some("web" | "worker"))
        })
        .collect();
    let ready = pods
        .iter()
        .flat_map(|p| p["status"]["conditions"].as_array().into_iter().flatten())
        .filter(|c| c["type"] == "Ready")
        .filter_map(|c| time(&c["lastTransitionTime"]))
        .max();
    let created = pods.iter().filter_map(|p| time(&p["metadata"]["creationTimestamp"])).min();
    let pods_seconds = ready
        .zip(created)
        .map(|(ready, created)| ready - created)
        .ok_or_else(|| invalid("no ready app pod"))?;
    Ok((job_seconds, pods_seconds))
}

/// Seconds since the epoch of a Kubernetes timestamp (`2026-12-02T10:00:00Z`).
fn seconds_of(text: &str) -> Option<i64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(|v| v.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let mut time = time.split(':').map(|v| v.parse::<i64>().ok());
    let (hour, minute, second) = (time.next()??, time.next()??, time.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:8000/row/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    21.27ms    5.01ms  71.33ms   80.12%
    Req/Sec     1.51k   141.21     1.87k    71.50%
  Latency Distribution
     50%   20.41ms
     75%   22.86ms
     90%   26.54ms
     99%    1.21s
  30137 requests in 10.01s, 4.93MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   3010.32
Transfer/sec:    504.08KB
";

    #[test]
    fn wrk_figures_in_milliseconds() {
        let figures = wrk(WRK).expect("a report");
        assert_eq!(
            figures,
            Wrk { requests_per_second: 3010.32, p50_ms: 20.41, p99_ms: 1210.0, requests: 30137 }
        );
        let micro = WRK.replace("20.41ms", "830.00us");
        assert!((wrk(&micro).expect("a report").p50_ms - 0.83).abs() < 1e-9);
        let error = wrk("connection refused").expect_err("no report").to_string();
        assert_eq!(error, "the wrk report: has no Requests/sec");
    }

    #[test]
    fn json_fields_by_their_path() {
        let report = serde_json::json!({"failed": 0, "total_seconds": 5.0123, "burst": {"name": "x"}});
        assert_eq!(json_field(&report, "failed").as_deref(), Some("0"));
        assert_eq!(json_field(&report, "total_seconds").as_deref(), Some("5.0123"));
        assert_eq!(json_field(&report, "burst.name").as_deref(), Some("x"));
        assert_eq!(json_field(&report, "burst.other"), None);
    }

    #[test]
    fn prometheus_answers() {
        let targets = serde_json::json!({"data": {"activeTargets": [{"health": "up"}, {"health": "down"}, {"health": "up"}]}});
        assert_eq!(prometheus_targets_up(&targets), 2);
        assert_eq!(prometheus_targets_up(&serde_json::json!({"status": "error"})), 0);
        let answer =
            serde_json::json!({"data": {"result": [{"metric": {}, "value": [1700000000.0, "42.5"]}]}});
        assert_eq!(prometheus_value(&answer).as_deref(), Some("42.5"));
        assert_eq!(prometheus_value(&serde_json::json!({"data": {"result": []}})), None);
    }

    #[test]
    fn pgbench_latencies_by_rank() {
        let log: String = (1..=200).map(|i| format!("0 {i} {} 0 1700000000 0\n", i * 1000)).collect();
        assert_eq!(pgbench_log_latency(&log).expect("a log"), (101.0, 199.0));
        assert!(pgbench_log_latency("").is_err());
        assert!(pgbench_log_latency("0 1 x 0\n").is_err());
    }

    #[test]
    fn phases_from_the_objects_timestamps() {
        let list = serde_json::json!({"items": [
            {"kind": "Job", "metadata": {"creationTimestamp": "2026-12-02T10:00:00Z"},
             "status": {"completionTime": "2026-12-02T10:00:07Z"}},
            {"kind": "Pod", "metadata": {"creationTimestamp": "2026-12-02T10:00:05Z", "labels": {"app.kubernetes.io/component": "migrate"}},
             "status": {"conditions": [{"type": "Ready", "lastTransitionTime": "2026-12-02T10:00:06Z"}]}},
            {"kind": "Pod", "metadata": {"creationTimestamp": "2026-12-02T10:00:09Z", "labels": {"app.kubernetes.io/component": "web"}},
             "status": {"conditions": [{"type": "Ready", "lastTransitionTime": "2026-12-02T10:00:20Z"}]}},
            {"kind": "Pod", "metadata": {"creationTimestamp": "2026-12-02T10:00:08Z", "labels": {"app.kubernetes.io/component": "worker"}},
             "status": {"conditions": [{"type": "Ready", "lastTransitionTime": "2026-12-02T10:00:18Z"}]}},
        ]});
        assert_eq!(rollout_phases(&list).expect("phases"), (7, 12));
        assert_eq!(seconds_of("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(seconds_of("2000-03-01T00:00:01Z"), Some(951_868_801));
        assert!(rollout_phases(&serde_json::json!({"items": []})).is_err());
    }
}
