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
    let mut h = mix64(FNV_OFFSET ^ ring.len() as u64);
    for id in ring {
        let t = ids.get(*id as usize).copied().unwrap_or(0);
        h = mix64(h ^ t).wrapping_add(FNV_PRIME);
    }
    h
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
}
