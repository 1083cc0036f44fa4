//! The allocators of the numbers the maps are keyed by, one per kind and
//! nowhere else:
//!
//! - firewall marks (the services map's key): [`assign_marks`];
//! - backend ids (the backends, stats, conns and rates maps' key):
//!   [`BackendIds`];
//! - network scope bits (the networks map's values, the scopes map's
//!   masks): [`new_network_bits`].
//!
//! All three are pure: they choose from a [`Snapshot`] (or, for network
//! bits, what the networks map holds), and the caller writes through
//! [`crate::dataplane::Dataplane`]. [`crate::reconcile::plan`] uses all
//! three; [`crate::dataplane::Dataplane::network_scope`] (an attachment's
//! networks) uses the network one.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use anyhow::{bail, Context, Result};

use crate::{
    dataplane::Snapshot,
    model::{DesiredState, ServicePort},
};

/// Docker's firewall-mark counter starts at 256; so do marks svclb picks.
pub const FIRST_AUTO_MARK: u32 = 256;

/// Marks in the order of `desired.services`: the configured one, else the
/// one the VIP already has (so a restart or reload keeps FWM numbers), else
/// the lowest free one from [`FIRST_AUTO_MARK`].
pub fn assign_marks(current: &Snapshot, desired: &DesiredState) -> Result<Vec<u32>> {
    let mut marks: Vec<u32> = desired
        .services
        .iter()
        .map(|s| s.mark.unwrap_or(0))
        .collect();
    let unmarked: Vec<usize> = (0..marks.len()).filter(|&i| marks[i] == 0).collect();
    // Every mark given (Docker's LocalLBIndex): nothing to look up.
    if unmarked.is_empty() {
        return Ok(marks);
    }
    let existing: HashMap<(IpAddr, Option<ServicePort>), u32> = current
        .services
        .values()
        .map(|svc| ((svc.vip, svc.port), svc.mark))
        .collect();
    let mut taken: HashSet<u32> = desired.services.iter().filter_map(|s| s.mark).collect();
    let mut pending = Vec::new();
    for i in unmarked {
        let spec = &desired.services[i];
        match existing.get(&(spec.vip, spec.port)) {
            Some(&m) if !taken.contains(&m) => {
                taken.insert(m);
                marks[i] = m;
            }
            _ => pending.push(i),
        }
    }
    let mut next = FIRST_AUTO_MARK;
    for i in pending {
        while taken.contains(&next) {
            next = next.checked_add(1).context("no free firewall mark left")?;
        }
        taken.insert(next);
        marks[i] = next;
    }
    Ok(marks)
}

/// Backend ids for new backends: a backend keeps its id (and so its
/// counters) while its service keeps its mark; new ones take the lowest
/// ids free before this apply, below the backends map's capacity. The ids
/// in use are gathered only when a new backend needs one.
pub struct BackendIds<'a> {
    current: &'a Snapshot,
    capacity: u32,
    /// Indexed by id: taken (a bitmap, not a hash set: gathering 20,000
    /// ids into a hash set took a container start's plan 2 ms).
    used: Option<Vec<bool>>,
    next: u32,
}

impl<'a> BackendIds<'a> {
    pub fn new(current: &'a Snapshot, capacity: u32) -> Self {
        BackendIds {
            current,
            capacity,
            used: None,
            next: 0,
        }
    }

    /// The backends map's capacity: ids stay below it.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The next free id; None when every id below the capacity is taken.
    pub fn next_free(&mut self) -> Option<u32> {
        let (current, capacity) = (self.current, self.capacity);
        let used = self.used.get_or_insert_with(|| {
            let mut used = Vec::new();
            for id in current
                .backend_ids()
                .chain(current.still_counted.iter().copied())
                .filter(|id| *id < capacity)
            {
                let i = id as usize;
                if i >= used.len() {
                    used.resize(i + 1, false);
                }
                used[i] = true;
            }
            used
        });
        while self.next < self.capacity {
            let id = self.next;
            self.next += 1;
            if !used.get(id as usize).copied().unwrap_or(false) {
                return Some(id);
            }
        }
        None
    }
}

/// The scope bits for the names in `wanted` that `existing` has none for:
/// each takes the lowest bit free. A bit, once given, stays (services and
/// attachments refer to it).
pub fn new_network_bits<'a>(
    existing: &BTreeMap<String, u32>,
    wanted: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<(String, u32)>> {
    let mut used: u64 = existing.values().fold(0, |u, b| u | 1u64 << b);
    let mut new: Vec<(String, u32)> = Vec::new();
    for name in wanted {
        if existing.contains_key(name) || new.iter().any(|(n, _)| n == name) {
            continue;
        }
        if used == u64::MAX {
            bail!("network {name:?}: svclb distinguishes at most 64 networks per node");
        }
        let bit = used.trailing_ones();
        used |= 1u64 << bit;
        new.push((name.clone(), bit));
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_ids_are_the_lowest_free_below_the_capacity() {
        let current = Snapshot {
            // An id at or past the capacity (a map from a larger svclb)
            // takes nothing below it.
            still_counted: [0, 1, 3, 5, 100].into_iter().collect(),
            ..Snapshot::default()
        };
        let mut ids = BackendIds::new(&current, 8);
        let handed: Vec<Option<u32>> = (0..5).map(|_| ids.next_free()).collect();
        assert_eq!(handed, [Some(2), Some(4), Some(6), Some(7), None]);
    }
}
