//! The worker's scheduler: the loop that enqueues its schedules' due
//! occurrences. What an occurrence is and why each runs once are
//! [`super::periodic`]'s; here is only the shell around it.
//!
//! One look is two statements on the worker's queue pool: read the
//! database's clock and every schedule's cursor, plan each schedule
//! ([`Periodic::plan`], pure), and, when any is due, move the cursors and
//! enqueue in one statement ([`sql::advance_schedules`]). Then it sleeps
//! until the earliest next occurrence (at most [`MAX_PAUSE`], so a schedule
//! moved by another version is seen soon), by the worker's clock corrected
//! by the database's. Jobs it enqueued wake its own worker's claim loop
//! (they are due), so they start without waiting for a poll. A failed look
//! is retried after a growing pause, up to [`FAILURE_PAUSE_MAX`]; the
//! cursors hold what was missed meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify};

use super::periodic::{declaration_due, Clock, Periodic};
use super::sql::{self, Advance};
use crate::db::{Database, DbError};
use crate::metrics::WorkerMetrics;

/// Longest sleep between two looks.
pub const MAX_PAUSE: Duration = Duration::from_secs(5);
/// Shortest sleep between two looks (when an occurrence is due again at once).
const MIN_PAUSE: Duration = Duration::from_millis(5);
/// The pause after a first failed look, doubled after each next one.
const FAILURE_PAUSE_MIN: Duration = Duration::from_millis(500);
/// The longest pause after failed looks.
pub const FAILURE_PAUSE_MAX: Duration = Duration::from_secs(5);

/// A worker's schedules and what their loop needs.
pub(crate) struct Scheduler {
    pub schedules: Vec<Periodic>,
    pub db: Database,
    pub metrics: WorkerMetrics,
    pub clock: Arc<dyn Clock>,
    /// The worker's name, recorded with each occurrence it enqueues.
    pub worker: String,
    /// Wakes the worker's claim loop: jobs this worker enqueued are due.
    pub wake: Arc<Notify>,
}

impl Scheduler {
    /// Looks and sleeps until `stop` turns true. Returns at once without
    /// schedules.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        if self.schedules.is_empty() {
            return;
        }
        for periodic in &self.schedules {
            self.metrics
                .schedule_grace
                .with_label_values(&[periodic.name()])
                .set(periodic.grace_period().as_secs_f64());
            self.metrics.schedule_enqueued.with_label_values(&[periodic.name()]);
        }
        tracing::info!(schedules = self.schedules.len(), "scheduler started");
        let mut declared: Option<Instant> = None;
        let mut failure_pause = FAILURE_PAUSE_MIN;
        loop {
            let pause = match self.look(&mut declared).await {
                Ok(pause) => {
                    failure_pause = FAILURE_PAUSE_MIN;
                    pause
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), retry_in = ?failure_pause, "a look at the schedules failed");
                    let pause = failure_pause;
                    failure_pause = (failure_pause * 2).min(FAILURE_PAUSE_MAX);
                    pause
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One look; returns how long to sleep before the next.
    async fn look(&self, declared: &mut Option<Instant>) -> Result<Duration, DbError> {
        let names: Vec<&str> = self.schedules.iter().map(Periodic::name).collect();
        if declaration_due(*declared) {
            queue_op!(self.db, |client| sql::declare_schedules(client, &names)).await?;
            *declared = Some(Instant::now());
        }
        let (db_now, rows) = queue_op!(self.db, |client| sql::look_at_schedules(client, &names)).await?;
        // How far the database's clock is ahead of this machine's.
        let offset = db_now - self.clock.now();
        let rows: HashMap<&str, &sql::ScheduleRow> = rows.iter().map(|r| (r.name.as_str(), r)).collect();

        let mut plans = Vec::with_capacity(self.schedules.len());
        for periodic in &self.schedules {
            let row = rows.get(periodic.name());
            let Some((row, cursor)) = row.and_then(|r| Some((*r, r.cursor?))) else {
                // Forgotten (or never declared) meanwhile: declare it again now.
                *declared = None;
                continue;
            };
            let plan = periodic.plan(cursor, db_now);
            let labels = [periodic.name()];
            let last_run = plan.runs.last().copied().or(row.last_run);
            self.metrics.schedule_last_run.with_label_values(&labels).set(last_run.map_or(0.0, unix_seconds));
            self.metrics.schedule_missed.with_label_values(&labels).set(row.missed + plan.missed as i64);
            if let Some(next) = plan.next {
                self.metrics.schedule_next_run.with_label_values(&labels).set(unix_seconds(next));
            }
            plans.push((periodic, cursor, plan));
        }

        let advances: Vec<Advance<'_>> = plans
            .iter()
            .filter(|(_, seen, plan)| plan.cursor > *seen)
            .map(|(periodic, seen, plan)| Advance {
                name: periodic.name(),
                seen: *seen,
                cursor: plan.cursor,
                missed: plan.missed as i64,
                runs: &plan.runs,
                job: periodic.job(),
            })
            .collect();
        if !advances.is_empty() {
            let moved =
                queue_op!(self.db, |client| sql::advance_schedules(client, &advances, &self.worker)).await?;
            if moved.iter().any(|(_, enqueued)| *enqueued > 0) {
                // Due already: claim them now rather than at the next poll.
                self.wake.notify_one();
            }
            for (name, enqueued) in moved {
                self.metrics.schedule_enqueued.with_label_values(&[&name]).inc_by(enqueued.max(0) as u64);
                if enqueued > 0 {
                    tracing::debug!(schedule = %name, enqueued, "enqueued due occurrences");
                }
            }
            for advance in advances.iter().filter(|a| a.missed > 0) {
                tracing::warn!(
                    schedule = advance.name,
                    missed = advance.missed,
                    "skipped missed occurrences"
                );
            }
        }
        if declared.is_none() {
            return Ok(MIN_PAUSE);
        }
        let Some(next) = plans.iter().filter_map(|(_, _, plan)| plan.next).min() else {
            return Ok(MAX_PAUSE);
        };
        // The database's clock, estimated from this machine's.
        let db_clock = self.clock.now() + offset;
        Ok((next - db_clock).to_std().unwrap_or(Duration::ZERO).clamp(MIN_PAUSE, MAX_PAUSE))
    }
}

fn unix_seconds(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}
