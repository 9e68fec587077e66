//! Which of its queues the claimer visits in a round, and in what order.
//!
//! A worker serving several queues claims from them round-robin: each round
//! starts one queue further on, so no queue is always served last. Visiting
//! a queue costs a claim statement even when it is empty. A worker kept busy
//! by one queue (every round a full batch, no pause between rounds) would
//! spend a statement on an empty second queue every other round: an eighth
//! of its throughput in the benchmark (docs/benchmarks.md §22).
//!
//! So a queue that came back short (fewer jobs than asked: it is empty for
//! now) is passed over by the rounds that follow straight on, for a back-off
//! that doubles from `--poll-interval-min` to `--poll-interval-max` while it
//! stays empty: the same pace at which an idle worker looks at all of its
//! queues. A queue whose rate limit is full is passed over until the limit
//! has room, exactly. A wake (a job was enqueued, [`super::worker::Worker::waker`])
//! ends every back-off, and any pause of the claimer ends the passing over
//! (the back-off keeps its length, and doubles if the queue is still empty).
//! So a job in a quiet queue waits no longer than it would on an idle worker.
//!
//! Pure: the caller passes the clock in.

use std::time::{Duration, Instant};

/// How a queue's claim went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Visit {
    /// As many jobs as were asked for: there may be more.
    Full,
    /// Fewer: the queue is empty for now.
    Short,
    /// Fewer, and a rate limit of the queue has no room for this long.
    Limited(Duration),
}

#[derive(Clone, Copy, Debug)]
struct QueueState {
    /// Passed over until then, unless the claimer pauses or is woken.
    skip_until: Option<Instant>,
    /// When its rate limit has room again, if the last claim found it full.
    limit_room: Option<Instant>,
    /// The next back-off if the queue comes back short again.
    backoff: Duration,
}

/// The claimer's rotation over its queues (see the module doc).
#[derive(Debug)]
pub(crate) struct Rotation {
    next: usize,
    queues: Vec<QueueState>,
    min: Duration,
    max: Duration,
}

impl Rotation {
    /// A rotation over `queues` queues, backing off from `min` to `max`.
    pub(crate) fn new(queues: usize, min: Duration, max: Duration) -> Self {
        let state = QueueState { skip_until: None, limit_room: None, backoff: min };
        Self { next: 0, queues: vec![state; queues], min, max }
    }

    /// The queues to visit this round, in order, into `visits` (cleared
    /// first). Every queue, from the one after the last round's first, less
    /// those passed over; if that leaves none, every queue.
    pub(crate) fn plan(&mut self, now: Instant, visits: &mut Vec<usize>) {
        visits.clear();
        let n = self.queues.len();
        let order = (0..n).map(|i| (self.next + i) % n);
        visits
            .extend(order.clone().filter(|&q| self.queues[q].skip_until.map_or(true, |until| now >= until)));
        if visits.is_empty() {
            visits.extend(order);
        }
        self.next = (self.next + 1) % n.max(1);
    }

    /// Records how the claim from queue `index` went.
    pub(crate) fn visited(&mut self, index: usize, visit: Visit, now: Instant) {
        let Some(queue) = self.queues.get_mut(index) else { return };
        match visit {
            Visit::Full => *queue = QueueState { skip_until: None, limit_room: None, backoff: self.min },
            Visit::Short => {
                queue.skip_until = Some(now + queue.backoff);
                queue.limit_room = None;
                queue.backoff = (queue.backoff * 2).min(self.max);
            }
            Visit::Limited(frees) => {
                queue.skip_until = Some(now + frees);
                queue.limit_room = queue.skip_until;
            }
        }
    }

    /// How soon a queue whose rate limit was found full has room again, if
    /// one was (a round that passed it over still knows when to look).
    pub(crate) fn soonest_limit_room(&self, now: Instant) -> Option<Duration> {
        self.queues.iter().filter_map(|q| q.limit_room).min().map(|room| room.saturating_duration_since(now))
    }

    /// The claimer paused between rounds: the next round visits every queue.
    pub(crate) fn paused(&mut self) {
        for queue in &mut self.queues {
            queue.skip_until = None;
        }
    }

    /// The claimer was woken (a job may be waiting in any queue): every
    /// back-off starts again from the shortest.
    pub(crate) fn woken(&mut self) {
        for queue in &mut self.queues {
            *queue = QueueState { skip_until: None, limit_room: None, backoff: self.min };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_millis(250);

    fn plan(rotation: &mut Rotation, now: Instant) -> Vec<usize> {
        let mut visits = Vec::new();
        rotation.plan(now, &mut visits);
        visits
    }

    #[test]
    fn rounds_start_one_queue_further_on() {
        let now = Instant::now();
        let mut rotation = Rotation::new(3, MIN, MAX);
        assert_eq!(plan(&mut rotation, now), [0, 1, 2]);
        assert_eq!(plan(&mut rotation, now), [1, 2, 0]);
        assert_eq!(plan(&mut rotation, now), [2, 0, 1]);
        assert_eq!(plan(&mut rotation, now), [0, 1, 2]);
    }

    #[test]
    fn one_queue_is_always_visited() {
        let now = Instant::now();
        let mut rotation = Rotation::new(1, MIN, MAX);
        rotation.visited(0, Visit::Short, now);
        assert_eq!(plan(&mut rotation, now), [0]);
        let mut none = Rotation::new(0, MIN, MAX);
        assert!(plan(&mut none, now).is_empty());
    }

    #[test]
    fn a_short_queue_is_passed_over_for_a_doubling_back_off() {
        let t0 = Instant::now();
        let mut rotation = Rotation::new(2, MIN, MAX);
        rotation.visited(1, Visit::Short, t0);
        assert_eq!(plan(&mut rotation, t0), [0]);
        assert_eq!(plan(&mut rotation, t0 + MIN - Duration::from_millis(1)), [0]);
        let t1 = t0 + MIN;
        assert_eq!(plan(&mut rotation, t1), [0, 1]);
        // Still empty: twice as long this time, and so on up to the longest.
        rotation.visited(1, Visit::Short, t1);
        assert_eq!(plan(&mut rotation, t1 + MIN), [0]);
        assert_eq!(plan(&mut rotation, t1 + 2 * MIN), [0, 1]);
        let mut t = t1 + 2 * MIN;
        for _ in 0..10 {
            rotation.visited(1, Visit::Short, t);
            t += MAX;
        }
        assert_eq!(plan(&mut rotation, t - Duration::from_millis(1)), [0]);
        assert_eq!(plan(&mut rotation, t).len(), 2);
    }

    #[test]
    fn a_full_claim_ends_the_back_off() {
        let t0 = Instant::now();
        let mut rotation = Rotation::new(2, MIN, MAX);
        rotation.visited(1, Visit::Short, t0);
        rotation.visited(1, Visit::Short, t0 + MIN);
        rotation.visited(1, Visit::Full, t0 + 3 * MIN);
        assert_eq!(plan(&mut rotation, t0 + 3 * MIN), [0, 1]);
        rotation.visited(1, Visit::Short, t0 + 3 * MIN);
        assert_eq!(plan(&mut rotation, t0 + 4 * MIN), [1, 0]);
    }

    #[test]
    fn a_full_limit_is_passed_over_until_it_has_room() {
        let t0 = Instant::now();
        let mut rotation = Rotation::new(2, MIN, MAX);
        let frees = Duration::from_millis(400);
        rotation.visited(0, Visit::Limited(frees), t0);
        assert_eq!(plan(&mut rotation, t0 + frees - Duration::from_millis(1)), [1]);
        assert_eq!(
            rotation.soonest_limit_room(t0 + Duration::from_millis(100)),
            Some(Duration::from_millis(300))
        );
        assert_eq!(plan(&mut rotation, t0 + frees), [1, 0]);
        rotation.visited(0, Visit::Short, t0 + frees);
        assert_eq!(rotation.soonest_limit_room(t0 + frees), None);
    }

    #[test]
    fn if_every_queue_is_passed_over_every_queue_is_visited() {
        let t0 = Instant::now();
        let mut rotation = Rotation::new(2, MIN, MAX);
        rotation.visited(0, Visit::Short, t0);
        rotation.visited(1, Visit::Short, t0);
        assert_eq!(plan(&mut rotation, t0), [0, 1]);
    }

    #[test]
    fn a_pause_ends_the_passing_over_but_not_the_back_off() {
        let t0 = Instant::now();
        let mut rotation = Rotation::new(2, MIN, MAX);
        rotation.visited(1, Visit::Short, t0);
        rotation.paused();
        assert_eq!(plan(&mut rotation, t0), [0, 1]);
        rotation.visited(1, Visit::Short, t0);
        assert_eq!(plan(&mut rotation, t0 + MIN), [0]);
        assert_eq!(plan(&mut rotation, t0 + 2 * MIN), [0, 1]);
    }

    #[test]
    fn a_wake_starts_every_back_off_again() {
        let t0 = Instant::now();
        let mut rotation = Rotation::new(2, MIN, MAX);
        rotation.visited(1, Visit::Short, t0);
        rotation.visited(1, Visit::Short, t0 + MIN);
        rotation.woken();
        assert_eq!(plan(&mut rotation, t0 + MIN), [0, 1]);
        rotation.visited(1, Visit::Short, t0 + MIN);
        assert_eq!(plan(&mut rotation, t0 + 2 * MIN), [1, 0]);
    }
}
