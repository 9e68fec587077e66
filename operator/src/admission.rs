//! Admission: a Tidepool's pods start holding connections only when the
//! budget has room for them.
//!
//! Kubernetes 1.34 Deployments do not count terminating pods (KEP-3973), so
//! a rollout, a scale-down or a pod deleted by hand starts a replacement
//! while the pod it replaces still drains and holds its connections. Every
//! app pod is therefore created with the scheduling gate [`GATE`]: until it
//! is removed the pod is not scheduled, and nothing in it runs or connects.
//! The controller removes it, oldest pod first, only while the costs of the
//! admitted pods that have not finished (running or terminating) plus the
//! new pod's stay within `available`, as Kueue holds pods until their quota
//! admits them. A pod that does not fit waits, and every pod after it too:
//! first come, first served, so a large pod is never starved by small ones.
//! When a terminating pod goes, the pod watch starts the next pass.
//!
//! A pod of a singleton tier (Celery beat, a clock: a process that must
//! never run twice) also waits while another pod of that tier holds, that
//! is until the one it replaces has finished or is gone, whatever made the
//! replacement (a rollout, a deleted or evicted pod). It waits for its
//! predecessor, not for the budget, so the pods behind it in the queue do
//! not wait for it.
//!
//! Pure: the controller lists the pods, calls [`admit`] and removes the
//! gates it names.

/// The scheduling gate on every app pod the operator renders.
pub const GATE: &str = "tidepool.dev/connection-budget";

/// A pod of one Tidepool, as admission sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivePod {
    pub name: String,
    /// When it was created (seconds since the epoch): its place in the queue.
    pub created: i64,
    /// It still carries [`GATE`].
    pub gated: bool,
    /// It is being deleted.
    pub terminating: bool,
    /// Succeeded or Failed: its containers hold nothing.
    pub finished: bool,
    /// Its annotated connections: share plus direct ones.
    pub cost: u32,
    /// It belongs to the singleton tier: at most one such pod holds.
    pub singleton: bool,
}

impl LivePod {
    /// Whether it can hold connections now: admitted and not finished,
    /// running or terminating.
    fn holds(&self) -> bool {
        !self.gated && !self.finished
    }

    fn waits(&self) -> bool {
        self.gated && !self.terminating && !self.finished
    }
}

/// What one pass decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The pods whose gate to remove, oldest first.
    pub admit: Vec<String>,
    /// What the pods that hold connections may hold, those admitted now
    /// included: the Tidepool's `livePeak`.
    pub live_cost: u64,
    /// The pods still waiting for the budget.
    pub waiting: usize,
    /// The cost of the first pod still waiting for the budget.
    pub next_cost: Option<u32>,
    /// A singleton pod waits for its predecessor to finish or go.
    pub singleton_waits: bool,
}

/// Admits the waiting pods, oldest first, while they fit in `available`;
/// a singleton pod only while no other singleton pod holds.
pub fn admit(pods: &[LivePod], available: u32) -> Admission {
    let mut live_cost: u64 = pods.iter().filter(|p| p.holds()).map(|p| u64::from(p.cost)).sum();
    let mut singleton_holds = pods.iter().any(|p| p.singleton && p.holds());
    let mut queue: Vec<&LivePod> = pods.iter().filter(|p| p.waits()).collect();
    queue.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut admitted = Vec::new();
    let mut singleton_waits = false;
    let mut blocked: Vec<&LivePod> = Vec::new();
    for pod in queue {
        if pod.singleton && singleton_holds {
            singleton_waits = true;
        } else if blocked.is_empty() && live_cost + u64::from(pod.cost) <= u64::from(available) {
            live_cost += u64::from(pod.cost);
            singleton_holds |= pod.singleton;
            admitted.push(pod.name.clone());
        } else {
            blocked.push(pod);
        }
    }
    Admission {
        admit: admitted,
        live_cost,
        waiting: blocked.len(),
        next_cost: blocked.first().map(|p| p.cost),
        singleton_waits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(name: &str, created: i64, cost: u32) -> LivePod {
        LivePod {
            name: name.into(),
            created,
            gated: true,
            terminating: false,
            finished: false,
            cost,
            singleton: false,
        }
    }

    fn singleton(pod: LivePod) -> LivePod {
        LivePod { singleton: true, ..pod }
    }

    fn admitted(mut pod: LivePod) -> LivePod {
        pod.gated = false;
        pod
    }

    #[test]
    fn terminating_pods_hold_their_share_until_they_are_gone() {
        let old = LivePod { terminating: true, ..admitted(pod("old", 1, 30)) };
        let pods = [admitted(pod("a", 1, 30)), old.clone(), pod("new", 5, 30)];
        let waiting = admit(&pods, 70);
        assert_eq!(waiting.admit, Vec::<String>::new());
        assert_eq!((waiting.live_cost, waiting.waiting, waiting.next_cost), (60, 1, Some(30)));
        // The old pod goes: the new one is admitted.
        let after = admit(&[pods[0].clone(), pods[2].clone()], 70);
        assert_eq!(after.admit, ["new"]);
        assert_eq!((after.live_cost, after.waiting), (60, 0));
    }

    #[test]
    fn oldest_first_and_no_overtaking() {
        let pods = [pod("big", 2, 50), pod("small", 3, 5), pod("first", 1, 10), admitted(pod("up", 0, 20))];
        let pass = admit(&pods, 60);
        assert_eq!(pass.admit, ["first"], "the big pod does not fit and the small one waits behind it");
        assert_eq!((pass.live_cost, pass.waiting, pass.next_cost), (30, 2, Some(50)));
    }

    #[test]
    fn finished_pods_hold_nothing_and_deleted_gated_pods_are_not_admitted() {
        let done = LivePod { finished: true, ..admitted(pod("job", 0, 40)) };
        let gone = LivePod { terminating: true, ..pod("gone", 1, 10) };
        let pass = admit(&[done, gone, pod("web", 2, 40)], 40);
        assert_eq!(pass.admit, ["web"]);
        assert_eq!((pass.live_cost, pass.waiting), (40, 0));
    }

    #[test]
    fn a_singleton_waits_for_its_predecessor_without_holding_up_the_queue() {
        // The old beat pod terminates (a rollout, a deleted pod): it still
        // runs, so its replacement waits, and the web pod behind it does not.
        let old = LivePod { terminating: true, ..admitted(singleton(pod("beat-old", 1, 1))) };
        let pods = [old.clone(), singleton(pod("beat-new", 2, 1)), pod("web", 3, 10)];
        let pass = admit(&pods, 100);
        assert_eq!(pass.admit, ["web"]);
        assert_eq!((pass.waiting, pass.next_cost, pass.singleton_waits), (0, None, true));
        // The old pod has gone (or finished, as an evicted pod does).
        let finished = LivePod { finished: true, ..old };
        let pass = admit(&[finished, pods[1].clone()], 100);
        assert_eq!(pass.admit, ["beat-new"]);
        assert!(!pass.singleton_waits);
    }

    #[test]
    fn two_waiting_singletons_are_never_admitted_together() {
        let pods = [singleton(pod("b", 2, 1)), singleton(pod("a", 1, 1)), pod("web", 3, 1)];
        let pass = admit(&pods, 100);
        assert_eq!(pass.admit, ["a", "web"], "the older one first, the other waits for it");
        assert!(pass.singleton_waits);
        assert_eq!(pass.live_cost, 2);
    }

    #[test]
    fn a_singleton_that_does_not_fit_waits_for_the_budget_in_its_turn() {
        let pods = [admitted(pod("web-1", 0, 9)), singleton(pod("beat", 1, 2)), pod("web-2", 2, 1)];
        let pass = admit(&pods, 10);
        assert_eq!(pass.admit, Vec::<String>::new(), "first come, first served: web-2 waits behind the beat");
        assert_eq!((pass.waiting, pass.next_cost, pass.singleton_waits), (2, Some(2), false));
    }

    fn arb_pod() -> impl Strategy<Value = LivePod> {
        (0i64..20, any::<bool>(), any::<bool>(), any::<bool>(), 0u32..40, any::<bool>()).prop_map(
            |(created, gated, terminating, finished, cost, singleton)| LivePod {
                name: String::new(),
                created,
                gated,
                terminating,
                finished,
                cost,
                singleton,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// Admission never takes the live pods past `available`, admits a
        /// prefix of the queue, and stops only at a pod that does not fit.
        #[test]
        fn admission_stays_within_the_budget(pods in proptest::collection::vec(arb_pod(), 0..12), available in 0u32..200) {
            let pods: Vec<LivePod> =
                pods.into_iter().enumerate().map(|(i, p)| LivePod { name: format!("p{i}"), ..p }).collect();
            let before: u64 = pods.iter().filter(|p| p.holds()).map(|p| u64::from(p.cost)).sum();
            let pass = admit(&pods, available);
            let cost_of = |name: &str| pods.iter().find(|p| p.name == name && p.waits()).map(|p| u64::from(p.cost));
            let added: u64 = pass.admit.iter().filter_map(|n| cost_of(n)).sum();
            prop_assert_eq!(pass.live_cost, before + added);
            if !pass.admit.is_empty() {
                prop_assert!(pass.live_cost <= u64::from(available));
            }
            let waiting = pods.iter().filter(|p| p.waits()).count();
            let singletons_held_back = pods.iter().filter(|p| p.waits() && p.singleton).count();
            prop_assert!(pass.admit.len() + pass.waiting <= waiting);
            prop_assert!(pass.admit.len() + pass.waiting + singletons_held_back >= waiting);
            if let Some(next) = pass.next_cost {
                prop_assert!(pass.live_cost + u64::from(next) > u64::from(available));
            }
        }

        /// Whatever the pods, at most one singleton pod holds after a pass
        /// unless more than one held before it (which no pass makes), and a
        /// singleton is admitted only when none held.
        #[test]
        fn at_most_one_singleton_holds(pods in proptest::collection::vec(arb_pod(), 0..12), available in 0u32..200) {
            let pods: Vec<LivePod> =
                pods.into_iter().enumerate().map(|(i, p)| LivePod { name: format!("p{i}"), ..p }).collect();
            let held = pods.iter().filter(|p| p.singleton && p.holds()).count();
            let pass = admit(&pods, available);
            let admitted_singletons = pods
                .iter()
                .filter(|p| p.singleton && p.waits() && pass.admit.contains(&p.name))
                .count();
            prop_assert!(admitted_singletons <= 1);
            if held > 0 {
                prop_assert_eq!(admitted_singletons, 0);
            }
        }
    }
}
