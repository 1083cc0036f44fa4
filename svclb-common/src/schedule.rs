//! Pure scheduling logic shared by userspace and the tests.
//!
//! ## Generations
//! A service's slots live in one of two generations: slot numbers
//! `[0, MAX_SLOTS_PER_SERVICE)` or `[MAX_SLOTS_PER_SERVICE, 2 * MAX_SLOTS_PER_SERVICE)`.
//! An update writes the new schedule into the generation that is not
//! active, then replaces the service value (count and `slot_base`) in one
//! map update, then deletes the old generation's slots. A connect() reads
//! the service value once, so it sees either the old schedule or the new
//! one, never a mix; one that read the old value just before the switch and
//! finds its slot already deleted looks again in the generation the service
//! names now (svclb-ebpf's service.rs), so an update never refuses it.
//!
//! ## Schedules per scheduler
//! - `random`: [`weighted_slots`], picked uniformly.
//! - `rr`/`wrr`: [`wrr_sequence`], walked in order by a per-CPU counter
//!   (`slots[counter++ % count]`); `rr` is `wrr` with every weight > 0
//!   taken as 1 (IPVS's rr, too, ignores weights other than 0).
//! - `mh`: [`crate::maglev::maglev_table`], indexed by a hash of the
//!   client: [`client_slot`], [`crate::hash::hash_u64`]`(netns cookie ^ mark)`
//!   through [`slot_for_hash`]. A client is the socket's network namespace
//!   (a container).
//! - `sh`: [`weighted_slots`], indexed the same way. Like IPVS's sh, a
//!   change of the backend set remaps most clients; `mh` is the consistent one.
//! - `lc`/`wlc`: one slot per backend of weight > 0; the program compares
//!   their live connections (`MAX_LC_BACKENDS` of them, sampled beyond).

use crate::layout::MAX_SLOTS_PER_SERVICE;

/// The slot base of the generation that is not `active_base`.
pub const fn other_generation(active_base: u32) -> u32 {
    if active_base == 0 {
        MAX_SLOTS_PER_SERVICE
    } else {
        0
    }
}

/// Maps a 32-bit hash onto a slot in `[0, count)` by multiply-shift
/// (Lemire's "fast range"): `(hash * count) >> 32`. No division, so it is
/// cheap in BPF and needs no zero check; each slot receives `floor` or
/// `ceil` of `2^32 / count` hash values, a bias below `count / 2^32`
/// (1.5e-5 at 65536 slots). Returns 0 when `count` is 0, which is not a
/// valid slot: the caller has already refused an empty service.
#[inline(always)]
pub const fn slot_for_hash(hash: u32, count: u32) -> u32 {
    ((hash as u64 * count as u64) >> 32) as u32
}

/// The slot an `mh` or `sh` service gives a client, the client being its
/// network namespace (cookie): [`crate::hash::hash_u64`] of the cookie
/// mixed with the service's mark (so two services spread the same clients
/// differently), through [`slot_for_hash`]. The data plane calls exactly
/// this; the tests predict the kernel's choice with it.
#[inline(always)]
pub const fn client_slot(netns_cookie: u64, mark: u32, count: u32) -> u32 {
    slot_for_hash(crate::hash::hash_u64(netns_cookie ^ mark as u64), count)
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

/// The `wrr` schedule (and `rr`'s, with equal weights): backend `i` (an
/// index into `weights`) appears `weights[i] / g` times in a sequence of
/// `L = sum(weights) / g`, where `g` is the weights' greatest common
/// divisor; weight 0 never appears. The data plane walks it in order, so
/// the order matters: it is "smooth" like nginx's smooth weighted round
/// robin, and provably so. In every prefix of length `k` (and, since the
/// counts are exact at `L`, of the sequence repeated), backend `i` appears
/// `floor` or `ceil` of `k * w_i / L` times, so it never runs ahead or
/// falls behind its share by a whole connection; a run of one backend is
/// shorter than `2L / (L - w_i)`. Equal weights give `0, 1, ..., n-1`.
///
/// The `j`-th appearance (0-based) of backend `i` may come no earlier than
/// position `floor(j * L / w_i)` and no later than `ceil((j+1) * L / w_i) - 1`;
/// taking at each position the released backend with the earliest deadline
/// (ties to the lower index) meets every deadline (Tijdeman's "chairman
/// assignment" theorem shows a schedule exists; earliest-deadline-first
/// finds one). `O(L log n)`. `None` when `L` exceeds `max_len`.
#[cfg(feature = "user")]
pub fn wrr_sequence(weights: &[u32], max_len: u32) -> Option<std::vec::Vec<u32>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if g == 0 {
        return Some(std::vec::Vec::new());
    }
    let len: u64 = weights.iter().map(|w| u64::from(w / g)).sum();
    if len > u64::from(max_len) {
        return None;
    }
    let w = |i: u32| u64::from(weights[i as usize] / g);
    let mut placed = std::vec![0u64; weights.len()];
    // (release position, index) of each backend's next appearance, and the
    // released ones by (deadline, index). len <= u32::MAX, so
    // placed * len < 2^64.
    let mut waiting: BinaryHeap<Reverse<(u64, u32)>> = (0..weights.len() as u32)
        .filter(|&i| w(i) > 0)
        .map(|i| Reverse((0, i)))
        .collect();
    let mut ready: BinaryHeap<Reverse<(u64, u32)>> = BinaryHeap::new();
    let mut seq = std::vec::Vec::with_capacity(len as usize);
    for pos in 0..len {
        while let Some(&Reverse((release, i))) = waiting.peek() {
            if release > pos {
                break;
            }
            waiting.pop();
            let deadline = ((placed[i as usize] + 1) * len).div_ceil(w(i)) - 1;
            ready.push(Reverse((deadline, i)));
        }
        // Never empty: the backends' upper quotas at pos + 1 sum to at
        // least pos + 1, and only pos have been placed.
        let Some(Reverse((_, i))) = ready.pop() else {
            break;
        };
        seq.push(i);
        let n = &mut placed[i as usize];
        *n += 1;
        if *n < w(i) {
            waiting.push(Reverse((*n * len / w(i), i)));
        }
    }
    Some(seq)
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

    /// Deterministic pseudo-random weight sets (an LCG, no dependencies).
    fn weight_sets() -> Vec<Vec<u32>> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |m: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        };
        let mut sets = vec![
            vec![1, 2, 3],
            vec![1, 100],
            vec![5, 1, 1, 1, 1, 1],
            vec![3, 7, 11, 13],
            vec![0, 4, 0, 6],
            vec![1; 17],
        ];
        for _ in 0..200 {
            let n = 1 + next(12) as usize;
            let max = [3, 20, 1000][next(3) as usize];
            sets.push((0..n).map(|_| next(max) as u32).collect());
        }
        sets
    }

    #[test]
    fn wrr_equal_weights_is_round_robin() {
        assert_eq!(wrr_sequence(&[1, 1, 1], 100).unwrap(), vec![0, 1, 2]);
        assert_eq!(wrr_sequence(&[7, 7, 7, 7], 100).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn wrr_one_two_three() {
        // Pinned; 2 (weight 3) never runs twice inside the cycle.
        assert_eq!(
            wrr_sequence(&[1, 2, 3], 100).unwrap(),
            vec![2, 1, 2, 0, 1, 2]
        );
        assert_eq!(
            wrr_sequence(&[2, 4, 6], 100).unwrap(),
            vec![2, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn wrr_weight_zero_and_limits() {
        assert_eq!(wrr_sequence(&[0, 5, 0], 100).unwrap(), vec![1]);
        assert!(wrr_sequence(&[0, 0], 100).unwrap().is_empty());
        assert!(wrr_sequence(&[], 100).unwrap().is_empty());
        assert!(wrr_sequence(&[1, 1000], 100).is_none());
        assert_eq!(wrr_sequence(&[1, 99], 100).unwrap().len(), 100);
        let big = wrr_sequence(&[u32::MAX, u32::MAX - 1], u32::MAX);
        assert!(big.is_none());
    }

    /// Exact counts, every prefix within floor/ceil of its share (checked
    /// over two periods, as a per-CPU counter walks it), bounded runs.
    #[test]
    fn wrr_counts_prefixes_and_runs() {
        for weights in weight_sets() {
            let seq = wrr_sequence(&weights, 1 << 16).unwrap();
            let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
            if g == 0 {
                assert!(seq.is_empty());
                continue;
            }
            let len = seq.len() as u64;
            let w: Vec<u64> = weights.iter().map(|&x| u64::from(x / g)).collect();
            assert_eq!(len, w.iter().sum::<u64>(), "{weights:?}");
            let mut count = vec![0u64; w.len()];
            for (k, &i) in seq.iter().chain(&seq).enumerate() {
                count[i as usize] += 1;
                let k = k as u64 + 1;
                for (c, wi) in count.iter().zip(&w) {
                    let (lo, hi) = (k * wi / len, (k * wi).div_ceil(len));
                    assert!(lo <= *c && *c <= hi, "{weights:?} prefix {k}: {c}");
                }
            }
            assert_eq!(count, w.iter().map(|x| 2 * x).collect::<Vec<_>>());
            // Longest run, cyclically.
            let mut run = 0;
            for (k, &i) in seq.iter().chain(&seq).enumerate() {
                run = if k > 0 && seq[(k - 1) % seq.len()] == i {
                    run + 1
                } else {
                    1
                };
                let wi = w[i as usize];
                if wi < len {
                    assert!(
                        (run as u64) * (len - wi) < 2 * len,
                        "{weights:?}: run of {run} of backend {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn wrr_schedule_of_many_backends() {
        // Sizes the control plane meets; the bound is what matters here.
        let weights: Vec<u32> = (1..=300).collect();
        let seq = wrr_sequence(&weights, 1 << 16).unwrap();
        assert_eq!(seq.len(), 300 * 301 / 2);
    }

    #[test]
    fn slot_for_hash_stays_in_range() {
        for count in [1u32, 2, 3, 7, 1000, 65521, 65536, u32::MAX] {
            for hash in [0u32, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX - 1, u32::MAX] {
                assert!(slot_for_hash(hash, count) < count, "{hash} {count}");
            }
            assert_eq!(slot_for_hash(0, count), 0);
            assert_eq!(slot_for_hash(u32::MAX, count), count - 1);
        }
        assert_eq!(slot_for_hash(12345, 0), 0);
    }

    /// Slot s starts at hash ceil(s * 2^32 / count): every slot gets floor
    /// or ceil of 2^32 / count hashes, the whole of the bias.
    #[test]
    fn slot_for_hash_splits_the_hash_space_evenly() {
        for count in [2u32, 3, 7, 1000, 4093, 65521] {
            let bound = |s: u64| ((s << 32).div_ceil(u64::from(count))) as u32;
            let mut sizes = std::collections::BTreeSet::new();
            let step = (count / 50).max(1);
            for s in (1..count).step_by(step as usize) {
                let b = bound(u64::from(s));
                assert_eq!(slot_for_hash(b, count), s);
                assert_eq!(slot_for_hash(b - 1, count), s - 1);
                let end = if s + 1 == count {
                    1u64 << 32
                } else {
                    u64::from(bound(u64::from(s) + 1))
                };
                sizes.insert(end - u64::from(b));
            }
            let lo = (1u64 << 32) / u64::from(count);
            assert!(
                sizes.iter().all(|&n| n == lo || n == lo + 1),
                "{count}: {sizes:?}"
            );
        }
    }

    #[test]
    fn source_hash_spread_is_uniform() {
        // 100,000 client keys over 7 slots: chi-square, 6 degrees of
        // freedom, P(chi2 > 22.46) = 0.001.
        let mut c = [0f64; 7];
        for key in 0..100_000u64 {
            c[slot_for_hash(crate::hash::hash_u64(key), 7) as usize] += 1.0;
        }
        let e = 100_000.0 / 7.0;
        let chi2: f64 = c.iter().map(|x| (x - e) * (x - e) / e).sum();
        assert!(chi2 < 22.46, "chi2 {chi2}");
    }

    /// The client's slot is the tested hash of (cookie ^ mark) through the
    /// tested reduction, and two services spread the same clients apart.
    #[test]
    fn client_slot_is_hash_u64_of_cookie_and_mark() {
        for (cookie, mark, count) in [(1u64, 317u32, 4u32), (4096, 256, 7), (u64::MAX, 1, 65521)] {
            let want = slot_for_hash(crate::hash::hash_u64(cookie ^ u64::from(mark)), count);
            assert_eq!(client_slot(cookie, mark, count), want);
            assert!(client_slot(cookie, mark, count) < count);
        }
        let differ = (1..1000u64)
            .filter(|&c| client_slot(c, 317, 64) != client_slot(c, 318, 64))
            .count();
        assert!(
            differ > 900,
            "marks 317 and 318 place {differ} of 999 clients apart"
        );
    }
}
