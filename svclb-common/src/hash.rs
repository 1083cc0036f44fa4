//! Hashes shared by the eBPF programs and userspace.
//!
//! Everything here is `no_std`, `const`, loop-free and panic-free, with
//! wrapping arithmetic only, so the BPF verifier accepts it inlined into a
//! program. The building block is [`mix64`], the finalizer of splitmix64: a
//! bijection on `u64` in which every input bit affects every output bit
//! (two multiplies, three xor-shifts).
//!
//! Every function reads addresses and ports as numbers in network order
//! (`u32::from_be` of the words the maps and the kernel hold), so a value
//! is the same on little- and big-endian hosts and in every run: nothing
//! here is seeded at random.
//!
//! These hashes are not keyed and not collision-resistant. That is fine for
//! a socket-level balancer: the clients are local processes that could
//! connect to any backend directly, so steering a hash gains them nothing.

/// Fixed seed for [`hash_tuple`] and [`hash_u64`] (hex digits of pi).
const TUPLE_SEED: u64 = 0x243f_6a88_85a3_08d3;
/// Fixed seed for [`backend_key`], distinct so a backend key and a client
/// hash of the same bytes are unrelated.
const BACKEND_SEED: u64 = 0x1319_8a2e_0370_7344;
/// splitmix64's increment (2^64 / golden ratio).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's finalizer (Stafford's "Mix13"): a fast 64-bit mixer with
/// full avalanche. `mix64(0) == 0`, so callers add a seed first.
#[inline(always)]
pub const fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Two network-order words as one number, first word high.
#[inline(always)]
const fn lane(hi_be: u32, lo_be: u32) -> u64 {
    ((u32::from_be(hi_be) as u64) << 32) | u32::from_be(lo_be) as u64
}

/// 32-bit hash of one 64-bit key, such as a network namespace cookie or a
/// cgroup id for source hashing (`sh`).
#[inline(always)]
pub const fn hash_u64(key: u64) -> u32 {
    (mix64(key ^ TUPLE_SEED) >> 32) as u32
}

/// 32-bit hash of a 5-tuple for `mh`/`sh`. Addresses are the 16-byte
/// network-order words of the maps (IPv4 IPv4-mapped); ports are in network
/// order, as the kernel hands them over. Each 64-bit lane is xored into the
/// state and mixed, five [`mix64`] rounds in all (about 40 BPF instructions).
#[inline(always)]
pub const fn hash_tuple(
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let [s0, s1, s2, s3] = *saddr;
    let [d0, d1, d2, d3] = *daddr;
    let ports = ((proto as u64) << 32)
        | ((u16::from_be(sport_be) as u64) << 16)
        | u16::from_be(dport_be) as u64;
    let mut h = mix64(TUPLE_SEED ^ lane(s0, s1));
    h = mix64(h ^ lane(s2, s3));
    h = mix64(h ^ lane(d0, d1));
    h = mix64(h ^ lane(d2, d3));
    h = mix64(h ^ ports);
    (h >> 32) as u32
}

/// A backend's stable identity for Maglev: a 64-bit hash of its address
/// (network-order words, IPv4 IPv4-mapped) and port (network order), like
/// ip_vs_mh.c's `ip_vs_mh_hashkey(dest->addr, dest->port)`. It depends on
/// nothing but those bytes, so every node and every restart of svclbd
/// builds the same table for the same backends.
#[inline(always)]
pub const fn backend_key(addr: &[u32; 4], port_be: u16) -> u64 {
    let [a0, a1, a2, a3] = *addr;
    let mut h = mix64(BACKEND_SEED ^ lane(a0, a1));
    h = mix64(h ^ lane(a2, a3));
    mix64(h ^ u16::from_be(port_be) as u64)
}

/// The two independent hashes Maglev needs per backend (the paper's h1 and
/// h2, for `offset` and `skip`): the first two splitmix64 outputs seeded
/// with the backend's key.
#[inline(always)]
pub const fn maglev_hashes(key: u64) -> (u64, u64) {
    (
        mix64(key.wrapping_add(GAMMA)),
        mix64(key.wrapping_add(GAMMA.wrapping_mul(2))),
    )
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    /// Chi-square statistic of `n` values spread over `counts.len()` buckets.
    fn chi_square(counts: &[u64]) -> f64 {
        let n: u64 = counts.iter().sum();
        let e = n as f64 / counts.len() as f64;
        counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
    }

    /// 256 buckets, 255 degrees of freedom: P(chi2 > 330.5) = 0.001.
    const CHI2_255_P001: f64 = 330.5;

    fn top_byte_buckets(values: impl Iterator<Item = u32>) -> Vec<u64> {
        let mut b = vec![0u64; 256];
        for v in values {
            b[(v >> 24) as usize] += 1;
        }
        b
    }

    #[test]
    fn mix64_matches_splitmix64() {
        // splitmix64 seeded with 0 (Vigna's reference splitmix64.c): the
        // k-th output is mix64(k * GAMMA).
        assert_eq!(mix64(GAMMA), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(GAMMA.wrapping_mul(2)), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(mix64(GAMMA.wrapping_mul(3)), 0x06c4_5d18_8009_454f);
        assert_eq!(mix64(0), 0);
    }

    #[test]
    fn golden_values() {
        // Pinned so that a change to any hash (which would remap every mh
        // and sh client) is a deliberate, visible one. Cross-checked with an
        // independent Python transcription of these functions.
        let v4 = [0, 0, u32::from_be(0xffff), u32::from_be(0xac32_0028)];
        let vip = [0, 0, u32::from_be(0xffff), u32::from_be(0xac32_0025)];
        assert_eq!(hash_u64(0), 0xe9e0_033e);
        assert_eq!(hash_u64(1), 0x8204_7734);
        assert_eq!(
            hash_tuple(&v4, &vip, 40000u16.to_be(), 80u16.to_be(), 6),
            0xf9ad_6f91
        );
        assert_eq!(backend_key(&v4, 80u16.to_be()), 0xdff6_97dd_66ac_7062);
        assert_eq!(
            maglev_hashes(1),
            (0x910a_2dec_8902_5cc1, 0xbeeb_8da1_658e_ec67)
        );
    }

    #[test]
    fn hash_u64_of_sequential_keys_is_uniform() {
        let b = top_byte_buckets((0..100_000u64).map(hash_u64));
        let chi2 = chi_square(&b);
        assert!(chi2 < CHI2_255_P001, "chi2 {chi2}");
    }

    #[test]
    fn hash_tuple_of_sequential_ports_is_uniform() {
        let s = [0, 0, u32::from_be(0xffff), u32::from_be(0x7f00_0001)];
        let d = [0, 0, u32::from_be(0xffff), u32::from_be(0xac32_0025)];
        // Source ports vary (the usual case), then source addresses.
        let ports = (0..100_000u32).map(|p| {
            hash_tuple(
                &s,
                &d,
                ((p % 65536) as u16).to_be(),
                (80 + (p / 65536) as u16).to_be(),
                6,
            )
        });
        let chi2 = chi_square(&top_byte_buckets(ports));
        assert!(chi2 < CHI2_255_P001, "ports: chi2 {chi2}");
        let addrs = (0..100_000u32).map(|a| {
            let s = [0, 0, u32::from_be(0xffff), (0x0a00_0000 + a).to_be()];
            hash_tuple(&s, &d, 0, 80u16.to_be(), 6)
        });
        let chi2 = chi_square(&top_byte_buckets(addrs));
        assert!(chi2 < CHI2_255_P001, "addresses: chi2 {chi2}");
    }

    #[test]
    fn every_tuple_field_matters() {
        let a = [1, 2, 3, 4];
        let b = [5, 6, 7, 8];
        let base = hash_tuple(&a, &b, 1, 2, 6);
        let mut seen = std::collections::HashSet::new();
        seen.insert(base);
        for i in 0..4 {
            let mut a2 = a;
            a2[i] ^= 1;
            assert!(seen.insert(hash_tuple(&a2, &b, 1, 2, 6)));
            let mut b2 = b;
            b2[i] ^= 1;
            assert!(seen.insert(hash_tuple(&a, &b2, 1, 2, 6)));
        }
        assert!(seen.insert(hash_tuple(&a, &b, 3, 2, 6)));
        assert!(seen.insert(hash_tuple(&a, &b, 1, 3, 6)));
        assert!(seen.insert(hash_tuple(&a, &b, 1, 2, 17)));
        // Swapping source and destination is a different flow.
        assert!(seen.insert(hash_tuple(&b, &a, 2, 1, 6)));
    }

    #[test]
    fn backend_keys_differ_by_address_and_port() {
        let mut seen = std::collections::HashSet::new();
        for a in 0..1000u32 {
            let addr = [0, 0, u32::from_be(0xffff), (0x0a00_0000 + a).to_be()];
            for p in [0u16, 80, 8080] {
                assert!(seen.insert(backend_key(&addr, p.to_be())));
            }
        }
    }

    #[test]
    fn maglev_hashes_are_uniform_and_unrelated() {
        let keys = (0..100_000u64).map(|i| backend_key(&[0, 0, 0, i as u32], 0));
        let (mut b1, mut b2) = (vec![0u64; 256], vec![0u64; 256]);
        let mut joint = vec![0u64; 256];
        for k in keys {
            let (h1, h2) = maglev_hashes(k);
            b1[(h1 >> 56) as usize] += 1;
            b2[(h2 >> 56) as usize] += 1;
            // 16 x 16 joint buckets: independent hashes fill them evenly.
            joint[((h1 >> 60) * 16 + (h2 >> 60)) as usize] += 1;
        }
        for (name, b) in [("h1", b1), ("h2", b2), ("joint", joint)] {
            let chi2 = chi_square(&b);
            assert!(chi2 < CHI2_255_P001, "{name}: chi2 {chi2}");
        }
    }
}
