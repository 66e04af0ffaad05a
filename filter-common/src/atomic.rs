//! The two atomics the decision needs, on both targets. The BPF target's `core` exposes no atomic
//! read-modify-write types, so there the compiler intrinsics are used directly; they lower to the
//! BPF ISA v3 `atomic add` and `cmpxchg` instructions.

/// `*ptr += v`, atomically.
///
/// # Safety
/// `ptr` must be valid, aligned and only accessed atomically by concurrent writers.
#[inline(always)]
pub unsafe fn add(ptr: *mut u64, v: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: forwarded from the caller.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            ptr, v,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: forwarded from the caller.
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(ptr)
            .fetch_add(v, core::sync::atomic::Ordering::Relaxed);
    }
}

/// Compare-and-swap: store `new` if `*ptr == current`; `Err(actual)` otherwise.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub unsafe fn cas(ptr: *mut u64, current: u64, new: u64) -> Result<u64, u64> {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::AtomicOrdering::Relaxed;
        // SAFETY: forwarded from the caller.
        let (prev, ok) = unsafe {
            core::intrinsics::atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(ptr, current, new)
        };
        if ok { Ok(prev) } else { Err(prev) }
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
        // SAFETY: forwarded from the caller.
        unsafe { AtomicU64::from_ptr(ptr) }.compare_exchange(current, new, Relaxed, Relaxed)
    }
}

/// Plain volatile load of a value other CPUs update atomically.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub unsafe fn load(ptr: *const u64) -> u64 {
    // SAFETY: forwarded from the caller; an aligned u64 load is single-copy atomic on every target.
    unsafe { core::ptr::read_volatile(ptr) }
}
