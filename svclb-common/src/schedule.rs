//! Pure scheduling logic shared by userspace and the tests.
//!
//! ## Generations
//! A service's slots live in one of two generations: slot numbers
//! `[0, MAX_SLOTS_PER_SERVICE)` or `[MAX_SLOTS_PER_SERVICE, 2 * MAX_SLOTS_PER_SERVICE)`.
//! An update writes the new schedule into the generation that is not
//! active, then replaces the service value (count and `slot_base`) in one
//! map update, then deletes the slots of the old generation that the new
//! one does not reuse. A connect() reads the service value once, so it sees
//! either the old schedule or the new one, never a mix.

use crate::layout::MAX_SLOTS_PER_SERVICE;

/// The slot base of the generation that is not `active_base`.
pub const fn other_generation(active_base: u32) -> u32 {
    if active_base == 0 {
        MAX_SLOTS_PER_SERVICE
    } else {
        0
    }
}

#[cfg(feature = "user")]
fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Expands weights into a schedule for the random scheduler: backend `i`
/// appears `weights[i] / g` times, where `g` is the weights' greatest common
/// divisor, so a uniform pick over the slots honours the weights. Weight 0
/// (quiescent) gets no slot. Entry `k` of the result is the index (into
/// `weights`) of the backend that slot `slot_base + k` holds; `None` when the
/// schedule would exceed `max_slots`.
#[cfg(feature = "user")]
pub fn weighted_slots(weights: &[u32], max_slots: u32) -> Option<std::vec::Vec<u32>> {
    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if g == 0 {
        return Some(std::vec::Vec::new());
    }
    let total: u64 = weights.iter().map(|w| u64::from(w / g)).sum();
    if total > u64::from(max_slots) {
        return None;
    }
    // Interleave the copies so that neighbouring slots differ: this does not
    // matter for a random pick, but keeps the table readable in dumps.
    let mut slots = std::vec::Vec::with_capacity(total as usize);
    let mut left: std::vec::Vec<u32> = weights.iter().map(|w| w / g).collect();
    while slots.len() < total as usize {
        for (i, n) in left.iter_mut().enumerate() {
            if *n > 0 {
                *n -= 1;
                slots.push(i as u32);
            }
        }
    }
    Some(slots)
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn generations_alternate() {
        assert_eq!(other_generation(0), MAX_SLOTS_PER_SERVICE);
        assert_eq!(other_generation(MAX_SLOTS_PER_SERVICE), 0);
    }

    #[test]
    fn equal_weights_give_one_slot_each() {
        let p = weighted_slots(&[1, 1, 1], 100).unwrap();
        assert_eq!(p, vec![0, 1, 2]);
    }

    #[test]
    fn weights_are_reduced_and_interleaved() {
        let p = weighted_slots(&[2, 4, 6], 100).unwrap();
        assert_eq!(p, vec![0, 1, 2, 1, 2, 2]);
    }

    #[test]
    fn weight_zero_gets_no_slot() {
        let p = weighted_slots(&[0, 5, 0], 100).unwrap();
        assert_eq!(p, vec![1]);
        assert!(weighted_slots(&[0, 0], 100).unwrap().is_empty());
    }

    #[test]
    fn too_many_slots_is_refused() {
        assert!(weighted_slots(&[1, 1000], 100).is_none());
    }
}
