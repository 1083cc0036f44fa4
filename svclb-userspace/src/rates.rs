//! IPVS's rate estimator (net/netfilter/ipvs/ip_vs_est.c), sample for
//! sample: every 2 s the counter deltas become scaled per-second rates
//! (`<<9` for connections and packets, i.e. 2^10 per second over 2 s; `<<4`
//! for bytes, 2^5), folded into an average with weight 1/4; the reported
//! rate rounds the average back. svclbd samples; `svclb-ctl rate` reads.

use serde::Serialize;
use svclb_common::{BackendStats, RateState};

/// IPVS samples every 2 seconds.
pub const SAMPLE_INTERVAL_SECS: u64 = 2;

/// Counters in estimator order: conns, in_pkts, out_pkts, in_bytes, out_bytes.
pub fn counters(s: &BackendStats) -> [u64; 5] {
    [s.conns, s.in_pkts, s.out_pkts, s.in_bytes, s.out_bytes]
}

/// Folds one 2-second sample into the estimator.
pub fn sample(state: &mut RateState, now: [u64; 5], now_ns: u64) {
    if state.sampled_ns == 0 {
        // First sample: a baseline, no rate yet.
        state.last = now;
        state.sampled_ns = now_ns;
        return;
    }
    for (i, (avg, (now, last))) in state
        .avg
        .iter_mut()
        .zip(now.iter().zip(state.last))
        .enumerate()
    {
        // A counter that went back (its backend id was given to a new
        // backend) restarts from here.
        let delta = now.saturating_sub(last);
        let shift = if i < 3 { 9 } else { 4 };
        let rate = delta.saturating_mul(1 << shift).min(i64::MAX as u64 >> 2) as i64;
        let old = (*avg).min(i64::MAX as u64 >> 2) as i64;
        *avg = (old + ((rate - old) >> 2)).max(0) as u64;
    }
    state.last = now;
    state.sampled_ns = now_ns;
}

/// What `ipvsadm --rate` shows: CPS, InPPS, OutPPS, InBPS, OutBPS (bytes/s).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rates {
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    pub in_bps: u64,
    pub out_bps: u64,
}

/// Reads the estimator the way IPVS reports it.
pub fn rates(state: &RateState) -> Rates {
    let pkts = |avg: u64| avg.saturating_add(0x1FF) >> 10;
    let bytes = |avg: u64| avg.saturating_add(0xF) >> 5;
    Rates {
        cps: pkts(state.avg[0]),
        in_pps: pkts(state.avg[1]),
        out_pps: pkts(state.avg[2]),
        in_bps: bytes(state.avg[3]),
        out_bps: bytes(state.avg[4]),
    }
}

/// Sums scaled averages (a service's rate is its backends' sum, as EWMAs are linear).
pub fn sum(states: &[RateState]) -> RateState {
    let mut total = RateState::default();
    for s in states {
        for (t, a) in total.avg.iter_mut().zip(s.avg) {
            *t = t.wrapping_add(a);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(per_2s: [u64; 5], samples: usize) -> Rates {
        let mut st = RateState::default();
        let mut now = [0u64; 5];
        sample(&mut st, now, 1);
        for k in 0..samples {
            for (n, d) in now.iter_mut().zip(per_2s) {
                *n += d;
            }
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
                cps: 100,
                in_pps: 1000,
                out_pps: 1000,
                in_bps: 500_000,
                out_bps: 500_000
            }
        );
    }

    #[test]
    fn the_average_moves_a_quarter_of_the_way_per_sample() {
        let r = feed([400, 0, 0, 0, 0], 1);
        // One sample of 200/s: avg = 200 * 2^10 / 4.
        assert_eq!(r.cps, 50);
        let r = feed([400, 0, 0, 0, 0], 2);
        // 50 + (200 - 50) / 4 = 87.5; IPVS adds 0x1FF before the shift, so .5 rounds down.
        assert_eq!(r.cps, 87);
    }

    #[test]
    fn an_idle_backend_decays_to_zero() {
        let mut st = RateState::default();
        sample(&mut st, [0; 5], 1);
        sample(&mut st, [1000, 1000, 1000, 1000, 1000], 2);
        for k in 0..80 {
            sample(&mut st, [1000, 1000, 1000, 1000, 1000], 3 + k);
        }
        assert_eq!(rates(&st), Rates::default());
    }

    #[test]
    fn a_counter_that_goes_back_does_not_overflow() {
        let mut st = RateState::default();
        sample(&mut st, [1_000_000; 5], 1);
        sample(&mut st, [5; 5], 2);
        sample(&mut st, [u64::MAX; 5], 3);
        let _ = rates(&st);
        let _ = rates(&sum(&[st, st, st]));
    }

    #[test]
    fn the_first_sample_is_only_a_baseline() {
        let mut st = RateState::default();
        sample(&mut st, [1_000_000; 5], 5);
        assert_eq!(rates(&st), Rates::default());
    }
}
