//! How each scheduler lays out a service's slots. The eBPF program only
//! picks a slot index (see svclb-ebpf's service.rs); the table it picks
//! from is built here:
//!
//! - `random`, `sh`: each backend w/gcd times, so a uniform pick (random)
//!   or a hash of the client (sh) follows the weights.
//! - `rr`: one slot per backend of weight > 0; a per-CPU position walks them.
//! - `wrr`: a smooth weighted order (no long runs of one backend), walked
//!   the same way.
//! - `mh`: a Maglev lookup table of a fixed prime size (16381, so that a
//!   change of N never resizes it), hashed by client; a backend leaving moves
//!   about 1/N of the clients.
//! - `lc`, `wlc`: one slot per backend of weight > 0; the program compares
//!   their live connections (up to MAX_LC_BACKENDS of them, sampled beyond).
//!
//! Weight 0 (quiescent) never gets a slot: no new connection goes there,
//! established ones carry on.

use std::net::IpAddr;

use anyhow::{bail, Result};
use svclb_common::{
    addr_words,
    hash::backend_key,
    maglev::{maglev_table, MAGLEV_DEFAULT_TABLE_SIZE},
    schedule::{weighted_slots, wrr_sequence},
    Scheduler, MAX_SLOTS_PER_SERVICE,
};

/// One backend as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct PlannedBackend {
    pub addr: IpAddr,
    pub port: Option<u16>,
    pub weight: u32,
}

/// The slot table of one service: entry k is the index (into `backends`)
/// of the backend in slot k.
pub fn plan_slots(scheduler: Scheduler, backends: &[PlannedBackend]) -> Result<Vec<u32>> {
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    let live = || {
        (0..backends.len() as u32)
            .filter(|&i| weights[i as usize] > 0)
            .collect::<Vec<u32>>()
    };
    let slots = match scheduler {
        Scheduler::Random | Scheduler::Sh => weighted_slots(&weights, MAX_SLOTS_PER_SERVICE),
        Scheduler::Rr => Some(live()),
        Scheduler::Wrr => wrr_sequence(&weights, MAX_SLOTS_PER_SERVICE),
        Scheduler::Lc | Scheduler::Wlc => Some(live()),
        Scheduler::Mh => {
            let keyed: Vec<(u64, u32)> = backends
                .iter()
                .map(|b| {
                    (
                        backend_key(&addr_words(b.addr), b.port.map_or(0, u16::to_be)),
                        b.weight,
                    )
                })
                .collect();
            match maglev_table(&keyed, MAGLEV_DEFAULT_TABLE_SIZE) {
                Ok(table) => Some(table),
                Err(e) => bail!("building the Maglev table: {e}"),
            }
        }
    };
    match slots {
        Some(s) => Ok(s),
        None => bail!("the weights need more than {MAX_SLOTS_PER_SERVICE} schedule slots; use smaller weights"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<PlannedBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| PlannedBackend {
                addr: format!("172.50.0.{}", 40 + i).parse().unwrap(),
                port: None,
                weight,
            })
            .collect()
    }

    fn shares(slots: &[u32], n: usize) -> Vec<usize> {
        let mut count = vec![0; n];
        for &s in slots {
            count[s as usize] += 1;
        }
        count
    }

    #[test]
    fn every_scheduler_skips_weight_zero() {
        for s in Scheduler::ALL {
            let slots = plan_slots(s, &backends(&[1, 0, 1])).unwrap();
            assert!(!slots.contains(&1), "{s:?} scheduled a quiescent backend");
            assert!(slots.contains(&0) && slots.contains(&2), "{s:?}");
        }
    }

    #[test]
    fn weights_shape_the_tables() {
        assert_eq!(
            shares(
                &plan_slots(Scheduler::Wrr, &backends(&[1, 2, 3])).unwrap(),
                3
            ),
            [1, 2, 3]
        );
        assert_eq!(
            shares(
                &plan_slots(Scheduler::Random, &backends(&[2, 4])).unwrap(),
                2
            ),
            [1, 2]
        );
        assert_eq!(
            shares(&plan_slots(Scheduler::Rr, &backends(&[1, 5])).unwrap(), 2),
            [1, 1]
        );
        let mh = plan_slots(Scheduler::Mh, &backends(&[1, 1])).unwrap();
        assert_eq!(mh.len() as u32, MAGLEV_DEFAULT_TABLE_SIZE);
    }

    #[test]
    fn no_backends_no_slots() {
        for s in Scheduler::ALL {
            assert!(plan_slots(s, &[]).unwrap().is_empty(), "{s:?}");
        }
    }
}
