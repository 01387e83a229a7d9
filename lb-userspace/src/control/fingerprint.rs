//! A ring's fingerprint: one 64-bit value that is equal on two LB nodes exactly when
//! their rings send every slot to the same target (with overwhelming probability).
//!
//! Ring slots hold backend ids, which are local to a node (assigned in the order the
//! node learnt its targets), so the fingerprint is taken over target *identities*: per
//! slot the address of the target that slot maps to. Nodes behind one ECMP router must
//! agree on it for every VIP; `lb status` and the metrics show it
//! (docs/scale-out.md).

use std::{collections::HashMap, net::IpAddr};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The splitmix64 finaliser: a bijective avalanche mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a 64 of `bytes`: fixed, so every build and platform computes the same value.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

/// A target's identity: its address as 16 bytes (IPv4 as `::ffff:a.b.c.d`).
fn identity(ip: IpAddr) -> u64 {
    let bytes = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    // Never 0, the value of an empty slot.
    fnv1a(&bytes) | 1
}

/// The fingerprint of `ring` (backend ids), where `targets` maps each id in it to its
/// target's address. Slots whose id is 0 or unknown count as empty. Depends on the
/// ring size and on which target each slot maps to, in slot order; not on ids.
pub fn of_ring(ring: &[u32], targets: &HashMap<u32, IpAddr>) -> u64 {
    // Dense by id (ids are small: below `lb_common::MAX_BACKENDS`): no hashing per slot.
    let len = targets.keys().max().map_or(0, |m| *m as usize + 1);
    let mut ids = vec![0u64; len];
    for (id, ip) in targets {
        ids[*id as usize] = identity(*ip);
    }
    let of = |id: &u32| ids.get(*id as usize).copied().unwrap_or(0);
    // Four independent lanes (slot `i` in lane `i % 4`), so that a 1M-slot ring takes
    // about a millisecond: each step `x -> (x ^ t) * prime` is a bijection of the lane,
    // so two rings that differ in any one slot always differ in that lane's end state.
    let mut lanes = [0u64, 1, 2, 3].map(|k| mix64(FNV_OFFSET ^ k));
    let chunks = ring.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for (lane, id) in lanes.iter_mut().zip(c) {
            *lane = (*lane ^ of(id)).wrapping_mul(FNV_PRIME);
        }
    }
    for (lane, id) in lanes.iter_mut().zip(rest) {
        *lane = (*lane ^ of(id)).wrapping_mul(FNV_PRIME);
    }
    lanes.iter().fold(mix64(ring.len() as u64), |h, lane| mix64(h ^ lane))
}

/// How fingerprints are shown: 16 lower-case hex digits.
pub fn display(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ids_do_not_matter_targets_and_slots_do() {
        let (a, b) = (ip("198.18.0.11"), ip("198.18.0.12"));
        let one = of_ring(&[1, 2, 1, 0], &HashMap::from([(1, a), (2, b)]));
        let renumbered = of_ring(&[7, 3, 7, 0], &HashMap::from([(7, a), (3, b)]));
        assert_eq!(one, renumbered);
        assert_ne!(one, of_ring(&[2, 1, 2, 0], &HashMap::from([(1, a), (2, b)])), "slots swapped");
        assert_ne!(one, of_ring(&[1, 2, 1, 1], &HashMap::from([(1, a), (2, b)])), "empty slot filled");
        assert_ne!(one, of_ring(&[1, 2, 1], &HashMap::from([(1, a), (2, b)])), "size");
        assert_ne!(one, of_ring(&[1, 2, 1, 0], &HashMap::from([(1, a), (2, ip("198.18.0.13"))])), "other target");
        assert_eq!(display(0xab), "00000000000000ab");
    }

    #[test]
    fn any_one_slot_changed_changes_the_fingerprint() {
        let targets: HashMap<u32, IpAddr> = (1..=3).map(|i| (i, IpAddr::from([198, 18, 0, 10 + i as u8]))).collect();
        let ring: Vec<u32> = (0..11).map(|i| 1 + i % 3).collect();
        let base = of_ring(&ring, &targets);
        for slot in 0..ring.len() {
            for other in [0, 1, 2, 3] {
                let mut changed = ring.clone();
                if changed[slot] == other {
                    continue;
                }
                changed[slot] = other;
                assert_ne!(of_ring(&changed, &targets), base, "slot {slot} -> {other}");
            }
        }
    }
}
