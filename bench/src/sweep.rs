//! The data-plane sweep: every (repetition, service count) runs every mode
//! in a fresh [`Cell`], in an order rotated each time (modes interleaved, so
//! drift in the machine spreads over all of them); inside a cell every
//! workload runs with 1 and with several client threads, CRR last (it leaves
//! TIME_WAIT sockets and, in the DNAT modes, conntrack entries behind).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cpu::CpuWindow;
use crate::load::{LoadResult, Workload};
use crate::modes::{Cell, Mode, Pinning, ServiceSet};

/// What a sweep measures, and for how long.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub repetitions: usize,
    pub service_counts: Vec<usize>,
    /// haproxy's per-connection path does not depend on other services (one
    /// listening socket each), so it runs at these counts only.
    pub haproxy_counts: Vec<usize>,
    /// svclb with its packet counters off runs at these counts only: the
    /// counting programs do no per-service work, and the counts left out
    /// are those where svclbd's start-up makes a cell expensive.
    #[serde(default)]
    pub nocount_counts: Vec<usize>,
    pub modes: Vec<Mode>,
    pub workloads: Vec<Workload>,
    pub threads: Vec<usize>,
    pub warmup_ms: u64,
    pub duration_ms: u64,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            name: "full".into(),
            repetitions: 3,
            service_counts: vec![1, 1_000, 10_000, 100_000],
            haproxy_counts: vec![1],
            // 100,000 services: svclbd takes ~30 s to start per cell.
            nocount_counts: vec![1, 1_000, 10_000],
            modes: Mode::ALL.to_vec(),
            // CRR last: see the module doc.
            workloads: vec![Workload::Rr, Workload::Udp, Workload::Stream, Workload::Crr],
            threads: vec![1, 4],
            warmup_ms: 250,
            duration_ms: 1500,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            name: "quick".into(),
            repetitions: 1,
            service_counts: vec![1, 1_000],
            duration_ms: 400,
            warmup_ms: 100,
            ..Plan::full()
        }
    }

    /// Whether `mode` runs at `n` services in this sweep.
    pub fn runs_at(&self, mode: Mode, n: usize) -> bool {
        match mode {
            Mode::Haproxy => self.haproxy_counts.contains(&n),
            Mode::SvclbNocount => self.nocount_counts.contains(&n),
            Mode::SvclbHookOnly => false,
            _ => true,
        }
    }

    fn cells(&self) -> Vec<(usize, usize, Mode)> {
        let mut cells = Vec::new();
        for rep in 0..self.repetitions {
            for (ci, &n) in self.service_counts.iter().enumerate() {
                let mut modes: Vec<Mode> = self
                    .modes
                    .iter()
                    .copied()
                    .filter(|&m| self.runs_at(m, n))
                    .collect();
                let len = modes.len().max(1);
                modes.rotate_left((rep * 2 + ci) % len);
                cells.extend(modes.into_iter().map(|m| (rep, n, m)));
            }
        }
        cells
    }

    fn runs_per_cell(&self, mode: Mode) -> usize {
        self.workloads.iter().filter(|&&w| mode.supports(w)).count() * self.threads.len()
    }

    /// Measurement time alone, for the progress estimate.
    pub fn estimate(&self) -> Duration {
        let runs: usize = self
            .cells()
            .iter()
            .map(|&(_, _, m)| self.runs_per_cell(m))
            .sum();
        Duration::from_millis(runs as u64 * (self.warmup_ms + self.duration_ms + 60))
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub rep: usize,
    pub services: usize,
    pub mode: Mode,
    pub workload: Workload,
    pub threads: usize,
    pub result: Option<LoadResult>,
    pub error: Option<String>,
    /// svclb modes: svclbd's own CPU (user + system) over the run, warm-up
    /// included, in % of one CPU, so that its cost never hides in a
    /// throughput figure.
    #[serde(default)]
    pub svclbd_cpu_percent: Option<f64>,
}

/// One cell's set-up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Setup {
    pub rep: usize,
    pub services: usize,
    pub mode: Mode,
    pub secs: Option<f64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SweepData {
    pub runs: Vec<Run>,
    pub setups: Vec<Setup>,
    pub wall_secs: f64,
}

/// The headline figure of a run: ops/s, or bits/s for STREAM.
pub fn primary(w: Workload, r: &LoadResult) -> f64 {
    if w == Workload::Stream {
        r.bits_per_sec
    } else {
        r.ops_per_sec
    }
}

pub fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

pub fn run(plan: &Plan) -> SweepData {
    let started = Instant::now();
    let cells = plan.cells();
    let total_runs: usize = cells.iter().map(|&(_, _, m)| plan.runs_per_cell(m)).sum();
    println!(
        "sweep {}: {} cells, {} runs, at least {:.0} s of measurement",
        plan.name,
        cells.len(),
        total_runs,
        plan.estimate().as_secs_f64()
    );
    let warmup = Duration::from_millis(plan.warmup_ms);
    let duration = Duration::from_millis(plan.duration_ms);
    let mut data = SweepData::default();
    let mut done = 0usize;
    for (rep, n, mode) in cells {
        let cell = set_up(rep, n, mode, &mut data.setups);
        for &workload in &plan.workloads {
            if !mode.supports(workload) {
                continue;
            }
            for &threads in &plan.threads {
                done += 1;
                let label = format!("[{done}/{total_runs}]");
                data.runs.push(measure(
                    &label,
                    rep,
                    n,
                    mode,
                    cell.as_ref(),
                    workload,
                    threads,
                    warmup,
                    duration,
                    Pinning::Sweep,
                ));
            }
        }
        drop(cell);
    }
    data.wall_secs = started.elapsed().as_secs_f64();
    data
}

/// Sets up one cell, recording its set-up time (or failure) in `setups`.
pub fn set_up(rep: usize, n: usize, mode: Mode, setups: &mut Vec<Setup>) -> Option<Cell> {
    match Cell::new(mode, ServiceSet::new(n, 1)) {
        Ok(cell) => {
            println!(
                "[rep {} | {n} services | {}] set up in {:.2} s",
                rep + 1,
                mode.name(),
                cell.setup_secs
            );
            setups.push(Setup {
                rep,
                services: n,
                mode,
                secs: Some(cell.setup_secs),
                error: None,
            });
            Some(cell)
        }
        Err(e) => {
            eprintln!(
                "[rep {} | {n} services | {}] SET-UP FAILED: {e:#}",
                rep + 1,
                mode.name()
            );
            setups.push(Setup {
                rep,
                services: n,
                mode,
                secs: None,
                error: Some(format!("{e:#}")),
            });
            None
        }
    }
}

/// One run of `workload` in `cell` (a failed run if the cell could not be
/// set up), printed on a line that starts with `label`.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    label: &str,
    rep: usize,
    services: usize,
    mode: Mode,
    cell: Option<&Cell>,
    workload: Workload,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    pinning: Pinning,
) -> Run {
    let daemon = cell
        .and_then(Cell::daemon_pid)
        .and_then(|pid| CpuWindow::start(pid).ok());
    let outcome = match cell {
        Some(cell) => cell.run_pinned(workload, threads, warmup, duration, pinning),
        None => Err(anyhow::anyhow!("set-up failed")),
    };
    let svclbd_cpu_percent = daemon.and_then(|w| w.percent().ok());
    let (result, error) = match outcome {
        Ok(r) => {
            let errs = if r.errors > 0 {
                format!(" ERRORS {} {:?}", r.errors, r.error_kinds)
            } else {
                String::new()
            };
            let lat = r
                .p99_us
                .map(|p| format!(" p50 {:.0} p99 {p:.0} µs", r.p50_us.unwrap_or(0.0)))
                .unwrap_or_default();
            let daemon = svclbd_cpu_percent
                .map(|p| format!(" (svclbd {p:.1}% CPU)"))
                .unwrap_or_default();
            println!(
                "  {label} {:<6} x{threads}: {}{}{lat}{errs}{daemon}",
                workload.name(),
                human(primary(workload, &r)),
                if workload == Workload::Stream {
                    "bit/s"
                } else {
                    " ops/s"
                },
            );
            (Some(r), None)
        }
        Err(e) => {
            eprintln!("  {label} {} x{threads}: FAILED: {e:#}", workload.name());
            (None, Some(format!("{e:#}")))
        }
    };
    Run {
        rep,
        services,
        mode,
        workload,
        threads,
        result,
        error,
        svclbd_cpu_percent,
    }
}

/// Median, minimum and maximum of a set of values.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// The finite `values`, sorted; None when there are none.
pub fn sorted_finite(values: &[f64]) -> Option<Vec<f64>> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v)
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let v = sorted_finite(values)?;
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// `mine` against `base` (the same cell in another mode): the ratio of the
/// medians of `value`, and the ratios within each repetition (the runs
/// that were measured side by side).
pub fn compare(
    mine: &[&Run],
    base: &[&Run],
    value: &dyn Fn(&Run) -> Option<f64>,
) -> (Option<f64>, Option<Spread>) {
    let median =
        |runs: &[&Run]| Spread::of(&runs.iter().filter_map(|r| value(r)).collect::<Vec<_>>());
    let of_medians = match (median(mine), median(base)) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    };
    let paired: Vec<f64> = mine
        .iter()
        .filter_map(|r| {
            let b = value(base.iter().find(|b| b.rep == r.rep)?)?;
            let a = value(r)?;
            (b > 0.0).then(|| a / b)
        })
        .collect();
    (of_medians, Spread::of(&paired))
}

/// The statistics of one (services, mode, workload, threads) over the repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub services: usize,
    pub mode: Mode,
    pub workload: Workload,
    pub threads: usize,
    /// ops/s, or bits/s for STREAM.
    pub value: Option<Spread>,
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub p999_us: Option<Spread>,
    pub errors: u64,
    pub failed_runs: usize,
    /// median(value) / median(direct's value), same services and threads.
    pub ratio: Option<f64>,
    /// The same ratio per repetition (direct of the same repetition and
    /// service count, measured minutes apart at most).
    pub paired_ratio: Option<Spread>,
    /// median(p99) / median(direct's p99).
    pub p99_ratio: Option<f64>,
    /// svclb modes: svclbd's own CPU over each run, % of one CPU.
    pub svclbd_cpu_percent: Option<Spread>,
}

type Key = (usize, Mode, Workload, usize);

pub fn summarize(data: &SweepData) -> Vec<Summary> {
    let mut groups: BTreeMap<Key, Vec<&Run>> = BTreeMap::new();
    for r in &data.runs {
        groups
            .entry((r.services, r.mode, r.workload, r.threads))
            .or_default()
            .push(r);
    }
    let spread = |runs: &[&Run], f: &dyn Fn(&LoadResult) -> Option<f64>| {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.result.as_ref().and_then(f))
            .collect();
        Spread::of(&v)
    };
    let mut out = Vec::new();
    for (&(services, mode, workload, threads), runs) in &groups {
        let value = |r: &Run| r.result.as_ref().map(|x| primary(workload, x));
        let p99 = |r: &Run| r.result.as_ref()?.p99_us;
        let direct = groups.get(&(services, Mode::Direct, workload, threads));
        let (ratio, paired_ratio) = direct.map_or((None, None), |d| compare(runs, d, &value));
        let p99_ratio = direct.and_then(|d| compare(runs, d, &p99).0);
        out.push(Summary {
            services,
            mode,
            workload,
            threads,
            value: spread(runs, &|r| Some(primary(workload, r))),
            p50_us: spread(runs, &|r| r.p50_us),
            p99_us: spread(runs, &|r| r.p99_us),
            p999_us: spread(runs, &|r| r.p999_us),
            errors: runs
                .iter()
                .filter_map(|r| r.result.as_ref().map(|x| x.errors))
                .sum(),
            failed_runs: runs.iter().filter(|r| r.result.is_none()).count(),
            ratio,
            paired_ratio,
            p99_ratio,
            svclbd_cpu_percent: Spread::of(
                &runs
                    .iter()
                    .filter_map(|r| r.svclbd_cpu_percent)
                    .collect::<Vec<_>>(),
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_median_min_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn every_mode_runs_once_per_rep_and_count() {
        let plan = Plan::full();
        let cells = plan.cells();
        // haproxy only at 1 service, svclb-nocount at all counts but 100,000.
        assert_eq!(cells.len(), 3 * (4 * 5 + 1 + 3));
        for rep in 0..3 {
            for &n in &plan.service_counts {
                let modes: Vec<Mode> = cells
                    .iter()
                    .filter(|c| c.0 == rep && c.1 == n)
                    .map(|c| c.2)
                    .collect();
                let expected = match n {
                    1 => 7,
                    100_000 => 5,
                    _ => 6,
                };
                assert_eq!(modes.len(), expected, "{n} services");
            }
        }
    }
}
