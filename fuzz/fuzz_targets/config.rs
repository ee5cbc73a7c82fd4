#![no_main]
// Thin: the target itself is `tollgate_fuzz::config` (also replayed on stable in CI).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::config(data));
