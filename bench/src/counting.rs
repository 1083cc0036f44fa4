//! What svclb's packet counting costs: svclb against svclb with
//! `svclbd --no-packet-counters` (the two `cgroup_skb` counting programs
//! left unattached, everything else the same), against svclb with no-op
//! programs on those hooks (`--packet-counters-hook-only`: what the hook
//! itself costs), and `direct` for scale, on STREAM and RR at one service,
//! with 1 and several client threads.
//!
//! Unlike the sweep, each repetition sets up its cells side by side (a fresh
//! sandbox per mode; the svclbd instances are each attached to their own
//! sandbox's cgroup only) and alternates them run by run, in an order rotated
//! every time: the runs compared are seconds apart rather than minutes, so
//! drift from the rest of the machine's load falls mostly on all modes
//! alike, and the per-repetition (paired) ratio cancels most of it.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::load::Workload;
use crate::modes::{online_cpus, Mode, Pinning};
use crate::sweep::{compare, measure, primary, set_up, Run, Setup, Spread};

/// The bound: counting may cost at most 3% (svclb >= 0.97 x svclb-nocount).
pub const MAX_COST: f64 = 0.03;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountingPlan {
    pub name: String,
    pub repetitions: usize,
    pub services: usize,
    pub modes: Vec<Mode>,
    pub workloads: Vec<Workload>,
    pub threads: Vec<usize>,
    /// How runs of more than 1 client thread are pinned.
    #[serde(default)]
    pub pinning: Pinning,
    pub warmup_ms: u64,
    pub duration_ms: u64,
}

impl CountingPlan {
    /// About 13 minutes on a 2-vCPU machine: many short runs, since the
    /// noise (other work on the machine) comes in bursts; at 15 repetitions
    /// the same workload's cost moved by 3 points from one run to the next.
    pub fn full() -> CountingPlan {
        CountingPlan {
            name: "full".into(),
            repetitions: 30,
            services: 1,
            modes: vec![
                Mode::Direct,
                Mode::Svclb,
                Mode::SvclbNocount,
                Mode::SvclbHookOnly,
            ],
            workloads: vec![Workload::Stream, Workload::Rr],
            // 1 client thread, and one per CPU (each with its echo server
            // on the same CPU).
            threads: vec![1, online_cpus().max(2)],
            pinning: Pinning::Pairs,
            warmup_ms: 200,
            duration_ms: 1000,
        }
    }

    /// A smoke run (about 30 s): far too few repetitions to resolve 3%.
    pub fn quick() -> CountingPlan {
        CountingPlan {
            name: "quick".into(),
            repetitions: 2,
            warmup_ms: 100,
            duration_ms: 400,
            ..CountingPlan::full()
        }
    }

    fn runs(&self) -> usize {
        self.repetitions * self.modes.len() * self.workloads.len() * self.threads.len()
    }

    /// Measurement time alone, for the progress estimate.
    pub fn estimate(&self) -> Duration {
        Duration::from_millis(self.runs() as u64 * (self.warmup_ms + self.duration_ms + 60))
    }
}

/// The statistics of one (mode, workload, threads) over the repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountingSummary {
    pub mode: Mode,
    pub workload: Workload,
    pub threads: usize,
    /// ops/s, or bits/s for STREAM.
    pub value: Option<Spread>,
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub errors: u64,
    pub failed_runs: usize,
    /// median(value) / median(svclb-nocount's value), same workload and threads.
    pub ratio_to_nocount: Option<f64>,
    /// The same ratio per repetition (the runs seconds apart).
    pub paired_to_nocount: Option<Spread>,
    /// median(value) / median(direct's value).
    pub ratio_to_direct: Option<f64>,
    pub paired_to_direct: Option<Spread>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CountingData {
    pub plan: CountingPlan,
    pub generated_utc: String,
    /// The commit measured (the report's machine section may be older).
    pub svclb_commit: String,
    pub wall_secs: f64,
    /// 1-minute load average of the machine at the start of each
    /// repetition and at the end (the bench's own load included).
    pub loadavg: Vec<f64>,
    pub runs: Vec<Run>,
    pub setups: Vec<Setup>,
    pub summaries: Vec<CountingSummary>,
}

impl CountingData {
    pub fn find(&self, mode: Mode, w: Workload, threads: usize) -> Option<&CountingSummary> {
        self.summaries
            .iter()
            .find(|s| s.mode == mode && s.workload == w && s.threads == threads)
    }
}

fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn run(plan: &CountingPlan, generated_utc: String, svclb_commit: String) -> CountingData {
    let started = Instant::now();
    let total = plan.runs();
    println!(
        "counting cost: {} repetitions x {} modes x {} workloads x {} thread counts = {total} runs, at least {:.0} s of measurement",
        plan.repetitions,
        plan.modes.len(),
        plan.workloads.len(),
        plan.threads.len(),
        plan.estimate().as_secs_f64()
    );
    let warmup = Duration::from_millis(plan.warmup_ms);
    let duration = Duration::from_millis(plan.duration_ms);
    let n = plan.services;
    let mut data = CountingData {
        plan: plan.clone(),
        generated_utc,
        svclb_commit,
        wall_secs: 0.0,
        loadavg: Vec::new(),
        runs: Vec::new(),
        setups: Vec::new(),
        summaries: Vec::new(),
    };
    let mut done = 0usize;
    let len = plan.modes.len().max(1);
    for rep in 0..plan.repetitions {
        let load = loadavg();
        data.loadavg.push(load);
        println!("[counting rep {}] load average {load:.2}", rep + 1);
        let mut order = plan.modes.clone();
        order.rotate_left(rep % len);
        // Set up in a rotated order (a cell set up later may see a warmer
        // machine), kept side by side for the whole repetition.
        let cells: BTreeMap<Mode, _> = order
            .iter()
            .map(|&m| (m, set_up(rep, n, m, &mut data.setups)))
            .collect();
        let mut k = 0usize;
        for &workload in &plan.workloads {
            for &threads in &plan.threads {
                let mut order = plan.modes.clone();
                order.rotate_left((rep + k) % len);
                k += 1;
                for mode in order {
                    done += 1;
                    let label = format!("[{done}/{total}] {:<13}", mode.name());
                    let cell = cells.get(&mode).and_then(Option::as_ref);
                    data.runs.push(measure(
                        &label,
                        rep,
                        n,
                        mode,
                        cell,
                        workload,
                        threads,
                        warmup,
                        duration,
                        plan.pinning,
                    ));
                }
            }
        }
    }
    data.loadavg.push(loadavg());
    data.wall_secs = started.elapsed().as_secs_f64();
    data.summaries = summarize(&data.runs);
    data
}

pub fn summarize(runs: &[Run]) -> Vec<CountingSummary> {
    let mut groups: BTreeMap<(Workload, usize, Mode), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((r.workload, r.threads, r.mode))
            .or_default()
            .push(r);
    }
    let value = |r: &Run| r.result.as_ref().map(|x| primary(r.workload, x));
    let spread = |runs: &[&Run], f: &dyn Fn(&Run) -> Option<f64>| {
        Spread::of(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    let ratio = |mine: &[&Run], base: Option<&Vec<&Run>>| match base {
        Some(base) => compare(mine, base, &value),
        None => (None, None),
    };
    groups
        .iter()
        .map(|(&(workload, threads, mode), runs)| {
            let (ratio_to_nocount, paired_to_nocount) =
                ratio(runs, groups.get(&(workload, threads, Mode::SvclbNocount)));
            let (ratio_to_direct, paired_to_direct) =
                ratio(runs, groups.get(&(workload, threads, Mode::Direct)));
            CountingSummary {
                mode,
                workload,
                threads,
                value: spread(runs, &value),
                p50_us: spread(runs, &|r| r.result.as_ref()?.p50_us),
                p99_us: spread(runs, &|r| r.result.as_ref()?.p99_us),
                errors: runs
                    .iter()
                    .filter_map(|r| r.result.as_ref().map(|x| x.errors))
                    .sum(),
                failed_runs: runs.iter().filter(|r| r.result.is_none()).count(),
                ratio_to_nocount,
                paired_to_nocount,
                ratio_to_direct,
                paired_to_direct,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadResult;

    fn run(rep: usize, mode: Mode, ops: f64) -> Run {
        Run {
            rep,
            services: 1,
            mode,
            workload: Workload::Rr,
            threads: 1,
            result: Some(LoadResult {
                ops_per_sec: ops,
                ..LoadResult::default()
            }),
            error: None,
            svclbd_cpu_percent: None,
        }
    }

    #[test]
    fn ratios_to_nocount_are_of_medians_and_paired() {
        let runs = vec![
            run(0, Mode::SvclbNocount, 100.0),
            run(0, Mode::Svclb, 95.0),
            run(1, Mode::SvclbNocount, 200.0),
            run(1, Mode::Svclb, 198.0),
            run(2, Mode::SvclbNocount, 110.0),
            run(2, Mode::Svclb, 99.0),
        ];
        let s = summarize(&runs);
        let svclb = s.iter().find(|x| x.mode == Mode::Svclb).unwrap();
        assert_eq!(svclb.ratio_to_nocount, Some(99.0 / 110.0));
        let p = svclb.paired_to_nocount.unwrap();
        assert_eq!((p.median, p.min, p.max), (0.95, 0.9, 0.99));
        assert!(svclb.ratio_to_direct.is_none());
    }

    #[test]
    fn plan_is_repeated_and_short() {
        let plan = CountingPlan::full();
        assert!(plan.repetitions >= 5);
        assert_eq!(plan.runs(), 30 * 4 * 2 * 2);
        // Under 15 minutes with set-up (about 1 s per svclb cell).
        assert!(plan.estimate() < Duration::from_secs(11 * 60));
    }
}
