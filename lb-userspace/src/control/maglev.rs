//! Maglev consistent hashing (Eisenbud et al., NSDI'16), weighted the way Katran does it.
//!
//! [`build`] turns a set of backends into a lookup table of backend ids that the XDP
//! program indexes with `flow_hash % m`. [`populate`] is the bare population algorithm
//! on explicit permutations; [`disruption`] measures how much a table changed.

use lb_common::is_prime;
use thiserror::Error;

/// Table value of a slot that maps to no backend (only when there is no usable backend).
pub const EMPTY_SLOT: u32 = 0;

/// Errors returned by [`build`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MaglevError {
    /// The table size is below 3 (`skip` needs `m - 1 >= 2`).
    #[error("Maglev table size {m} is too small: it must be a prime >= 3")]
    TableTooSmall {
        /// Requested table size.
        m: u32,
    },
    /// The table size is not prime, so permutations would not cover the table.
    #[error("Maglev table size {m} is not prime")]
    NotPrime {
        /// Requested table size.
        m: u32,
    },
    /// More backends than slots.
    #[error("Maglev table size {m} is smaller than the number of backends ({backends})")]
    TooManyBackends {
        /// Requested table size.
        m: u32,
        /// Number of backends given.
        backends: usize,
    },
    /// Two backends share the same key.
    #[error("duplicate Maglev backend key {key:?}")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A backend uses id 0, which is reserved for empty slots.
    #[error("backend {key:?} uses id 0, which is reserved for empty Maglev slots")]
    ZeroId {
        /// Key of the offending backend.
        key: String,
    },
}

/// One backend's permutation of the table, `slot_j = (offset + j * skip) % m`, and its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    /// First preferred slot.
    pub offset: u32,
    /// Step between preferred slots; must be in `1..m` with `m` prime for a full permutation.
    pub skip: u32,
    /// Relative weight; 0 means the backend never takes a slot.
    pub weight: u32,
}

/// Table value of a slot no backend took yet, inside [`fill`].
const FREE: u32 = u32::MAX;

/// Per-backend population state: where its permutation stands.
struct Cursor {
    /// Slot of preference `j`: `(offset + j * skip) % m` for `j < m`, kept up to date by
    /// additions (no division per probe).
    pos: u64,
    /// Index of the preference `pos` is.
    j: u64,
    offset: u64,
    skip: u64,
    weight: u64,
    /// Weight accumulated but not yet spent on a slot.
    credit: u64,
}

impl Cursor {
    fn new(perm: &Perm, m: u64) -> Cursor {
        // The only divisions: normalise once, so that every step is an addition.
        let offset = u64::from(perm.offset) % m;
        Cursor { pos: offset, j: 0, offset, skip: u64::from(perm.skip) % m, weight: u64::from(perm.weight), credit: 0 }
    }

    /// Moves to the next preference. For `j < m` that is the Maglev permutation. If the
    /// permutation is not a full cycle (non-prime `m`, `skip % m == 0`), preferences
    /// `m..2m` fall back to linear probing from `offset`, which visits every slot, so a
    /// free slot is always found before `j` reaches `2m`.
    fn advance(&mut self, m: u64) {
        self.j += 1;
        self.pos = if self.j < m {
            let p = self.pos + self.skip; // both < m <= 2^32: no overflow
            if p >= m { p - m } else { p }
        } else if self.j == m {
            self.offset
        } else if self.pos + 1 == m {
            0
        } else {
            self.pos + 1
        };
    }
}

/// Fills a table of `m` slots from `perms` (Maglev Algorithm 1, Katran-style weights).
///
/// Each round, every backend `i` in order adds its weight to its credit; if the credit
/// reaches the largest weight it takes its next free preferred slot and pays the largest
/// weight. With equal weights this is exactly the paper's algorithm. Returns, per slot,
/// the index into `perms`; slots are `None` only when `perms` is empty or all weights are 0.
/// Work is bounded by `O(m * perms.len())` for any input.
pub fn populate(perms: &[Perm], m: u32) -> Vec<Option<usize>> {
    fill(perms, m).into_iter().map(|i| (i != FREE).then_some(i as usize)).collect()
}

/// [`fill`] when every permutation is a full cycle (`m` prime, every `skip % m != 0`:
/// what [`build`] always gives) and `m < 2^31`, so that `pos + skip` fits a `u32`.
/// `None` if it does not apply. Gives the same table as [`fill_any`] (the turns are the
/// same; only how a backend finds its next free preferred slot differs):
///
/// - Walking: a backend tests its preferences in chunks of `K` at once (`K` independent
///   tests and one branch per chunk), `K` growing from 1 to 16 as the table fills and
///   walks get longer. The free slots are a byte map, one byte per slot.
/// - Tail: when at most about `sqrt(m) / 2` slots are free, walking costs about
///   `m / free` probes per turn; instead the backend's next free preferred slot is found
///   by computing, for each free slot, how many steps of its permutation away it is, and
///   taking the nearest.
fn fill_full_cycles(perms: &[Perm], m: u32) -> Option<Vec<u32>> {
    let indices: Vec<u32> = (0..perms.len()).map(|i| i as u32).collect();
    fill_full_cycles_labelled(perms, m, &indices)
}

/// [`fill_full_cycles`] storing `labels[i]` instead of `i` for `perms[i]` (`labels` has
/// one entry per permutation), so that [`build`] writes ids without a second pass.
fn fill_full_cycles_labelled(perms: &[Perm], m: u32, labels: &[u32]) -> Option<Vec<u32>> {
    if labels.len() != perms.len()
        || m >= 1 << 31
        || !is_prime(m)
        || perms.iter().any(|p| p.skip % m == 0)
        || perms.len() >= FREE as usize
    {
        return None;
    }
    let max_weight = perms.iter().map(|p| p.weight).max().unwrap_or(0);
    if max_weight == 0 {
        return Some(vec![FREE; m as usize]);
    }
    let mut fill = FullCycles::new(perms, labels, m, max_weight, FREE_MAP.take());
    let equal = perms.iter().all(|p| p.weight == max_weight);
    let size = m as usize;
    let tail = ((f64::from(m).sqrt() / 2.0) as usize).min(size);
    // (chunk size, walk while more than this many slots are free), chosen by measurement.
    let schedule = [(1, size / 20 * 19), (2, size / 10 * 7), (4, size / 20 * 7), (8, size / 10), (16, tail)];
    for (k, until) in schedule {
        let until = until.max(tail);
        match (k, equal) {
            (1, true) => fill.walk::<1, true>(until),
            (2, true) => fill.walk::<2, true>(until),
            (4, true) => fill.walk::<4, true>(until),
            (8, true) => fill.walk::<8, true>(until),
            (_, true) => fill.walk::<16, true>(until),
            (1, false) => fill.walk::<1, false>(until),
            (2, false) => fill.walk::<2, false>(until),
            (4, false) => fill.walk::<4, false>(until),
            (8, false) => fill.walk::<8, false>(until),
            (_, false) => fill.walk::<16, false>(until),
        }
    }
    fill.finish_nearest();
    let FullCycles { table, free, .. } = fill;
    if free.len() <= KEEP_FREE_MAP {
        FREE_MAP.set(free);
    }
    Some(table)
}

thread_local! {
    /// [`FullCycles::free`], kept between the builds of a thread. A new map each build
    /// (above malloc's mmap threshold for m = 65,537) is fresh memory each
    /// build, and faulting its pages in cost more than the byte map saves (measured).
    static FREE_MAP: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest [`FREE_MAP`] kept (m = 65,537 needs 128 KiB).
const KEEP_FREE_MAP: usize = 1 << 19;

/// The largest chunk [`FullCycles::walk`] tests at once.
const MAX_CHUNK: usize = 16;

/// State of [`fill_full_cycles`].
struct FullCycles<'a> {
    perms: &'a [Perm],
    /// What the table stores for each backend.
    labels: &'a [u32],
    m: u32,
    max_weight: u64,
    /// Per slot the label of the backend that took it, or [`FREE`].
    table: Vec<u32>,
    /// Byte `s` is 1 while slot `s` is free, 0 once taken. A byte per slot, not a bit: a
    /// probe is then a load and an `or` (a bit needs a shift, a mask and a second shift
    /// more), and taking a slot a plain store, not a read-modify-write of a word the next
    /// probes read (a bitmap measured 1.7x slower). Once, not twice (`s` and `s + m`, to
    /// test `pos + stride < 2m` unreduced): half the memory and one store per slot taken
    /// outweigh the reduction per probe (1.15-1.3x faster, measured). The length is a power
    /// of two at least `fmask + 1` (a map kept from an earlier build may be longer), so
    /// that masking an index keeps it in bounds without a check.
    free: Vec<u8>,
    /// `m.next_power_of_two() - 1`.
    fmask: usize,
    /// Free slots left.
    left: usize,
    /// Per backend: the slot its next preference is (`< m`).
    pos: Vec<u32>,
    /// Per backend: its `skip`, reduced below `m`.
    skip: Vec<u32>,
    /// Per backend `k * skip % m` for `k` in `0..=MAX_CHUNK`: preference `j + k` is
    /// `(pos + strides[k]) % m` when `pos` is preference `j`.
    strides: Vec<[u32; MAX_CHUNK + 1]>,
    /// Per backend: weight accumulated but not yet spent on a slot.
    credit: Vec<u64>,
    /// The backend whose turn is next.
    next: usize,
}

impl<'a> FullCycles<'a> {
    /// `free`: a map to reuse (any length and contents).
    fn new(perms: &'a [Perm], labels: &'a [u32], m: u32, max_weight: u32, mut free: Vec<u8>) -> FullCycles<'a> {
        let size = m as usize;
        let len = size.next_power_of_two();
        if free.len() < len {
            free = vec![0; len];
        }
        // Bytes at and above m are never tested.
        free[..size].fill(1);
        let skip: Vec<u32> = perms.iter().map(|p| p.skip % m).collect();
        let strides = skip
            .iter()
            .map(|&skip| {
                let mut st = [0u32; MAX_CHUNK + 1];
                for k in 1..=MAX_CHUNK {
                    st[k] = reduce_once(st[k - 1] + skip, m);
                }
                st
            })
            .collect();
        FullCycles {
            perms,
            labels,
            m,
            max_weight: u64::from(max_weight),
            table: vec![FREE; size],
            free,
            fmask: len - 1,
            left: size,
            pos: perms.iter().map(|p| p.offset % m).collect(),
            skip,
            strides,
            credit: vec![0; perms.len()],
            next: 0,
        }
    }

    /// Whether backend `b` takes a slot this turn (Katran-style weights, as in
    /// [`fill_any`]); always with equal weights.
    #[inline(always)]
    fn turn<const EQUAL: bool>(credit: &mut [u64], perms: &[Perm], max_weight: u64, b: usize) -> bool {
        if EQUAL {
            return true;
        }
        // credit < 2 * max_weight <= 2^33: no overflow.
        credit[b] += u64::from(perms[b].weight);
        if credit[b] < max_weight {
            return false;
        }
        credit[b] -= max_weight;
        true
    }

    /// Gives turns until at most `until` slots are free; each taking backend tests `K`
    /// (`<= MAX_CHUNK`) preferences per step. Returns at once if `left <= until`. Not
    /// inlined: one compiled loop per `K`, each with its own registers (measured faster).
    #[inline(never)]
    fn walk<const K: usize, const EQUAL: bool>(&mut self, until: usize) {
        let m = self.m;
        let n = self.perms.len();
        let fmask = self.fmask;
        // Exactly `fmask + 1` long, so that masked indices need no check.
        let (free, table) = (&mut self.free[..=fmask], &mut self.table[..]);
        let (pos, credit, perms) = (&mut self.pos[..n], &mut self.credit[..n], &self.perms[..n]);
        let labels = &self.labels[..n];
        // Probes are most of the work: no bounds check, not even a mask.
        let is_free = |free: &[u8], q: u32| {
            debug_assert!((q as usize) < free.len());
            // SAFETY: every probe is `(pos + strides[k]) % m`, so q < m, and `free` holds
            // at least m bytes (see `new`).
            u32::from(unsafe { *free.get_unchecked(q as usize) })
        };
        let strides = &self.strides[..n];
        let (mut b, mut left) = (self.next, self.left);
        while left > until {
            if Self::turn::<EQUAL>(credit, perms, self.max_weight, b) {
                let st = &strides[b];
                let mut p = pos[b];
                // Terminates: the permutation is a full cycle and a slot is free.
                let slot = loop {
                    // Bit k: preference `p + k * skip` is free.
                    let mut mask = 0;
                    for (k, &stride) in st[..K].iter().enumerate() {
                        mask |= is_free(free, reduce_once(p + stride, m)) << k;
                    }
                    if mask != 0 {
                        break reduce_once(p + st[mask.trailing_zeros() as usize % K], m);
                    }
                    p = reduce_once(p + st[K], m);
                };
                free[slot as usize & fmask] = 0;
                table[slot as usize] = labels[b];
                pos[b] = reduce_once(slot + st[1], m);
                left -= 1;
            }
            b += 1;
            if b == n {
                b = 0;
            }
        }
        self.next = b;
        self.left = left;
    }

    /// Gives the remaining turns: the taking backend takes, among the free slots, the one
    /// the fewest steps of its permutation ahead of `pos` (the one a walk would reach
    /// first), steps being `(slot - pos) * skip^-1 % m`.
    fn finish_nearest(&mut self) {
        let m = self.m;
        let mut free: Vec<u32> = Vec::with_capacity(self.left);
        // Eight slots at a time: most are taken by now.
        let chunks = self.free[..m as usize].chunks_exact(8);
        let rest = chunks.remainder().iter().enumerate().filter(|&(_, &f)| f != 0);
        let base = m & !7;
        for (w, bytes) in chunks.enumerate() {
            let mut bits = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
            while bits != 0 {
                free.push((w as u32) * 8 + bits.trailing_zeros() / 8);
                bits &= bits - 1;
            }
        }
        free.extend(rest.map(|(i, _)| base + i as u32));
        let m64 = u64::from(m);
        // Barrett reduction: for a < 2^64, a - ((a * r) >> 64) * m is in 0..2m.
        let r = u64::MAX / m64;
        let reduce = |a: u64| {
            let q = ((u128::from(a) * u128::from(r)) >> 64) as u64;
            let x = a - q * m64;
            if x >= m64 { x - m64 } else { x }
        };
        let n = self.perms.len();
        // Per backend its skip's inverse modulo m, computed on its first turn here (0: not yet).
        let mut inverses = vec![0u32; n];
        let mut b = self.next;
        while !free.is_empty() {
            if Self::turn::<false>(&mut self.credit, self.perms, self.max_weight, b) {
                if inverses[b] == 0 {
                    inverses[b] = inverse_mod(self.skip[b], m);
                }
                let (inv, p) = (u64::from(inverses[b]), self.pos[b]);
                let mut nearest = (u64::MAX, 0);
                for (k, &slot) in free.iter().enumerate() {
                    // Both factors < m < 2^31.
                    let steps = reduce(u64::from(reduce_once(slot + m - p, m)) * inv);
                    if steps < nearest.0 {
                        nearest = (steps, k);
                    }
                }
                let slot = free.swap_remove(nearest.1);
                self.table[slot as usize] = self.labels[b];
                self.pos[b] = reduce_once(slot + self.skip[b], m);
            }
            b += 1;
            if b == n {
                b = 0;
            }
        }
        self.left = 0;
    }
}

/// `x % m` for `x < 2m`.
#[inline(always)]
fn reduce_once(x: u32, m: u32) -> u32 {
    if x >= m { x - m } else { x }
}

/// The inverse of `a` modulo the prime `m`, for `a` in `1..m` (extended Euclid).
fn inverse_mod(a: u32, m: u32) -> u32 {
    let (mut r0, mut r1) = (i64::from(m), i64::from(a));
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    // t0 * a == 1 (mod m) and |t0| < m.
    (if t0 < 0 { t0 + i64::from(m) } else { t0 }) as u32
}

/// [`populate`] on a compact table: per slot the index into `perms` as `u32`, or
/// [`FREE`]. Which slots are taken is a byte per slot in [`fill_full_cycles`] (a probe,
/// most of the work, is an addition, a reduction below m, a load and an `or`) and a bitset
/// in [`fill_any`]; a probe never divides.
fn fill(perms: &[Perm], m: u32) -> Vec<u32> {
    fill_full_cycles(perms, m).unwrap_or_else(|| fill_any(perms, m))
}

/// [`fill`] for any permutations (the general case: non-prime `m`, partial cycles).
fn fill_any(perms: &[Perm], m: u32) -> Vec<u32> {
    let size = m as usize;
    let mut table = vec![FREE; size];
    let max_weight = u64::from(perms.iter().map(|p| p.weight).max().unwrap_or(0));
    // `perms.len() <= m < u32::MAX` for `build`; an index that would not fit is never stored.
    if size == 0 || max_weight == 0 || perms.len() >= FREE as usize {
        return table;
    }
    let m = u64::from(m);
    let mut taken = vec![0u64; size.div_ceil(64)];
    let is_taken = |taken: &[u64], slot: u64| taken[(slot >> 6) as usize] & (1 << (slot & 63)) != 0;
    let mut cursors: Vec<Cursor> = perms.iter().map(|p| Cursor::new(p, m)).collect();
    let mut filled = 0;
    // Terminates: each round the max-weight backend takes a slot, so there are at most
    // `m` rounds, and each backend's `j` stays below `2m` (see `Cursor::advance`).
    loop {
        for (i, cursor) in cursors.iter_mut().enumerate() {
            // credit < 2 * max_weight <= 2^33 after the addition: no overflow, and one
            // payment brings it back below max_weight, so `if` suffices (no `while`).
            cursor.credit += cursor.weight;
            if cursor.credit < max_weight {
                continue;
            }
            cursor.credit -= max_weight;
            while is_taken(&taken, cursor.pos) {
                cursor.advance(m);
            }
            let slot = cursor.pos;
            taken[(slot >> 6) as usize] |= 1 << (slot & 63);
            table[slot as usize] = i as u32;
            cursor.advance(m);
            filled += 1;
            if filled == size {
                return table;
            }
        }
    }
}

/// A backend to place in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend<'a> {
    /// Id stored in the table; must be >= 1 (0 is [`EMPTY_SLOT`]).
    pub id: u32,
    /// Stable identity (e.g. the target IP as text) that determines the permutation.
    pub key: &'a str,
    /// Relative weight; 0 keeps the backend out of the table.
    pub weight: u32,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Seed of the hash that picks `offset` (ASCII "maglevOF").
const SEED_OFFSET: u64 = 0x6d61_676c_6576_4f46;
/// Seed of the hash that picks `skip` (ASCII "maglevSK").
const SEED_SKIP: u64 = 0x6d61_676c_6576_534b;

/// The splitmix64 finaliser: a bijective avalanche mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seeded FNV-1a 64 followed by a splitmix64 finaliser; stable across Rust releases and
/// platforms (unlike `DefaultHasher`), so every agent builds the same table.
fn stable_hash(key: &str, seed: u64) -> u64 {
    let h = key.bytes().fold(FNV_OFFSET ^ mix64(seed), |h, b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
    mix64(h ^ seed)
}

/// The permutation of `backend` in a table of prime size `m >= 3`.
fn perm_for(backend: &Backend<'_>, m: u32) -> Perm {
    let m = u64::from(m);
    // Both results are below m <= u32::MAX.
    let offset = (stable_hash(backend.key, SEED_OFFSET) % m) as u32;
    let skip = (stable_hash(backend.key, SEED_SKIP) % (m - 1) + 1) as u32;
    Perm { offset, skip, weight: backend.weight }
}

/// `backends` in the order of their keys. Compared first by their first 16 bytes as one
/// big-endian number (zero-padded), then, only when those are equal, as strings: the
/// same order as comparing the strings (a zero-padded prefix is never above the string
/// it pads), at a fraction of the cost for keys such as IP addresses.
fn sorted_by_key<'b, 'k>(backends: &'b [Backend<'k>]) -> Vec<&'b Backend<'k>> {
    let prefix = |key: &str| {
        let mut bytes = [0u8; 16];
        let n = key.len().min(16);
        bytes[..n].copy_from_slice(&key.as_bytes()[..n]);
        u128::from_be_bytes(bytes)
    };
    let mut keyed: Vec<(u128, &Backend<'_>)> = backends.iter().map(|b| (prefix(b.key), b)).collect();
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.key.cmp(b.1.key)));
    keyed.into_iter().map(|(_, b)| b).collect()
}

/// Builds the Maglev table of backend ids for a prime table size `m`.
///
/// The result depends only on the set of backends, not their order (they are sorted by
/// key). Slots are [`EMPTY_SLOT`] only if no backend has a non-zero weight.
pub fn build(backends: &[Backend<'_>], m: u32) -> Result<Vec<u32>, MaglevError> {
    if m < 3 {
        return Err(MaglevError::TableTooSmall { m });
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime { m });
    }
    if backends.len() > m as usize {
        return Err(MaglevError::TooManyBackends { m, backends: backends.len() });
    }
    if let Some(b) = backends.iter().find(|b| b.id == EMPTY_SLOT) {
        return Err(MaglevError::ZeroId { key: b.key.to_owned() });
    }
    let sorted = sorted_by_key(backends);
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].key == pair[1].key) {
        return Err(MaglevError::DuplicateKey { key: pair[0].key.to_owned() });
    }
    let perms: Vec<Perm> = sorted.iter().map(|b| perm_for(b, m)).collect();
    let ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
    if perms.iter().all(|p| p.weight == 0) {
        return Ok(vec![EMPTY_SLOT; m as usize]);
    }
    if let Some(table) = fill_full_cycles_labelled(&perms, m, &ids) {
        return Ok(table);
    }
    Ok(fill_any(&perms, m).into_iter().map(|i| ids.get(i as usize).copied().unwrap_or(EMPTY_SLOT)).collect())
}

#[cfg(test)]
/// The previous [`fill_full_cycles`], kept as the reference the tests compare with: one
/// probe at a time, the same turns. `None` if it does not apply.
fn fill_full_cycles_reference(perms: &[Perm], m: u32) -> Option<Vec<u32>> {
    if m >= 1 << 31 || !is_prime(m) || perms.iter().any(|p| p.skip % m == 0) || perms.len() >= FREE as usize {
        return None;
    }
    let size = m as usize;
    let mut table = vec![FREE; size];
    let max_weight = u64::from(perms.iter().map(|p| p.weight).max().unwrap_or(0));
    if max_weight == 0 {
        return Some(table);
    }
    let equal = perms.iter().all(|p| u64::from(p.weight) == max_weight);
    let mut pos: Vec<u32> = perms.iter().map(|p| p.offset % m).collect();
    let skip: Vec<u32> = perms.iter().map(|p| p.skip % m).collect();
    let mut credit = vec![0u64; perms.len()];
    let mut taken = vec![0u64; size.div_ceil(64)];
    let mut filled = 0;
    // Terminates as `fill` does: every round the max-weight backends take a slot, and a
    // full cycle always reaches a free slot.
    loop {
        for i in 0..perms.len() {
            if !equal {
                credit[i] += u64::from(perms[i].weight);
                if credit[i] < max_weight {
                    continue;
                }
                credit[i] -= max_weight;
            }
            let (step, mut p) = (skip[i], pos[i]);
            let next = |p: u32| {
                let q = p + step; // < 2m < 2^32
                if q >= m { q - m } else { q }
            };
            while taken[(p >> 6) as usize] & (1 << (p & 63)) != 0 {
                p = next(p);
            }
            taken[(p >> 6) as usize] |= 1 << (p & 63);
            table[p as usize] = i as u32;
            pos[i] = next(p);
            filled += 1;
            if filled == size {
                return Some(table);
            }
        }
    }
}

/// The previous [`build`] for valid input: the reference the tests compare with.
#[cfg(test)]
fn build_reference(backends: &[Backend<'_>], m: u32) -> Vec<u32> {
    let mut sorted: Vec<&Backend<'_>> = backends.iter().collect();
    sorted.sort_unstable_by_key(|b| b.key);
    let perms: Vec<Perm> = sorted.iter().map(|b| perm_for(b, m)).collect();
    let ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
    let table = fill_full_cycles_reference(&perms, m).unwrap_or_else(|| fill_any(&perms, m));
    table.into_iter().map(|i| ids.get(i as usize).copied().unwrap_or(EMPTY_SLOT)).collect()
}

/// Fraction of slots whose id differs between two tables (0.0 for two empty tables).
///
/// If the lengths differ, slots present in only one table count as changed.
pub fn disruption(old: &[u32], new: &[u32]) -> f64 {
    let len = old.len().max(new.len());
    if len == 0 {
        return 0.0;
    }
    let same = old.iter().zip(new).filter(|(a, b)| a == b).count();
    (len - same) as f64 / len as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;

    const M: u32 = 65537;

    fn keys(n: u32) -> Vec<String> {
        (0..n).map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff)).collect()
    }

    /// Backend `i` gets id `i + 1` and the given weight.
    fn backends<'a>(keys: &'a [String], weight: impl Fn(usize) -> u32) -> Vec<Backend<'a>> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| Backend { id: u32::try_from(i + 1).expect("small id"), key, weight: weight(i) })
            .collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for &id in table {
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    /// The fast path for full cycles and the general one fill the same table.
    #[test]
    fn full_cycle_fast_path_equals_the_general_fill() {
        let mut rng = crate::test_rng::Rng::new(0x2545_f491_4f6c_dd1d);
        let mut next = move |n: u32| rng.below(u64::from(n)) as u32;
        for (m, n, weighted) in
            [(7, 3, false), (1009, 10, false), (1009, 50, true), (65_537, 100, true), (65_537, 1000, false)]
        {
            let perms: Vec<Perm> = (0..n)
                .map(|_| Perm { offset: next(m), skip: next(m - 1) + 1, weight: if weighted { next(5) } else { 1 } })
                .collect();
            let fast = fill_full_cycles(&perms, m).expect("full cycles");
            assert_eq!(fast, fill_any(&perms, m), "m={m} n={n} weighted={weighted}");
        }
        // Not a full cycle: the fast path declines.
        assert!(fill_full_cycles(&[Perm { offset: 1, skip: 7, weight: 1 }], 7).is_none());
        assert!(fill_full_cycles(&[Perm { offset: 1, skip: 2, weight: 1 }], 8).is_none());
    }

    /// Random backend sets: `n` backends with distinct keys, weights by `mode` (0: all 1,
    /// 1: all the same random weight, 2: 0..4 (zeros included), 3: one heavy backend, 4:
    /// any u32).
    fn random_set(rng: &mut crate::test_rng::Rng, n: usize, mode: u64) -> (Vec<String>, Vec<u32>) {
        let keys: Vec<String> = (0..n).map(|i| format!("10.{}.{}/{i}", rng.below(256), rng.below(256))).collect();
        let same = 1 + rng.below(1000) as u32;
        let weights = (0..n)
            .map(|i| match mode {
                0 => 1,
                1 => same,
                2 => rng.below(5) as u32,
                3 => {
                    if i == 0 {
                        1000
                    } else {
                        1 + rng.below(3) as u32
                    }
                }
                _ => rng.below(u64::from(u32::MAX) + 1) as u32,
            })
            .collect();
        (keys, weights)
    }

    /// The table is bit-for-bit the one the previous implementation built, over random
    /// backend sets, weights (zero, equal, unequal) and table sizes.
    #[test]
    fn build_equals_the_reference_implementation() {
        let mut rng = crate::test_rng::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut cases = 0;
        for &m in &[3u32, 5, 7, 11, 13, 31, 101, 257, 1009, 4099, 65_537] {
            let rounds = if m == 65_537 { 12 } else { 40 };
            for round in 0..rounds {
                let most = (m as usize).min(if m == 65_537 { 1200 } else { 300 });
                let n = match round % 4 {
                    0 => (1 + rng.below(4) as usize).min(most),
                    1 => most,
                    _ => 1 + rng.below(most as u64) as usize,
                };
                let mode = rng.below(5);
                let (keys, weights) = random_set(&mut rng, n, mode);
                let list: Vec<Backend<'_>> = keys
                    .iter()
                    .zip(&weights)
                    .enumerate()
                    .map(|(i, (key, &weight))| Backend { id: i as u32 + 1, key, weight })
                    .collect();
                let table = build(&list, m).expect("valid backends");
                assert!(table == build_reference(&list, m), "m={m} n={n} weights={weights:?}");
                cases += 1;
            }
        }
        // The population itself on raw permutations, including offsets and skips >= m.
        for _ in 0..300 {
            let m = [3u32, 7, 13, 101, 1009][rng.below(5) as usize];
            let n = 1 + rng.below(u64::from(m)) as usize;
            let mode = rng.below(5);
            let perms: Vec<Perm> = (0..n)
                .map(|_| {
                    let skip = loop {
                        let s = rng.below(1 << 32) as u32;
                        if !s.is_multiple_of(m) {
                            break s;
                        }
                    };
                    let weight = match mode {
                        0 => 1,
                        1 => rng.below(3) as u32,
                        _ => rng.below(1 << 32) as u32,
                    };
                    Perm { offset: rng.below(1 << 32) as u32, skip, weight }
                })
                .collect();
            let reference = fill_full_cycles_reference(&perms, m).expect("full cycles");
            assert_eq!(fill_full_cycles(&perms, m).expect("full cycles"), reference, "m={m} {perms:?}");
            cases += 1;
        }
        assert!(cases > 700);
    }

    /// `cargo test --release -p lb-userspace --lib maglev::tests::build_time -- --ignored
    /// --nocapture`: build time against the reference implementation, in the same run.
    #[test]
    #[ignore = "timing; run in a release build"]
    fn build_time_against_reference() {
        for n in [10u32, 100, 1000] {
            let keys: Vec<String> = (0..n).map(|i| format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250)).collect();
            let list = backends(&keys, |_| 1);
            let time = |f: &dyn Fn() -> Vec<u32>| {
                let mut ms: Vec<f64> = (0..41)
                    .map(|_| {
                        let start = Instant::now();
                        std::hint::black_box(f());
                        start.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                ms.sort_by(f64::total_cmp);
                (ms[0], ms[ms.len() / 2])
            };
            assert_eq!(build(&list, M).expect("valid"), build_reference(&list, M));
            let (old_min, old_median) = time(&|| build_reference(&list, M));
            let (new_min, new_median) = time(&|| build(&list, M).expect("valid"));
            eprintln!(
                "maglev build M={M}, {n} backends: reference min {old_min:.3} median {old_median:.3} ms; \
                 new min {new_min:.3} median {new_median:.3} ms; median ratio {:.2}x",
                old_median / new_median
            );
        }
    }

    /// The free-slot map a thread keeps between builds: a longer one left by a larger
    /// table, with stale contents, gives the same tables.
    #[test]
    fn a_kept_free_map_from_a_larger_table_changes_nothing() {
        let keys: Vec<String> = (0..37).map(|i| format!("198.18.0.{i}")).collect();
        let list = backends(&keys, |i| 1 + (i % 3) as u32);
        for &m in &[65_537u32, 1009, 37, 65_537, 101] {
            assert_eq!(build(&list, m).expect("valid"), build_reference(&list, m), "m = {m}");
        }
    }

    #[test]
    fn is_prime_small_and_edge_values() {
        let primes: Vec<u32> = (0..50).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]);
        assert!(is_prime(65537));
        assert!(is_prime(131_071));
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(65535));
        assert!(!is_prime(u32::MAX)); // 3 * 5 * 17 * 257 * 65537
        assert!(!is_prime(65521 * 65521)); // square of the largest prime below 2^16
    }

    #[test]
    fn paper_table1_example() {
        let p = |offset, skip| Perm { offset, skip, weight: 1 };
        let (b0, b1, b2) = (p(3, 4), p(0, 2), p(3, 1));
        assert_eq!(populate(&[b0, b1, b2], 7), [1, 0, 1, 0, 2, 2, 0].map(Some));
        // B1 removed: indices now refer to [B0, B2].
        assert_eq!(populate(&[b0, b2], 7), [0, 0, 0, 0, 1, 1, 1].map(Some));
    }

    #[test]
    fn populate_empty_and_zero_weights() {
        assert_eq!(populate(&[], 7), vec![None; 7]);
        let zero = Perm { offset: 1, skip: 2, weight: 0 };
        assert_eq!(populate(&[zero, zero], 7), vec![None; 7]);
        let one = Perm { offset: 0, skip: 1, weight: 1 };
        assert_eq!(populate(&[zero, one, zero], 7), vec![Some(1); 7]);
        assert!(populate(&[one], 0).is_empty());
    }

    #[test]
    fn populate_degenerate_perms_terminate_and_fill() {
        // Non-prime size and skips that do not generate the table still fill every slot.
        let perms = [
            Perm { offset: 0, skip: 0, weight: 1 },
            Perm { offset: 4, skip: 5, weight: 1 },
            Perm { offset: u32::MAX, skip: u32::MAX, weight: u32::MAX },
        ];
        for m in [1, 2, 10, 12, 100] {
            let table = populate(&perms, m);
            assert!(table.iter().all(Option::is_some), "m={m}: {table:?}");
        }
    }

    #[test]
    fn balance_equal_weights() {
        let keys = keys(100);
        let table = build(&backends(&keys, |_| 1), M).expect("valid backends");
        let counts = counts(&table);
        assert_eq!(counts.len(), 100);
        assert!(!counts.contains_key(&EMPTY_SLOT));
        let ideal = f64::from(M) / 100.0;
        for (id, &n) in &counts {
            let dev = (n as f64 - ideal).abs() / ideal;
            assert!(dev < 0.01, "backend {id}: {n} slots, ideal {ideal:.1}");
        }
    }

    #[test]
    fn weighted_shares_1_2_3() {
        let keys = keys(3);
        let table = build(&backends(&keys, |i| u32::try_from(i + 1).expect("small")), M).expect("valid backends");
        let counts = counts(&table);
        for id in 1..=3u32 {
            let share = counts[&id] as f64 / f64::from(M);
            let ideal = f64::from(id) / 6.0;
            assert!((share - ideal).abs() / ideal < 0.01, "backend {id}: share {share:.4}, ideal {ideal:.4}");
        }
    }

    #[test]
    fn zero_weight_backend_gets_no_slots() {
        let keys = keys(3);
        let table = build(&backends(&keys, |i| u32::from(i != 1)), 101).expect("valid backends");
        let counts = counts(&table);
        assert!(!counts.contains_key(&2));
        assert_eq!(counts[&1] + counts[&3], 101);
    }

    #[test]
    fn disruption_on_removal() {
        let keys = keys(100);
        let all = backends(&keys, |_| 1);
        let removed = all[42].id;
        let rest: Vec<Backend<'_>> = all.iter().copied().filter(|b| b.id != removed).collect();
        let old = build(&all, M).expect("valid backends");
        let new = build(&rest, M).expect("valid backends");

        let (mut kept, mut moved) = (0usize, 0usize);
        for (&o, &n) in old.iter().zip(&new) {
            if o == removed {
                assert!(n != removed && n != EMPTY_SLOT, "removed backend's slot not reassigned");
            } else {
                kept += 1;
                moved += usize::from(o != n);
            }
        }
        let extra = moved as f64 / kept as f64;
        eprintln!(
            "maglev: removing 1 of 100 backends (M={M}) moved {:.3}% of the other slots; total disruption {:.3}%",
            extra * 100.0,
            disruption(&old, &new) * 100.0
        );
        // Measured 0.56% here, and 0.51%..0.63% over every choice of removed backend
        // (the tables are deterministic); the paper likewise reports small extra
        // disruption. 2% gives >3x headroom yet still fails loudly for a broken
        // population (a non-consistent table would move ~99% of the other slots).
        assert!(extra < 0.02, "extra disruption {extra}");
    }

    #[test]
    fn deterministic_and_order_independent() {
        let keys = keys(50);
        let list = backends(&keys, |i| 1 + u32::try_from(i % 4).expect("small"));
        let first = build(&list, M).expect("valid backends");
        assert_eq!(build(&list, M).expect("valid backends"), first);

        // Deterministic Fisher-Yates shuffle driven by splitmix64.
        let mut shuffled = list.clone();
        let mut state = 0x1234_5678_u64;
        for i in (1..shuffled.len()).rev() {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let j = usize::try_from(mix64(state) % (i as u64 + 1)).expect("fits");
            shuffled.swap(i, j);
        }
        assert_ne!(shuffled, list);
        assert_eq!(build(&shuffled, M).expect("valid backends"), first);
        shuffled.reverse();
        assert_eq!(build(&shuffled, M).expect("valid backends"), first);
    }

    #[test]
    fn hashes_are_stable() {
        // Golden values: changing them changes every deployed table.
        // Golden values cross-checked against an independent Python implementation.
        assert_eq!(stable_hash("10.0.0.1", SEED_OFFSET), 17_912_403_891_065_918_899);
        assert_eq!(stable_hash("10.0.0.1", SEED_SKIP), 16_781_440_592_847_609_065);
        assert_eq!(stable_hash("", SEED_OFFSET), 10_766_197_559_513_220_187);
        let b = Backend { id: 1, key: "10.0.0.1", weight: 1 };
        assert_eq!(perm_for(&b, M), Perm { offset: 26_943, skip: 40_170, weight: 1 });
    }

    #[test]
    fn empty_backends_give_empty_slots() {
        assert_eq!(build(&[], 7).expect("valid"), vec![EMPTY_SLOT; 7]);
        let keys = keys(2);
        assert_eq!(build(&backends(&keys, |_| 0), 7).expect("valid"), vec![EMPTY_SLOT; 7]);
    }

    #[test]
    fn single_backend_fills_table() {
        let b = Backend { id: 9, key: "10.0.0.9", weight: 3 };
        assert_eq!(build(&[b], 13).expect("valid"), vec![9; 13]);
    }

    #[test]
    fn build_errors() {
        let keys = keys(4);
        let list = backends(&keys, |_| 1);
        assert_eq!(build(&list, 2), Err(MaglevError::TableTooSmall { m: 2 }));
        assert_eq!(build(&[], 0), Err(MaglevError::TableTooSmall { m: 0 }));
        assert_eq!(build(&list, 65535), Err(MaglevError::NotPrime { m: 65535 }));
        assert_eq!(build(&list, 3), Err(MaglevError::TooManyBackends { m: 3, backends: 4 }));

        let mut dup = list.clone();
        dup[3].key = dup[1].key;
        assert_eq!(build(&dup, 7), Err(MaglevError::DuplicateKey { key: keys[1].clone() }));

        let mut zero = list.clone();
        zero[2].id = 0;
        assert_eq!(build(&zero, 7), Err(MaglevError::ZeroId { key: keys[2].clone() }));
        assert!(build(&list, 7).is_ok());
    }

    #[test]
    fn disruption_fraction() {
        assert_eq!(disruption(&[], &[]), 0.0);
        assert_eq!(disruption(&[1, 2, 3, 4], &[1, 2, 3, 4]), 0.0);
        assert_eq!(disruption(&[1, 2, 3, 4], &[1, 5, 3, 5]), 0.5);
        assert_eq!(disruption(&[1, 2], &[1, 2, 3, 4]), 0.5);
    }

    #[test]
    fn build_time_sanity() {
        let keys = keys(1000);
        let list = backends(&keys, |_| 1);
        let start = Instant::now();
        let table = build(&list, M).expect("valid backends");
        // Informational only; depends on the machine and on debug vs release.
        eprintln!("maglev: build(M={M}, 1000 backends) took {:?}", start.elapsed());
        assert!(!table.contains(&EMPTY_SLOT));
    }
}
