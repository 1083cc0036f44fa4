//! IPVS's rate estimator (net/netfilter/ipvs/ip_vs_est.c), sample for
//! sample: every 2 s the counter deltas become scaled per-second rates
//! (`<<9` for connections and packets, i.e. 2^10 per second over 2 s; `<<4`
//! for bytes, 2^5), folded into an average with weight 1/4; the reported
//! rate rounds the average back. svclbd samples; `svclb-ctl rate` reads.

use std::collections::HashMap;

use anyhow::Result;
use serde::Serialize;
use svclb_common::{BackendStats, RateState};

use crate::{dataplane::Dataplane, pins::PinDir};

/// IPVS samples every 2 seconds.
pub const SAMPLE_INTERVAL_SECS: u64 = 2;

/// Folds one 2-second sample into the estimator.
pub fn sample(state: &mut RateState, now: BackendStats, now_ns: u64) {
    if state.sampled_ns == 0 {
        // First sample: a baseline, no rate yet.
        state.last = now;
        state.sampled_ns = now_ns;
        return;
    }
    let (avg, last) = (&mut state.avg, &state.last);
    fold(&mut avg.conns, now.conns, last.conns, PACKET_SHIFT);
    fold(&mut avg.in_pkts, now.in_pkts, last.in_pkts, PACKET_SHIFT);
    fold(&mut avg.out_pkts, now.out_pkts, last.out_pkts, PACKET_SHIFT);
    fold(&mut avg.in_bytes, now.in_bytes, last.in_bytes, BYTE_SHIFT);
    fold(
        &mut avg.out_bytes,
        now.out_bytes,
        last.out_bytes,
        BYTE_SHIFT,
    );
    state.last = now;
    state.sampled_ns = now_ns;
}

/// A 2 s delta of connections or packets as a per-second rate <<10.
const PACKET_SHIFT: u32 = 9;
/// A 2 s delta of bytes as a per-second rate <<5.
const BYTE_SHIFT: u32 = 4;

/// One counter's step of the average: avg += (rate - avg) / 4.
fn fold(avg: &mut u64, now: u64, last: u64, shift: u32) {
    // A counter that went back (its backend id was given to a new
    // backend) restarts from here.
    let delta = now.saturating_sub(last);
    let rate = delta.saturating_mul(1 << shift).min(i64::MAX as u64 >> 2) as i64;
    let old = (*avg).min(i64::MAX as u64 >> 2) as i64;
    *avg = (old + ((rate - old) >> 2)).max(0) as u64;
}

/// What `ipvsadm --rate` shows, per second: CPS, InPPS, OutPPS, InBPS,
/// OutBPS (bytes/s). Named like the counters they are rates of; the JSON
/// keeps ipvsadm's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rates {
    #[serde(rename = "cps")]
    pub conns: u64,
    #[serde(rename = "in_pps")]
    pub in_pkts: u64,
    #[serde(rename = "out_pps")]
    pub out_pkts: u64,
    #[serde(rename = "in_bps")]
    pub in_bytes: u64,
    #[serde(rename = "out_bps")]
    pub out_bytes: u64,
}

/// Reads the estimator the way IPVS reports it.
pub fn rates(state: &RateState) -> Rates {
    let pkts = |avg: u64| avg.saturating_add(0x1FF) >> 10;
    let bytes = |avg: u64| avg.saturating_add(0xF) >> 5;
    let avg = &state.avg;
    Rates {
        conns: pkts(avg.conns),
        in_pkts: pkts(avg.in_pkts),
        out_pkts: pkts(avg.out_pkts),
        in_bytes: bytes(avg.in_bytes),
        out_bytes: bytes(avg.out_bytes),
    }
}

/// Adds a backend's scaled averages to its service's (a service's rate is
/// its backends' sum, as EWMAs are linear).
pub fn add_to_service(service: &mut RateState, backend: &RateState) {
    service.avg.add(&backend.avg);
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of [`RateState::sampled_ns`].
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Keeps the rate estimators of every backend (IPVS's 2 s EWMA) on a
/// thread of its own, so that sampling a large node never delays a config
/// change. The estimators live in memory; the pinned rates map, which
/// `svclb-ctl rate` reads and a restarted svclbd continues from, is written
/// only where an estimate moved. Between applies a sample visits only the
/// backends whose counters the data plane flagged as moved (see
/// [`crate::moved`]) and those whose estimate is still decaying to zero,
/// so an idle node's sample costs a scan of the flags and little else; after
/// an apply (the layout's apply serial moved) the backend list is read
/// again and every backend is visited once.
pub struct RateSampler {
    pins: PinDir,
    /// The maps, opened once (again after an error).
    dp: Option<Dataplane>,
    /// Indexed by backend id (dense: ids are handed out lowest first):
    /// whose estimator it is (mark, address) and its state.
    states: Vec<Option<(BackendOwner, RateState)>>,
    /// The backends as of this apply serial.
    backends: Option<(u32, Vec<(u32, BackendOwner)>)>,
    /// Each backend id's counters at this sample; kept between samples.
    counters: Vec<BackendStats>,
    /// Backends whose estimate was not zero at the last sample: each sample
    /// visits them (they decay without traffic) and those that moved.
    decaying: Vec<u32>,
}

type BackendOwner = (u32, [u32; 4]);

impl RateSampler {
    pub fn new(pins: PinDir) -> Self {
        RateSampler {
            pins,
            dp: None,
            states: Vec::new(),
            backends: None,
            counters: Vec::new(),
            decaying: Vec::new(),
        }
    }

    /// Samples every 2 s until the process exits.
    pub fn spawn(mut self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("svclb-rates".into())
            .spawn(move || {
                let period = std::time::Duration::from_secs(SAMPLE_INTERVAL_SECS);
                let mut next = std::time::Instant::now();
                loop {
                    if let Err(e) = self.sample(monotonic_ns()) {
                        tracing::warn!("sampling rates: {e:#}");
                        // The pins may have been replaced: open them again.
                        self.dp = None;
                    }
                    next += period;
                    std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
                }
            })
            .expect("spawning the rate sampler")
    }

    /// One sample: every backend after an apply, else those whose counters
    /// moved and those whose estimate still decays.
    pub fn sample(&mut self, now_ns: u64) -> Result<()> {
        if self.dp.is_none() {
            self.dp = Some(Dataplane::open(&self.pins)?);
        }
        let RateSampler {
            dp: Some(dp),
            states,
            backends,
            counters,
            decaying,
            ..
        } = self
        else {
            unreachable!("opened above");
        };
        let serial = dp.apply_serial()?;
        let refreshed = backends.as_ref().is_none_or(|(s, _)| *s != serial);
        if refreshed {
            let list: Vec<(u32, BackendOwner)> = dp
                .services_view(false)?
                .values()
                .flat_map(|svc| {
                    svc.backends
                        .iter()
                        .map(move |b| (b.id, (svc.mark, svclb_common::addr_words(b.addr))))
                })
                .collect();
            let len = list
                .iter()
                .map(|(id, _)| *id as usize + 1)
                .max()
                .unwrap_or(0);
            counters.resize(len, BackendStats::default());
            if states.len() < len {
                states.resize(len, None);
            }
            *backends = Some((serial, list));
        }
        let Some((_, list)) = backends.as_ref() else {
            return Ok(());
        };
        let moved = dp.take_moved_counters(counters.len());
        let only_these = match moved {
            // Between applies, only the backends that moved or still
            // decay: nothing else can have changed.
            Some(mut ids) if !refreshed => {
                read_counters(dp, &ids, counters)?;
                ids.append(decaying);
                ids.sort_unstable();
                ids.dedup();
                let owned = |id: u32| {
                    let (owner, _) = states.get(id as usize)?.as_ref()?;
                    Some((id, *owner))
                };
                Some(ids.into_iter().filter_map(owned).collect::<Vec<_>>())
            }
            // After an apply, every backend: the new ones' baselines too.
            Some(mut ids) => {
                ids.extend(
                    list.iter()
                        .filter(|(id, owner)| states[*id as usize].is_none_or(|(o, _)| o != *owner))
                        .map(|(id, _)| *id),
                );
                read_counters(dp, &ids, counters)?;
                None
            }
            // No flags (pins from before they existed): read everything.
            None => {
                dp.counters_into(counters)?;
                None
            }
        };
        // A restarted svclbd continues the pinned estimators, read at once.
        let mut pinned: Option<HashMap<u32, RateState>> = None;
        decaying.clear();
        for &(id, owner) in only_these.as_deref().unwrap_or(list) {
            if visit_backend(dp, states, counters, &mut pinned, id, owner, now_ns)? {
                decaying.push(id);
            }
        }
        // Best effort: a full rates map (every id in use) has no room for
        // the mark, and then `svclb-ctl rate` goes by the newest estimator.
        let _ = dp.mark_sampled(now_ns);
        // Estimators of backends that are gone would mislead a reused id;
        // backends go only with an apply.
        if refreshed {
            let live: std::collections::HashSet<u32> = list.iter().map(|(id, _)| *id).collect();
            for (id, state) in states.iter_mut().enumerate() {
                if !live.contains(&(id as u32)) {
                    *state = None;
                }
            }
            for id in stale_estimators(dp, &live) {
                let _ = dp.remove_rate_estimator(id);
            }
        }
        Ok(())
    }
}

/// Reads the counters of `ids` into `counters`: one lookup each, or the
/// whole array in a few batch calls when there are many (one lookup costs
/// about what four entries of a batch do).
fn read_counters(dp: &Dataplane, ids: &[u32], counters: &mut [BackendStats]) -> Result<()> {
    if ids.len() * 4 > counters.len() {
        return dp.counters_into(counters);
    }
    for &id in ids {
        if let Some(c) = counters.get_mut(id as usize) {
            *c = dp.backend_stats(id)?;
        }
    }
    Ok(())
}

/// Folds backend `id`'s counters into its estimator (made first if this
/// svclbd has none: the pinned one, or a new one when the id changed
/// hands), pinning the estimate if it moved. True: the estimate is not
/// zero, so it decays at the next sample even if nothing moves.
fn visit_backend(
    dp: &mut Dataplane,
    states: &mut [Option<(BackendOwner, RateState)>],
    counters: &[BackendStats],
    pinned: &mut Option<HashMap<u32, RateState>>,
    id: u32,
    owner: BackendOwner,
    now_ns: u64,
) -> Result<bool> {
    let now = counters[id as usize];
    let entry = states[id as usize].get_or_insert_with(|| {
        let pinned = pinned.get_or_insert_with(|| dp.rate_estimators().collect());
        (owner, pinned.get(&id).copied().unwrap_or_default())
    });
    if entry.0 != owner {
        // The id was given to another backend: a new estimator.
        *entry = (owner, RateState::default());
    }
    let state = &mut entry.1;
    let zero = BackendStats::default();
    if state.sampled_ns != 0 && state.last == now && state.avg == zero {
        // Idle and settled: nothing to fold in, nothing to write.
        return Ok(false);
    }
    let before = *state;
    sample(state, now, now_ns);
    // A baseline or an estimate still at zero is what a missing entry
    // reads as: only estimates that say something are pinned (a start at
    // 100,000 services would otherwise write every one of them).
    let says_something = state.avg != zero;
    if before.avg != state.avg || (says_something && before.last != state.last) {
        dp.write_rate_estimator(id, *state)?;
    }
    Ok(says_something)
}

/// Pinned estimators whose backend is gone.
fn stale_estimators(dp: &Dataplane, live: &std::collections::HashSet<u32>) -> Vec<u32> {
    dp.rate_estimators()
        .map(|(id, _)| id)
        .filter(|id| !live.contains(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters given in column order: conns, in/out packets, in/out bytes.
    fn c([conns, in_pkts, out_pkts, in_bytes, out_bytes]: [u64; 5]) -> BackendStats {
        BackendStats {
            conns,
            in_pkts,
            out_pkts,
            in_bytes,
            out_bytes,
        }
    }

    fn feed(per_2s: [u64; 5], samples: usize) -> Rates {
        let mut st = RateState::default();
        let mut now = BackendStats::default();
        sample(&mut st, now, 1);
        for k in 0..samples {
            now.add(&c(per_2s));
            sample(&mut st, now, 2 + k as u64);
        }
        rates(&st)
    }

    #[test]
    fn a_steady_load_converges_to_its_rate() {
        // 200 conns, 2000 packets each way, 1 MB each way every 2 s.
        let r = feed([200, 2000, 2000, 1_000_000, 1_000_000], 60);
        assert_eq!(
            r,
            Rates {
                conns: 100,
                in_pkts: 1000,
                out_pkts: 1000,
                in_bytes: 500_000,
                out_bytes: 500_000
            }
        );
    }

    #[test]
    fn the_average_moves_a_quarter_of_the_way_per_sample() {
        let r = feed([400, 0, 0, 0, 0], 1);
        // One sample of 200/s: avg = 200 * 2^10 / 4.
        assert_eq!(r.conns, 50);
        let r = feed([400, 0, 0, 0, 0], 2);
        // 50 + (200 - 50) / 4 = 87.5; IPVS adds 0x1FF before the shift, so .5 rounds down.
        assert_eq!(r.conns, 87);
    }

    #[test]
    fn an_idle_backend_decays_to_zero() {
        let mut st = RateState::default();
        sample(&mut st, c([0; 5]), 1);
        sample(&mut st, c([1000, 1000, 1000, 1000, 1000]), 2);
        for k in 0..80 {
            sample(&mut st, c([1000, 1000, 1000, 1000, 1000]), 3 + k);
        }
        assert_eq!(rates(&st), Rates::default());
    }

    #[test]
    fn a_counter_that_goes_back_does_not_overflow() {
        let mut st = RateState::default();
        sample(&mut st, c([1_000_000; 5]), 1);
        sample(&mut st, c([5; 5]), 2);
        sample(&mut st, c([u64::MAX; 5]), 3);
        let _ = rates(&st);
        let mut service = RateState::default();
        for _ in 0..3 {
            add_to_service(&mut service, &st);
        }
        let _ = rates(&service);
    }

    #[test]
    fn the_first_sample_is_only_a_baseline() {
        let mut st = RateState::default();
        sample(&mut st, c([1_000_000; 5]), 5);
        assert_eq!(rates(&st), Rates::default());
    }
}
