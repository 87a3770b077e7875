//! The binaries' allocator setting: mimalloc keeps the pages freed memory sits on.
//!
//! Every binary and benchmark of the workspace uses mimalloc as its global allocator (see the
//! workspace manifest). By default mimalloc (v3, which `libmimalloc-sys` builds) hands pages
//! that stayed free for 1 s back to the OS (its arenas' after 10 s), and a training step frees
//! and reallocates its largest buffers (FP64 activations, gradients, their bounds, the next
//! state) on every step, so each step page-faults them in again. In the bench
//! that made a timing depend on what the other member of its pair had left allocated: at the
//! GPT's `d_model` 512 × batch 8, candle's FP32 step took 0.64–0.72 s when it ran right after
//! the trainer's step (whose new state was still held) against 0.44–0.53 s when it ran first,
//! and a replay run second took up to 45 % longer than one run first. With the pages kept, both
//! orders take the same time. A process then holds its peak memory until it exits, which for
//! a training run or an audit is the memory it needed anyway; the services keep the default.

/// mimalloc's `mi_option_purge_delay` (the same position in the v2 and v3 option enums of the
/// bundled sources: `libmimalloc-sys` exports no constant for it). Its default is 1000 (ms) in
/// v3 and 10 in v2; -1 means "never purge". `purge_delay_is_option_15` checks the position
/// against the defaults of this option and of its neighbours.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed pages to the OS. Call it first in a one-shot command's
/// `main` (training, an audit, the bench); it only changes the allocator's policy, never a
/// result, and it does nothing harmful where mimalloc is linked but is not the global
/// allocator. The long-running services (`auditor serve`, `trainer-agent serve`) do not call
/// it, so memory an audit or a download used goes back to the OS when they are idle.
pub fn keep_freed_pages() {
    // SAFETY: `mi_option_set` only stores the option's value (an atomic write in mimalloc's
    // option table) and is documented as callable at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(o: libmimalloc_sys::mi_option_t) -> std::os::raw::c_long {
        // SAFETY: reads the option table (initialising the option from the environment once).
        unsafe { libmimalloc_sys::mi_option_get(o) }
    }

    #[test]
    fn purge_delay_is_option_15() {
        // The defaults in v3's option table (`src/options.c`): purge delay 1000 (ms) at 15,
        // NUMA nodes 0 at 16, OS tag 100 at 18. With the variable set in the environment the
        // default would not be seen, so that case is skipped.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(option(MI_OPTION_PURGE_DELAY), 1000, "option 15 is not the purge delay");
        }
        assert_eq!(option(16), 0, "option 16 is not the NUMA node count: the enum moved");
        assert_eq!(option(18), 100, "option 18 is not the OS tag: the enum moved");
        keep_freed_pages();
        assert_eq!(option(MI_OPTION_PURGE_DELAY), -1);
    }
}
