//! Section 10, `make bench-node`: the images built cold and warm, the test
//! cluster with its real node brought up and down, and `kubectl apply` of a
//! Tidepool on the real node until it is Ready, with where the time went.

use std::path::Path;

use super::{Provenance, Section};
use crate::stats::{list, median, number};
use crate::{column, read, rows, ReportError};

pub const SECTION: Section<'static> = Section {
    start: "<!-- node benchmarks: scripts/bench-node.sh -->",
    end: "<!-- end of node benchmarks -->",
    heading: None,
};

/// What `scripts/bench-node.sh` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    /// Seconds of `images.sh` cold and warm, `kube.sh up` fresh and warm,
    /// `kube.sh down`.
    pub steps: Vec<f64>,
    /// `images.sh sizes`: each image and its size.
    pub sizes: String,
    /// Per apply: seconds until Ready, the migration Job's seconds, the app
    /// pods' seconds.
    pub applies: Vec<Vec<f64>>,
}

/// The files the script writes into `work`: `steps` (one line of five
/// seconds), `sizes`, `applies` (a line each).
pub fn load(work: &Path) -> Result<Runs, ReportError> {
    Ok(Runs {
        steps: rows(&work.join("steps"))?.into_iter().flatten().collect(),
        sizes: read(&work.join("sizes"))?,
        applies: rows(&work.join("applies"))?,
    })
}

pub fn render(provenance: &Provenance, runs: &Runs) -> String {
    let Provenance { date, commit } = provenance;
    let step = |i: usize| number(runs.steps.get(i).copied().unwrap_or(f64::NAN), 1, false);
    let size_rows = runs
        .sizes
        .lines()
        .filter(|line| line.contains(' '))
        .map(|line| {
            let mut words = line.split_whitespace();
            let image = words.next().unwrap_or_default();
            format!("| `{image}` | {} |", words.collect::<Vec<_>>().join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let applies = column(&runs.applies, 0);
    format!(
        "{start}

## 10. The real node

Written by `scripts/bench-node.sh` on {date}, commit {commit}, same machine.
The node is containerd, kubelet and kube-proxy in a network namespace of
their own (scripts/kube-node.sh), the images are built from
`images/*/Dockerfile` by buildah on mmdebstrap bases (scripts/images.sh).

| step | seconds |
|---|---|
| `scripts/images.sh` cold (empty image cache: both mmdebstrap bases, then pause, tidepool, tidepool-operator, pgbouncer) | {images_cold} |
| `scripts/images.sh` warm (bases and the pgbouncer layer cached; the binaries copied again) | {images_warm} |
| `scripts/kube.sh up` with the real node, fresh state (certificates, etcd, the node's containerd and the image imports) | {kube_fresh} |
| `scripts/kube.sh up` warm (state kept) | {kube_warm} |
| `scripts/kube.sh down` (the node, the control plane, the host's settings put back) | {kube_down} |

Images (as buildah stores them, uncompressed):

| image | size |
|---|---|
{size_rows}

`kubectl apply` of a Tidepool (1 web and 1 worker pod, each with its
PgBouncer sidecar, after the migration Job) on the real node, until its Ready
condition is True, {count} times one after the other: median **{apply_median} s**
(runs: {apply_runs}). Where it goes, medians from the objects' own
timestamps (whole seconds): the migration Job from its creation to its
completion {job_median} s (its pod's sandbox, the container, `tidepool migrate`),
then the web and worker pods from their creation to both Ready {pods_median} s
(the scheduling gate's removal, PgBouncer's startup probe every 1 s, the app's
warm-up of every connection, its startup probe every 1 s and readiness probe
every 5 s); the rest is the operator's and the controllers' turns between.

{end}
",
        start = SECTION.start,
        end = SECTION.end,
        images_cold = step(0),
        images_warm = step(1),
        kube_fresh = step(2),
        kube_warm = step(3),
        kube_down = step(4),
        count = runs.applies.len(),
        apply_median = number(median(&applies), 2, false),
        apply_runs = list(&applies, 1, false),
        job_median = number(median(&column(&runs.applies, 1)), 0, true),
        pods_median = number(median(&column(&runs.applies, 2)), 0, true),
    )
}
