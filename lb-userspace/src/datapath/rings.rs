//! The Maglev rings map, memory-mapped (`BPF_F_MMAPABLE`): the agent reads and writes
//! ring slots as memory, so writing a whole ring costs no syscall, and a starting agent
//! reads the rings of a running datapath in a few milliseconds.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::Map;
use lb_common::{RING_SLOT_STRIDE, maps};

use super::DataplaneError;

/// The whole of `LB_RINGS`, mapped shared: what is stored here is what the program reads.
pub(super) struct RingMemory {
    base: NonNull<u8>,
    len: usize,
    slots: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through `AtomicU32`.
unsafe impl Send for RingMemory {}

impl RingMemory {
    /// Maps the `slots` entries of the rings map.
    pub(super) fn map(map: &Map, slots: u32) -> Result<RingMemory, DataplaneError> {
        let Map::Array(data) = map else { return Err(DataplaneError::MissingMap { name: maps::RINGS }) };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (slots as usize * RING_SLOT_STRIDE).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's descriptor, `len` bytes (the
        // array's value area, page-rounded as the kernel requires); unmapped on drop.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap { source: std::io::Error::last_os_error() });
        }
        let base = NonNull::new(ptr.cast()).ok_or(DataplaneError::Mmap { source: std::io::ErrorKind::Other.into() })?;
        Ok(RingMemory { base, len, slots: slots as usize })
    }

    fn slot(&self, index: usize) -> Option<&AtomicU32> {
        (index < self.slots).then(|| {
            // SAFETY: `index < slots`, so the 4 bytes lie inside the mapping, 8-aligned
            // (page-aligned base, 8-byte stride); they live as long as `self`.
            unsafe { &*self.base.as_ptr().add(index * RING_SLOT_STRIDE).cast::<AtomicU32>() }
        })
    }

    /// Whether the `table.len()` slots from `first` hold `table`.
    pub(super) fn holds(&self, first: usize, table: &[u32]) -> bool {
        table.iter().enumerate().all(|(i, &v)| self.slot(first + i).is_some_and(|s| s.load(Ordering::Relaxed) == v))
    }

    /// Stores `table` from slot `first` on, writing only the slots that differ. Returns
    /// how many were written, or `None` (nothing written) if it does not fit.
    pub(super) fn store(&self, first: usize, table: &[u32]) -> Option<usize> {
        if first + table.len() > self.slots {
            return None;
        }
        let mut written = 0;
        for (i, &v) in table.iter().enumerate() {
            let slot = self.slot(first + i)?;
            if slot.load(Ordering::Relaxed) != v {
                slot.store(v, Ordering::Relaxed);
                written += 1;
            }
        }
        // The VIP switch that follows (a map update) must not be seen before these.
        std::sync::atomic::fence(Ordering::SeqCst);
        Some(written)
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
